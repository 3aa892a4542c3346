"""OFT beyond the method table: config validation against PEFT's, the block-size adjustment, the two Cayley modes
(PEFT's transposed-rotation quirk), COFT's projection, module_dropout (a no-op in PEFT 0.21.2), embeddings and the
merge orientation, and bad input.

Layer-level checks build PEFT's own ``OFTRotationModule`` / ``oft.Linear``; model-level ones go through the backends
like tests/test_parity.py. Float bounds are relative to the compared tensor's largest entry
(``numerics.assert_close_to_scale``); the measured value is next to each (``JPEFT_PRINT_ERRORS=1 pytest -s``).
"""

import logging
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from peft.tuners.oft.layer import Linear as PeftOftLinear
from peft.tuners.oft.layer import OFTRotationModule

from backends import get_backend
from backends.tiny import make_batch, make_tiny_llama
from jpeft import config as config_lib
from jpeft import core, optim, registry, train
from jpeft.methods import oft
from jpeft.methods.base import ModuleSpec
from jpeft.models import forward, load_model
from jpeft.targets import UnsupportedTargetError
from numerics import EPS32, assert_close_to_scale

VOCAB = 256
# One rotation (a b×b product of a few matmuls) against torch's: measured worst 2.4e-7 (Neumann, T = 30; exact
# solve 1.8e-7); bound 16 eps = 1.9e-6. A formula error (one term more or less, the wrong sign) is > 1e-2.
ROT_REL = 16 * EPS32
# Logits of a whole model (as tests/test_parity.py's LOGIT_REL): measured worst 8.9e-7; bound 32 eps = 3.8e-6.
LOGIT_REL = 32 * EPS32


def _peft_rotation(vec: np.ndarray, b: int, *, neumann: bool, terms: int = 5) -> np.ndarray:
  module = OFTRotationModule(vec.shape[0], vec.shape[1], b, vec.shape[0] * b)
  return module._cayley_batch(torch.tensor(vec), b, neumann, terms).numpy()


def _jpeft_rotation(vec: np.ndarray, b: int, **kw) -> np.ndarray:
  config = oft.OFTConfig(**kw)
  return np.asarray(oft.rotations(jnp.asarray(vec), b, config))


def _vec(seed: int, n: int, b: int, scale: float = 0.3) -> np.ndarray:
  return (scale * np.random.default_rng(seed).standard_normal((n, b * (b - 1) // 2))).astype(np.float32)


# ------------------------------------------------------------------------------------------------------------
# Config validation against PEFT's


@pytest.mark.parametrize(
  "kwargs,message",
  [
    (dict(r=4), r"only specify either r \(4\) or oft_block_size \(32\), but not both"),  # default block size 32
    (dict(r=8, oft_block_size=16), r"only specify either r \(8\) or oft_block_size \(16\)"),
    (dict(r=0, oft_block_size=0), r"Either `r` or `oft_block_size` must be non-zero.*r = 0 and oft_block_size = 0"),
    (dict(layers_pattern="layers"), r"`layers_pattern` is specified, `layers_to_transform` must also be specified"),
  ],
)
def test_config_refused_like_peft(kwargs, message):
  with pytest.raises(ValueError, match=message):
    peft.OFTConfig(**kwargs)
  with pytest.raises(config_lib.InvalidConfigError, match=message):
    oft.OFTConfig(**kwargs)


@pytest.mark.parametrize(
  "kwargs",
  [
    dict(),
    dict(r=4, oft_block_size=0),
    dict(oft_block_size=12, block_share=True),
    dict(coft=True, eps=1e-3, use_cayley_neumann=False, module_dropout=0.0),
    dict(num_cayley_neumann_terms=9, init_weights=False, bias="oft_only"),
  ],
)
def test_config_accepted_like_peft(kwargs):
  theirs, ours = peft.OFTConfig(**kwargs), oft.OFTConfig(**kwargs)
  for name in ("r", "oft_block_size", "coft", "eps", "block_share", "use_cayley_neumann", "num_cayley_neumann_terms"):
    assert getattr(ours, name) == getattr(theirs, name), name


@pytest.mark.parametrize(
  "kwargs,words",
  [
    # PEFT accepts these configs and fails later, inside torch (torch.empty(-4, ...)), or silently computes R = I.
    (dict(r=-4, oft_block_size=0), "`r` should be an integer >= 0"),
    (dict(oft_block_size=-16), "`oft_block_size` should be an integer >= 0"),
    (dict(r="4", oft_block_size=0), "`r` must be an integer"),
    (dict(oft_block_size=True), "`oft_block_size` must be an integer"),
    (dict(num_cayley_neumann_terms=0), "`num_cayley_neumann_terms` should be a positive integer"),
    (dict(coft=True, eps=-1e-3), "`eps` .* must be >= 0 with coft=True"),
    (dict(eps=float("nan")), "`eps` must be a finite number"),
    (dict(module_dropout=1.0), "`module_dropout`"),
    (dict(bias="lora_only"), "Requested bias: 'lora_only', is not implemented"),
    (dict(init_weights="gaussian"), "`init_weights` must be true or false"),
  ],
)
def test_bad_config_values_name_the_field(kwargs, words):
  with pytest.raises(config_lib.InvalidConfigError, match=words):
    oft.OFTConfig(**kwargs)


def test_config_warnings(caplog):
  caplog.set_level(logging.WARNING, logger="absl")
  config = oft.OFTConfig(fan_in_fan_out=True, module_dropout=0.5, peft_version="0.17.1")
  assert config.fan_in_fan_out is False  # PEFT resets it for nn.Linear targets
  assert "Setting fan_in_fan_out to False" in caplog.text
  assert "module_dropout" in caplog.text and "no effect" in caplog.text
  assert "cayley-neumann parameterization has been slightly changed" in caplog.text
  caplog.clear()
  oft.OFTConfig(peft_version="0.21.2")
  oft.OFTConfig(peft_version="0.17.1", use_cayley_neumann=False)
  assert caplog.text == ""


# ------------------------------------------------------------------------------------------------------------
# Block layout: PEFT's adjustment of a block size (or r) that does not divide in_features


def _peft_layout(in_features: int, **kwargs) -> tuple[int, int, tuple]:
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    layer = PeftOftLinear(torch.nn.Linear(in_features, 8), "default", peft.OFTConfig(**kwargs), r=kwargs.get("r", 0))
  return layer.r["default"], layer.oft_block_size["default"], tuple(layer.oft_R["default"].weight.shape)


LAYOUTS = (
  [dict(oft_block_size=b) for b in (2, 3, 5, 7, 12, 16, 20, 24, 40, 64, 100)]
  + [dict(r=r, oft_block_size=0) for r in (2, 3, 5, 6, 7, 9, 16, 31)]
  + [dict(oft_block_size=12, block_share=True), dict(r=5, oft_block_size=0, block_share=True)]
)


@pytest.mark.parametrize("in_features", [64, 96, 128, 30])
@pytest.mark.parametrize("kwargs", LAYOUTS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_block_layout_matches_peft(in_features, kwargs):
  r, b, shape = _peft_layout(in_features, **kwargs)
  if b < 2:  # PEFT then builds a (nb, 0) tensor that rotates nothing; jpeft refuses (next test)
    return
  config = oft.OFTConfig(**kwargs)
  assert oft.block_layout(in_features, config.r, config.oft_block_size) == (r, b)
  spec = ModuleSpec("model.layers.0.self_attn.q_proj", "linear", jnp.zeros((8, in_features)))
  assert oft.init_module(jax.random.key(0), spec, config)["oft_R.weight"].shape == shape


def test_adjustment_warns_like_peft(caplog):
  caplog.set_level(logging.WARNING, logger="absl")
  oft.block_layout.cache_clear()
  assert oft.block_layout(64, 0, 12) == (8, 8)  # 8 and 16 are both 4 away: PEFT takes the lower one
  assert oft.block_layout(64, 7, 0) == (8, 8)  # r = 7: 8 is nearer than 4
  assert oft.block_layout(64, 0, 100) == (1, 64)  # larger than in_features: one block of all inputs
  assert "Invalid `oft_block_size` (12)! Adjusted `oft_block_size` to (8)." in caplog.text
  assert "Invalid `r` (7)! Adjusted `r` to (8)." in caplog.text


@pytest.mark.parametrize(
  "in_features,kwargs",
  [(64, dict(oft_block_size=1)), (64, dict(r=100, oft_block_size=0)), (7, dict(oft_block_size=2))],
)
def test_blocks_of_one_input_are_refused(in_features, kwargs):
  # PEFT: block size 1 (asked for, r >= in_features, or the nearest divisor of a prime) gives a (nb, 0) tensor.
  assert _peft_layout(in_features, **kwargs)[2][1] == 0
  spec = ModuleSpec("model.layers.0.mlp.down_proj", "linear", jnp.zeros((8, in_features)))
  with pytest.raises(config_lib.InvalidConfigError, match="down_proj: OFT blocks of size 1 .* no rotation parameters"):
    oft.init_module(jax.random.key(0), spec, oft.OFTConfig(**kwargs))


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
  return make_tiny_llama(str(tmp_path_factory.mktemp("oft")), initializer_range=0.1)


def _both(base_folder, peft_config, seed=0):
  """PEFT attaches the adapter, its tensors are perturbed, and jpeft gets the very same ones."""
  jx, pt = get_backend("jax"), get_backend("torch")
  for b in (jx, pt):
    b.load_base(base_folder)
  pt.attach_adapter(peft_config, seed=seed)
  rng = np.random.default_rng(seed)
  state = {
    k: (v + 0.05 * rng.standard_normal(v.shape)).astype(v.dtype) if ".base_layer." not in k else v
    for k, v in pt.adapter_state_dict().items()
  }
  pt.set_adapter_state_dict(state)
  jx.attach_adapter(peft_config, seed=seed)
  assert {k: v.shape for k, v in jx.adapter_state_dict().items()} == {k: v.shape for k, v in state.items()}
  jx.set_adapter_state_dict(state)
  return jx, pt


def test_adjusted_blocks_on_the_model_match_peft(base_folder):
  # in_features 64 (q, k) and 128 (down): oft_block_size=20 becomes 16 on both; r=7 becomes 8 blocks
  for cfg in (
    dict(peft_type="OFT", r=0, oft_block_size=20, target_modules=["q_proj", "down_proj"]),
    dict(peft_type="OFT", r=7, oft_block_size=0, target_modules=["k_proj", "down_proj"]),
  ):
    jx, pt = _both(base_folder, cfg)
    b = make_batch(0, 2, 12, VOCAB)
    ref = pt.logits(b["input_ids"], b["attention_mask"])
    out = jx.logits(b["input_ids"], b["attention_mask"])
    # measured 7.1e-7
    assert_close_to_scale(out, ref, LOGIT_REL, mask=b["attention_mask"].astype(bool), what=f"adjusted {cfg}")


# ------------------------------------------------------------------------------------------------------------
# Rotations: the strict upper triangle, the Neumann series, the exact Cayley transform and PEFT's transposition


def test_skew_symmetric_layout_is_torch_triu_order():
  vec = _vec(0, 3, 6)
  module = OFTRotationModule(3, vec.shape[1], 6, 18)
  np.testing.assert_array_equal(
    np.asarray(oft.skew(jnp.asarray(vec), 6)), module._pytorch_skew_symmetric(torch.tensor(vec), 6).numpy()
  )


@pytest.mark.parametrize("terms", [1, 2, 3, 4, 5, 6, 7, 30])
def test_neumann_series_matches_peft(terms):
  vec = _vec(terms, 4, 8, scale=0.05)
  ref = _peft_rotation(vec, 8, neumann=True, terms=terms)
  out = _jpeft_rotation(vec, 8, num_cayley_neumann_terms=terms)
  assert_close_to_scale(out, ref, ROT_REL, what=f"Neumann rotation, {terms} terms")  # measured <= 2.4e-7


def test_default_neumann_is_five_terms():
  vec = _vec(1, 2, 5)
  q = np.asarray(oft.skew(jnp.asarray(vec), 5), np.float64)
  eye = np.eye(5)
  expected = eye + 2 * q + 2 * q @ q + 2 * q @ q @ q + q @ q @ q @ q
  assert_close_to_scale(_jpeft_rotation(vec, 5), expected, ROT_REL, what="I + 2Q + 2Q² + 2Q³ + Q⁴")  # 6e-8


def test_the_two_cayley_modes_are_transposes_as_in_peft():
  """PEFT quirk: the series approximates (I+Q)(I−Q)⁻¹, the exact mode computes (I−Q)(I+Q)⁻¹, its transpose."""
  vec = _vec(2, 4, 8, scale=0.05)
  neumann, exact = _peft_rotation(vec, 8, neumann=True, terms=30), _peft_rotation(vec, 8, neumann=False)
  ours_neumann = _jpeft_rotation(vec, 8, num_cayley_neumann_terms=30)
  ours_exact = _jpeft_rotation(vec, 8, use_cayley_neumann=False)
  assert_close_to_scale(ours_neumann, neumann, ROT_REL, what="Neumann vs PEFT")  # measured 1.2e-7
  assert_close_to_scale(ours_exact, exact, ROT_REL, what="exact vs PEFT")  # measured 1.8e-7
  exact_t = np.swapaxes(ours_exact, -1, -2)
  assert_close_to_scale(ours_neumann, exact_t, ROT_REL, what="Neumann vs exactᵀ")  # measured 2.4e-7
  assert np.abs(ours_neumann - ours_exact).max() > 0.1  # not the same rotation: measured 0.48


def test_exact_cayley_is_orthogonal():
  vec = _vec(3, 4, 16, scale=1.0)  # far from the identity, where the series would not be orthogonal
  rot = _jpeft_rotation(vec, 16, use_cayley_neumann=False).astype(np.float64)
  eye = np.broadcast_to(np.eye(16), rot.shape)
  assert_close_to_scale(rot @ np.swapaxes(rot, -1, -2), eye, 16 * EPS32, what="R Rᵀ = I")  # measured 1.2e-6
  assert_close_to_scale(np.swapaxes(rot, -1, -2) @ rot, eye, 16 * EPS32, what="Rᵀ R = I")


# ------------------------------------------------------------------------------------------------------------
# COFT


@pytest.mark.parametrize("block_share", [False, True])
def test_coft_projection_equals_peft_in_place_projection(block_share):
  nb, b, eps = 4, 8, 0.5
  vec = _vec(4, 1 if block_share else nb, b, scale=0.1)
  if not block_share:
    vec[0] *= 0.01  # one block inside the bound: left as it is
  module = OFTRotationModule(
    vec.shape[0], vec.shape[1], b, nb * b, coft=True, eps=eps, block_share=block_share, use_cayley_neumann=True
  )
  with torch.no_grad():
    module.weight.copy_(torch.tensor(vec))
    module(torch.randn(3, nb * b))  # PEFT's forward projects the parameter in place
  theirs = module.weight.detach().numpy()
  config = oft.OFTConfig(coft=True, eps=eps, block_share=block_share)
  adapter = {"m": {"oft_R.weight": jnp.asarray(vec)}, "lm_head": {"weight": jnp.ones((2, 2))}}
  ours = oft.project(adapter, config)
  assert_close_to_scale(np.asarray(ours["m"]["oft_R.weight"]), theirs, 4 * EPS32, what="COFT")  # measured 0 - 6e-8
  if not block_share:
    np.testing.assert_array_equal(np.asarray(ours["m"]["oft_R.weight"])[0], vec[0])
  assert np.abs(theirs - vec)[-1].max() > 1e-2  # the last block was projected
  np.testing.assert_array_equal(np.asarray(ours["lm_head"]["weight"]), 1.0)  # a full copy is not touched
  assert oft.project(adapter, oft.OFTConfig()) is adapter  # no coft: nothing to do


def _tiny(base_folder):
  return load_model(base_folder)


def _coft_norms(adapter, config):
  """max over blocks of ‖Q_i‖_F / (eps/√n) for every module."""
  out = []
  for tensors in adapter.values():
    vec = tensors["oft_R.weight"]
    b = int(round((1 + np.sqrt(1 + 8 * vec.shape[1])) / 2))
    norm = np.sqrt((np.asarray(oft.skew(vec, b)) ** 2).sum(axis=(1, 2)))
    out.append(norm.max() / (config.eps / np.sqrt(vec.shape[0])))
  return max(out)


def test_coft_training_keeps_the_constraint_and_the_forward_projects(base_folder):
  model_config, params = _tiny(base_folder)
  config = registry.config_from_dict(
    dict(peft_type="OFT", oft_block_size=16, coft=True, eps=0.1, target_modules=["q_proj", "o_proj"])
  )
  adapter, params = core.init(jax.random.key(0), params, config, model_config)
  adapter = jax.tree_util.tree_map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), adapter)
  assert _coft_norms(adapter, config) > 10  # far outside the bound before any projection
  b = {k: jnp.asarray(v) for k, v in make_batch(0, 2, 12, VOCAB).items()}

  # the forward enforces the constraint on whatever it is given, so an unprojected adapter computes as projected
  logits = [
    forward(core.apply(params, a, config), model_config, b["input_ids"], b["attention_mask"])
    for a in (adapter, core.project(adapter, config))
  ]
  # the second is projected twice, which rescales the boundary blocks by 1 ± a few eps: measured 5.7e-7
  assert_close_to_scale(np.asarray(logits[0]), np.asarray(logits[1]), LOGIT_REL, what="unprojected vs projected")

  optimizer = optim.make_optimizer(adapter, config, lr=0.1)
  step = train.make_train_step(model_config, config, optimizer, donate=False)
  state = optimizer.init(adapter)
  for _ in range(3):
    new, state, _metrics = step(adapter, state, params, b, None)
    assert _coft_norms(new, config) <= 1 + 1e-6  # measured 1.0000001 (the boundary, to rounding)
    assert max(float(jnp.abs(new[m]["oft_R.weight"] - adapter[m]["oft_R.weight"]).max()) for m in new) > 0
    adapter = new


# ------------------------------------------------------------------------------------------------------------
# module_dropout: built by PEFT 0.21.2, never applied


def test_module_dropout_is_a_no_op_like_peft(base_folder):
  cfg = dict(peft_type="OFT", oft_block_size=16, module_dropout=0.5, target_modules=["q_proj", "v_proj"])
  # PEFT: its MultiplicativeDropoutLayer exists, yet train mode computes what eval mode does
  layer = PeftOftLinear(torch.nn.Linear(64, 32), "default", peft.OFTConfig(**cfg), r=0)
  assert type(layer.oft_dropout["default"]).__name__ == "MultiplicativeDropoutLayer"
  torch.nn.init.normal_(layer.oft_R["default"].weight, std=0.1)
  x = torch.randn(5, 64)
  with torch.no_grad():
    eval_out, train_out = layer.eval()(x), layer.train()(x)
  torch.testing.assert_close(train_out, eval_out, rtol=0, atol=0)
  # jpeft: a dropout key changes nothing either
  model_config, params = _tiny(base_folder)
  config = registry.config_from_dict(cfg)
  adapter, params = core.init(jax.random.key(0), params, config, model_config)
  adapter = jax.tree_util.tree_map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(1), x.shape), adapter)
  b = make_batch(0, 2, 12, VOCAB)
  outs = [
    np.asarray(forward(core.apply(params, adapter, config, rng=rng), model_config, b["input_ids"], b["attention_mask"]))
    for rng in (None, jax.random.key(3))
  ]
  np.testing.assert_array_equal(outs[0], outs[1])


# ------------------------------------------------------------------------------------------------------------
# Embeddings and the merge orientation against PEFT's merge_and_unload


def test_embedding_and_merge_match_peft(base_folder, tmp_path):
  cfg = dict(peft_type="OFT", oft_block_size=16, target_modules=["embed_tokens", "q_proj", "down_proj"])
  jx, pt = _both(base_folder, cfg, seed=3)
  assert "base_model.model.model.embed_tokens.oft_embedding_R.weight" in jx.adapter_state_dict()
  b = make_batch(1, 2, 12, VOCAB)
  mask = b["attention_mask"].astype(bool)
  ref = pt.logits(b["input_ids"], b["attention_mask"])
  assert_close_to_scale(jx.logits(b["input_ids"], b["attention_mask"]), ref, LOGIT_REL, mask=mask, what="embedding")
  jx.save_adapter(str(tmp_path))  # jpeft's file back into PEFT (with the embedding's base layer, as PEFT saves it)
  pt2 = get_backend("torch")
  pt2.load_base(base_folder)
  pt2.load_adapter(str(tmp_path))
  assert_close_to_scale(pt2.logits(b["input_ids"], b["attention_mask"]), ref, LOGIT_REL, mask=mask, what="reload")
  pt.merge()
  jx.merge()
  merged = {k: v.detach().numpy() for k, v in pt.model.state_dict().items()}
  for name in (
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.1.mlp.down_proj.weight",
  ):
    # W·BD(R)ᵀ for linears, W·BD(R) for the embedding: measured <= 2.5e-7; the other orientation gives ~0.1
    assert_close_to_scale(np.asarray(jx.params[name]), merged[name], 16 * EPS32, what=f"merged {name}")
    assert np.abs(merged[name] - np.asarray(jx.base_params[name])).max() > 1e-2  # PEFT did merge
  assert_close_to_scale(jx.logits(b["input_ids"], b["attention_mask"]), ref, LOGIT_REL, mask=mask, what="merged")


# ------------------------------------------------------------------------------------------------------------
# Bad input


def test_bad_adapter_tensors_are_refused():
  config = oft.OFTConfig(oft_block_size=16)
  spec = ModuleSpec("model.layers.0.self_attn.q_proj", "linear", jnp.zeros((64, 64)))
  with pytest.raises(config_lib.AdapterCheckpointError, match=r"q_proj.*\(1, 120\).*shape \(4, 120\)"):
    oft.adapt_module(spec, {"oft_R.weight": jnp.zeros((1, 120))}, config, {}, None)  # a block_share tensor
  with pytest.raises(config_lib.AdapterCheckpointError, match=r"holds \['oft_embedding_R.weight'\].*oft_R.weight"):
    oft.adapt_module(spec, {"oft_embedding_R.weight": jnp.zeros((4, 120))}, config, {}, None)
  norm = ModuleSpec("model.norm", "norm", jnp.ones((64,)))
  with pytest.raises(UnsupportedTargetError, match="'model.norm' is a .* which OFT does not support"):
    oft.init_module(jax.random.key(0), norm, config)


def test_non_identity_init():
  spec = ModuleSpec("model.layers.0.self_attn.q_proj", "linear", jnp.zeros((64, 64)))
  value = oft.init_module(jax.random.key(0), spec, oft.OFTConfig(oft_block_size=16, init_weights=False))
  std = float(jnp.std(value["oft_R.weight"]))
  assert 0.08 < std < 0.12  # PEFT: N(0, 0.1²); measured 0.099
  assert not oft.OFT.identity_at_init(oft.OFTConfig(init_weights=False))
  zeros = oft.init_module(jax.random.key(0), spec, oft.OFTConfig(oft_block_size=16))["oft_R.weight"]
  np.testing.assert_array_equal(np.asarray(zeros), 0.0)
