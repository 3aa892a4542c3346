"""BOFT beyond the method table: config and layout validation against PEFT's, the butterfly permutations (bit-exact),
the butterfly formula against a float64 NumPy reference, ``boft_n_butterfly_factor > 1`` against PEFT's own code,
PEFT's CPU checkpoints of a factor > 1 config, ``boft_dropout`` and bad input.

PEFT computes more than one butterfly factor only with its CUDA extension ``fbd_cuda``; on a CPU it silently uses one.
The ``fbd`` fixture makes PEFT believe the extension is there by replacing ``get_fbd_cuda`` with a torch stand-in for
its two kernels (``forward``: a batch of block-diagonal matrices, ``torch.block_diag``; ``backward``: their diagonal
blocks), so PEFT's own butterfly code (permutations, products, merge) runs for factor > 1 on a CPU.

``boft_dropout`` is checked with the randomness made explicit: jpeft's draws (:func:`boft.block_dropout_draw`, the
factor and the permutation of the blocks) are injected into PEFT's ``MultiplicativeDropoutLayer`` by replacing
``torch.randint`` / ``torch.randperm`` while PEFT's train-mode forward runs. Float bounds are relative to the compared
tensor's largest entry (``numerics.assert_close_to_scale``); the measured value is next to each
(``JPEFT_PRINT_ERRORS=1 pytest -s``).
"""

import json
import logging
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import peft
import peft.tuners.boft.layer as peft_boft
import pytest
import torch

from backends import get_backend
from backends.tiny import make_batch, make_tiny_llama
from jpeft import config as config_lib
from jpeft import core, registry
from jpeft.methods import boft
from jpeft.methods.base import ModuleSpec
from jpeft.models import forward, load_model
from jpeft.targets import UnsupportedTargetError
from numerics import EPS32, assert_close_to_scale

VOCAB = 256
Q_NAME = "model.layers.0.self_attn.q_proj"
# One layer (outputs, merged weights, gradients: sums of <= 64 float32 products after 1-3 chained rotations) against
# PEFT and against float64 NumPy: measured worst 3.3e-7 (merged weight vs PEFT, m = 2); bound 16 eps = 1.9e-6. The
# adapter moves the outputs by >= 1.17 of their scale, so a wrong permutation, orientation or factor order is far out.
LAYER_REL = 16 * EPS32
# Logits of the tiny model (as tests/test_parity.py's LOGIT_REL): measured worst 8.6e-7; bound 32 eps = 3.8e-6.
LOGIT_REL = 32 * EPS32


# ------------------------------------------------------------------------------------------------------------
# PEFT with its butterfly code enabled on a CPU


class _FakeFbd:
  """Stands in for PEFT's compiled ``fbd_cuda``: ``(N, D, H, H) -> (N, D·H, D·H)`` block diagonals and back."""

  @staticmethod
  def forward(x):
    return [torch.stack([torch.block_diag(*torch.unbind(blocks)) for blocks in x])]

  @staticmethod
  def backward(grad, x):
    h = x.shape[-1]
    return [torch.stack([grad[:, i * h : (i + 1) * h, i * h : (i + 1) * h] for i in range(x.shape[1])], dim=1)]


@pytest.fixture
def fbd(monkeypatch):
  monkeypatch.setattr(peft_boft, "get_fbd_cuda", lambda: _FakeFbd)


def _peft_linear(in_features, out_features, **kwargs):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    base = torch.nn.Linear(in_features, out_features, bias=False)
    return peft_boft.Linear(base, "default", config=peft.BOFTConfig(**kwargs))


# ------------------------------------------------------------------------------------------------------------
# Config validation against PEFT's


@pytest.mark.parametrize(
  "kwargs,message",
  [
    (dict(boft_block_num=4), r"only specify either boft_block_size \(4\) or boft_block_num \(4\), but not both"),
    (dict(boft_block_size=0), r"Either `boft_block_size` or `boft_block_num` must be non-zero.*= 0 and .* = 0"),
    (dict(layers_pattern="layers"), r"`layers_pattern` is specified, `layers_to_transform` must also be specified"),
  ],
)
def test_config_refused_like_peft(kwargs, message):
  with pytest.raises(ValueError, match=message):
    peft.BOFTConfig(**kwargs)
  with pytest.raises(config_lib.InvalidConfigError, match=message):
    boft.BOFTConfig(**kwargs)


@pytest.mark.parametrize(
  "kwargs",
  [
    dict(),
    dict(boft_block_size=0, boft_block_num=8, boft_n_butterfly_factor=2),
    dict(boft_block_size=16, boft_dropout=0.1, bias="boft_only", init_weights=False),
    dict(boft_dropout=1.0),  # every block of one factor replaced by I: legal in PEFT (no division)
  ],
)
def test_config_accepted_like_peft(kwargs):
  theirs, ours = peft.BOFTConfig(**kwargs), boft.BOFTConfig(**kwargs)
  for name in ("boft_block_size", "boft_block_num", "boft_n_butterfly_factor", "boft_dropout", "bias", "init_weights"):
    assert getattr(ours, name) == getattr(theirs, name), name


@pytest.mark.parametrize(
  "kwargs,words",
  [
    # PEFT accepts these configs and fails later: torch.zeros(1, -8, ...) at layer creation, an error inside torch
    # in the first train step (p > 1), or it never drops a block (p < 0)
    (dict(boft_block_size=-8), "`boft_block_size` should be an integer >= 0"),
    (dict(boft_block_size=0, boft_block_num=-4), "`boft_block_num` should be an integer >= 0"),
    (dict(boft_block_size="8"), "`boft_block_size` must be an integer"),
    (dict(boft_dropout=1.5), r"`boft_dropout` .* has to be in \[0, 1\], got 1.5"),
    (dict(boft_dropout=-0.1), r"`boft_dropout` .* has to be in \[0, 1\]"),
    (dict(boft_dropout="0.1"), r"`boft_dropout` must be a number"),
    (dict(bias="lora_only"), "Requested bias: 'lora_only', is not implemented"),
    (dict(init_weights="gaussian"), "`init_weights` must be true or false"),
  ],
)
def test_bad_config_values_name_the_field(kwargs, words):
  with pytest.raises(config_lib.InvalidConfigError, match=words):
    boft.BOFTConfig(**kwargs)


def test_negative_sizes_fail_in_peft_too():
  with pytest.raises(RuntimeError):  # PEFT: torch.zeros(1, -8, -8, -8)
    _peft_linear(64, 8, boft_block_size=-8)


@pytest.mark.parametrize("factor", [0, -1])
def test_butterfly_factor_below_one_is_refused(factor, fbd):
  # PEFT with fbd_cuda raises at layer creation; without it (a CPU) it silently uses one factor.
  with pytest.raises(ValueError, match=f"You can only specify boft_n_butterfly_factor {factor} to be a positive"):
    _peft_linear(64, 8, boft_n_butterfly_factor=factor)
  with pytest.raises(config_lib.InvalidConfigError, match=f"boft_n_butterfly_factor {factor} to be a positive"):
    boft.BOFTConfig(boft_n_butterfly_factor=factor)


def test_butterfly_factor_below_one_is_ignored_by_peft_on_a_cpu():
  assert tuple(_peft_linear(64, 8, boft_n_butterfly_factor=0).boft_R["default"].shape) == (1, 16, 4, 4)


def test_fan_in_fan_out_is_reset_with_a_warning(caplog):
  caplog.set_level(logging.WARNING, logger="absl")
  assert boft.BOFTConfig(fan_in_fan_out=True).fan_in_fan_out is False
  assert "Setting fan_in_fan_out to False" in caplog.text


# ------------------------------------------------------------------------------------------------------------
# Block layout: PEFT's update_layer checks, with and without butterfly factors

LAYOUTS = [dict(boft_block_size=b, boft_n_butterfly_factor=m) for b in (1, 3, 4, 6, 8, 32, 100) for m in (1, 2, 3)] + [
  dict(boft_block_size=0, boft_block_num=nb, boft_n_butterfly_factor=m) for nb in (1, 3, 4, 6, 16) for m in (1, 2, 4)
]


@pytest.mark.parametrize("in_features", [64, 24])
@pytest.mark.parametrize("kwargs", LAYOUTS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_layout_and_errors_match_peft(in_features, kwargs, fbd):
  config = boft.BOFTConfig(**kwargs)
  spec = ModuleSpec(Q_NAME, "linear", jnp.zeros((8, in_features)))
  try:
    layer = _peft_linear(in_features, 8, **kwargs)
  except ValueError as e:
    with pytest.raises(config_lib.InvalidConfigError) as ours:
      boft.init_module(jax.random.key(0), spec, config)
    assert str(ours.value) == f"{Q_NAME}: {e}"
    return
  tensors = boft.init_module(jax.random.key(0), spec, config)
  assert tensors["boft_R"].shape == tuple(layer.boft_R["default"].shape)
  assert tensors["boft_s"].shape == tuple(layer.boft_s["default"].shape)


@pytest.mark.parametrize("n,b,m", [(64, 8, 2), (64, 4, 3), (128, 8, 3), (64, 2, 5), (96, 4, 2), (24, 2, 3)])
def test_butterfly_permutations_are_peft_s(n, b, m):
  ours = boft.butterfly_perms(n, b, m)
  for k in range(m):
    theirs = peft_boft.BOFTLayer.block_butterfly_perm(None, n, int(n // b / 2**k), int(b / 2), m - 1).numpy()
    mine = np.arange(n) if ours[k] is None else ours[k][0]
    np.testing.assert_array_equal(mine, theirs)
    if ours[k] is not None:
      np.testing.assert_array_equal(ours[k][0][ours[k][1]], np.arange(n))
  assert any(p is not None and (p[0] != np.arange(n)).any() for p in ours)  # a real butterfly


# ------------------------------------------------------------------------------------------------------------
# The butterfly formula: float64 NumPy and PEFT's own code


def _numpy_boft(r: np.ndarray, s: np.ndarray, w: np.ndarray, perms):
  """float64: ``M = Π_k P_k BlockDiag(Q_k) P_kᵀ`` (factor m−1 leftmost), ``Q = (I − S)(I + S)⁻¹``, ``S = ½(R − Rᵀ)``."""
  r, m, nb, b, n = r.astype(np.float64), r.shape[0], r.shape[1], r.shape[2], w.shape[1]
  skew = 0.5 * (r - np.swapaxes(r, -1, -2))
  q = np.linalg.solve(np.eye(b) + skew, np.eye(b) - skew)
  total = np.eye(n)
  for k in range(m):
    bd = np.zeros((n, n))
    for i in range(nb):
      bd[i * b : (i + 1) * b, i * b : (i + 1) * b] = q[k, i]
    p = np.eye(n)[np.arange(n) if perms[k] is None else perms[k][0]]  # PEFT's perm2mat: P[i, perm[i]] = 1
    total = p @ bd @ p.T @ total
  return total, (w.astype(np.float64) @ total.T) * s.astype(np.float64)


def _tensors(seed, m, nb, b, out):
  rng = np.random.default_rng(seed)
  return {
    "boft_R": (0.3 * rng.standard_normal((m, nb, b, b))).astype(np.float32),
    "boft_s": (1 + 0.1 * rng.standard_normal((out, 1))).astype(np.float32),
  }


@pytest.mark.parametrize("m,kwargs", [(1, dict(boft_block_size=8)), (2, dict(boft_block_size=8)), (3, {})])
def test_forward_and_merge_match_numpy_and_peft(m, kwargs, fbd):
  n, out = 64, 24
  config = boft.BOFTConfig(boft_n_butterfly_factor=m, **kwargs)
  layer = _peft_linear(n, out, boft_n_butterfly_factor=m, **kwargs)
  rng = np.random.default_rng(m)
  w = (0.2 * rng.standard_normal((out, n))).astype(np.float32)
  x = rng.standard_normal((3, 5, n)).astype(np.float32)
  g = rng.standard_normal((3, 5, out)).astype(np.float32)  # a cotangent for the gradients
  nb, b = boft.layout(Q_NAME, n, config)
  t = _tensors(m, m, nb, b, out)
  with torch.no_grad():
    layer.base_layer.weight.copy_(torch.tensor(w))
    layer.boft_R["default"].copy_(torch.tensor(t["boft_R"]))
    layer.boft_s["default"].copy_(torch.tensor(t["boft_s"]))
  spec = ModuleSpec(Q_NAME, "linear", jnp.asarray(w))

  def jpeft_out(tensors):
    return boft.adapt_module(spec, tensors, config, {}, None)["weight"].matmul(jnp.asarray(x))

  ours = np.asarray(jpeft_out(t))
  xt = torch.tensor(x)
  theirs = layer(xt)
  (theirs * torch.tensor(g)).sum().backward()
  rot64, merged64 = _numpy_boft(t["boft_R"], t["boft_s"], w, boft.butterfly_perms(n, b, m))
  ref = (x.astype(np.float64) @ rot64 @ w.T.astype(np.float64)) * t["boft_s"][:, 0]
  assert_close_to_scale(ours, ref, LAYER_REL, what=f"m={m}: output vs float64")  # measured <= 2.2e-7
  assert_close_to_scale(ours, theirs.detach().numpy(), LAYER_REL, what=f"m={m}: output vs PEFT")  # <= 2.8e-7
  effect = np.abs(ref - x @ w.T).max() / np.abs(ref).max()
  assert effect > 0.1, effect  # the adapter is far from the identity: measured >= 1.17

  grads = jax.grad(lambda ts: jnp.sum(jpeft_out(ts) * g))({k: jnp.asarray(v) for k, v in t.items()})
  for k in ("boft_R", "boft_s"):
    peft_grad = getattr(layer, k)["default"].grad.numpy()
    assert_close_to_scale(np.asarray(grads[k]), peft_grad, LAYER_REL, what=f"m={m}: grad {k}")  # <= 2.8e-7

  merged = np.asarray(boft.adapt_module(spec, t, config, {}, None)["weight"].materialize())
  assert_close_to_scale(merged, merged64, LAYER_REL, what=f"m={m}: merged vs float64")  # measured <= 1.8e-7
  layer.merge()
  peft_merged = layer.base_layer.weight.detach().numpy()
  assert_close_to_scale(merged, peft_merged, LAYER_REL, what=f"m={m}: merged vs PEFT")  # measured <= 3.3e-7


def test_peft_on_a_cpu_computes_one_factor_whatever_the_config():
  # the quirk jpeft's checkpoint_config reads back: (1, nb, b, b) and P = I, under a config asking for 2 factors
  layer = _peft_linear(64, 8, boft_block_size=8, boft_n_butterfly_factor=2)
  assert tuple(layer.boft_R["default"].shape) == (1, 8, 8, 8)
  np.testing.assert_array_equal(layer.boft_P.numpy(), np.eye(64)[None])
  assert not layer.fbd_cuda_available


# ------------------------------------------------------------------------------------------------------------
# boft_dropout: PEFT's multiplicative block dropout with jpeft's draws injected


@pytest.mark.parametrize("m,seed", [(1, 0), (2, 1), (2, 2), (3, 3)])
def test_dropout_matches_peft_with_the_same_draws(m, seed, fbd, monkeypatch):
  n, out, p = 64, 16, 0.3
  kwargs = dict(boft_block_size=4, boft_n_butterfly_factor=m, boft_dropout=p)
  config = boft.BOFTConfig(**kwargs)
  layer = _peft_linear(n, out, **kwargs)
  nb, b = boft.layout(Q_NAME, n, config)
  t = _tensors(seed, m, nb, b, out)
  w = (0.2 * np.random.default_rng(seed).standard_normal((out, n))).astype(np.float32)
  with torch.no_grad():
    layer.base_layer.weight.copy_(torch.tensor(w))
    layer.boft_R["default"].copy_(torch.tensor(t["boft_R"]))
    layer.boft_s["default"].copy_(torch.tensor(t["boft_s"]))
  x = np.random.default_rng(seed + 10).standard_normal((4, n)).astype(np.float32)
  key = jax.random.key(seed)
  spec = ModuleSpec(Q_NAME, "linear", jnp.asarray(w))
  weight = boft.adapt_module(spec, t, config, {}, key)["weight"]
  ours = np.asarray(weight.matmul(jnp.asarray(x)))

  factor, perm = boft.block_dropout_draw(key, m, nb)
  dropped = np.asarray(perm) < int(p * nb)
  assert dropped.sum() == int(p * nb) == 4  # exactly int(p·nb) blocks, in one factor
  eye = np.broadcast_to(np.eye(b, dtype=np.float32), (nb, b, b))
  kept = np.asarray(boft.rotations(jnp.asarray(t["boft_R"])))
  np.testing.assert_array_equal(np.asarray(weight.rot)[int(factor)][dropped], eye[dropped])
  np.testing.assert_array_equal(np.delete(np.asarray(weight.rot), int(factor), 0), np.delete(kept, int(factor), 0))

  calls = []
  with monkeypatch.context() as patch, torch.no_grad():
    patch.setattr(torch, "randint", lambda *a, **k: calls.append("randint") or torch.tensor([int(factor)]))
    patch.setattr(torch, "randperm", lambda *a, **k: calls.append("randperm") or torch.tensor(np.asarray(perm)))
    theirs = layer.train()(torch.tensor(x)).numpy()
  assert calls == ["randint", "randperm"]
  assert_close_to_scale(ours, theirs, LAYER_REL, what=f"dropout m={m}")  # measured <= 2.9e-7
  with torch.no_grad():
    evaluated = layer.eval()(torch.tensor(x)).numpy()
  assert np.abs(evaluated - theirs).max() > 1e-2 * np.abs(theirs).max()  # the dropout did something: >= 0.34
  no_rng = boft.adapt_module(spec, t, config, {}, None)["weight"].matmul(jnp.asarray(x))
  assert_close_to_scale(np.asarray(no_rng), evaluated, LAYER_REL, what="eval: no dropout")  # measured <= 3.7e-7


# ------------------------------------------------------------------------------------------------------------
# The tiny model: factor > 1 round trips with PEFT's butterfly code, and PEFT's CPU checkpoints of factor > 1


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
  return make_tiny_llama(str(tmp_path_factory.mktemp("boft")), initializer_range=0.1)


BUTTERFLY = dict(
  peft_type="BOFT", boft_block_size=4, boft_n_butterfly_factor=3, target_modules=["q_proj", "v_proj", "down_proj"]
)


def _perturb(state, seed):
  rng = np.random.default_rng(seed)
  return {k: (v + 0.1 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in state.items()}


def _logits(backend, b):
  return backend.logits(b["input_ids"], b["attention_mask"])


def test_factor_above_one_round_trips_with_peft_s_butterfly(base_folder, tmp_path, fbd):
  jx, pt, pt2 = get_backend("jax"), get_backend("torch"), get_backend("torch")
  for x in (jx, pt, pt2):
    x.load_base(base_folder)
  b = make_batch(0, 2, 12, VOCAB)
  mask = b["attention_mask"].astype(bool)
  bare = _logits(pt, b)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    pt.attach_adapter(BUTTERFLY, seed=1)
  state = _perturb(pt.adapter_state_dict(), 2)
  assert state["base_model.model.model.layers.0.self_attn.q_proj.boft_R"].shape == (3, 16, 4, 4)
  pt.set_adapter_state_dict(state)
  pt.save_adapter(str(tmp_path / "peft"))
  jx.load_adapter(str(tmp_path / "peft"))
  ref = _logits(pt, b)
  assert np.abs(ref - bare)[mask].max() > 0.05 * np.abs(bare)[mask].max()  # measured 0.99
  assert_close_to_scale(_logits(jx, b), ref, LOGIT_REL, mask=mask, what="PEFT m=3 in jpeft")  # measured 8.6e-7

  jx.attach_adapter(BUTTERFLY, seed=3)
  jx.set_adapter_state_dict(_perturb(jx.adapter_state_dict(), 4))
  jx.save_adapter(str(tmp_path / "jpeft"))
  pt2.load_adapter(str(tmp_path / "jpeft"))
  assert_close_to_scale(_logits(pt2, b), _logits(jx, b), LOGIT_REL, mask=mask, what="jpeft m=3 in PEFT")  # 7.3e-7

  # merge == apply with the butterfly (the conformance tables run one factor only)
  model_config, params = load_model(base_folder)
  config = registry.config_from_dict(BUTTERFLY)
  adapter = jx.trainable
  merged = core.merge(params, adapter, config)
  applied = core.apply(params, adapter, config)
  ids, am = b["input_ids"], b["attention_mask"]
  merged_logits = np.asarray(forward(merged, model_config, ids, am))
  applied_logits = np.asarray(forward(applied, model_config, ids, am))
  assert_close_to_scale(merged_logits, applied_logits, LOGIT_REL, mask=mask, what="merge == apply")  # 8.6e-7


def test_jpeft_factor_above_one_does_not_load_in_peft_on_a_cpu(base_folder, tmp_path):
  jx, pt = get_backend("jax"), get_backend("torch")
  for x in (jx, pt):
    x.load_base(base_folder)
  jx.attach_adapter(BUTTERFLY, seed=0)
  jx.save_adapter(str(tmp_path))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    with pytest.raises(RuntimeError, match=r"size mismatch for .*q_proj.boft_R.*\[3, 16, 4, 4\].*\[1, 16, 4, 4\]"):
      pt.load_adapter(str(tmp_path))


def test_peft_cpu_checkpoint_of_factor_above_one_loads_as_one_factor(base_folder, tmp_path, caplog):
  jx, pt = get_backend("jax"), get_backend("torch")
  for x in (jx, pt):
    x.load_base(base_folder)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    pt.attach_adapter(BUTTERFLY, seed=5)  # no fbd_cuda: one factor
  pt.set_adapter_state_dict(_perturb(pt.adapter_state_dict(), 6))
  pt.save_adapter(str(tmp_path))
  with open(os.path.join(tmp_path, "adapter_config.json")) as f:
    assert json.load(f)["boft_n_butterfly_factor"] == 3  # the config keeps the factor asked for
  caplog.set_level(logging.WARNING, logger="absl")
  jx.load_adapter(str(tmp_path))
  assert "asks for boft_n_butterfly_factor=3, but every boft_R holds one butterfly factor" in caplog.text
  assert "jpeft loads it as what PEFT computed with it: boft_n_butterfly_factor=1" in caplog.text
  assert jx.peft_config.boft_n_butterfly_factor == 1
  assert jx.adapter_state_dict()["base_model.model.model.layers.1.mlp.down_proj.boft_R"].shape == (1, 32, 4, 4)
  b = make_batch(1, 2, 12, VOCAB)
  mask = b["attention_mask"].astype(bool)
  assert_close_to_scale(_logits(jx, b), _logits(pt, b), LOGIT_REL, mask=mask, what="CPU m=3 checkpoint")  # 7.2e-7
  caplog.clear()
  jx.save_adapter(str(tmp_path / "again"))  # saved as what it is: one factor
  jx.load_adapter(str(tmp_path / "again"))
  assert caplog.text == ""


# ------------------------------------------------------------------------------------------------------------
# Bad input and init


def test_bad_adapter_tensors_are_refused():
  config = boft.BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=2)
  spec = ModuleSpec(Q_NAME, "linear", jnp.zeros((64, 64)))
  good = boft.init_module(jax.random.key(0), spec, config)
  with pytest.raises(config_lib.AdapterCheckpointError, match=r"q_proj: `boft_R` has shape \(1, 8, 8, 8\).*made wit"):
    boft.adapt_module(spec, {**good, "boft_R": jnp.zeros((1, 8, 8, 8))}, config, {}, None)
  with pytest.raises(config_lib.AdapterCheckpointError, match=r"`boft_s` has shape \(32, 1\).*shape \(64, 1\)"):
    boft.adapt_module(spec, {**good, "boft_s": jnp.ones((32, 1))}, config, {}, None)
  with pytest.raises(config_lib.AdapterCheckpointError, match=r"holds \['boft_R'\]; expected \['boft_R', 'boft_s'\]"):
    boft.adapt_module(spec, {"boft_R": good["boft_R"]}, config, {}, None)


def test_non_linear_targets_are_refused_like_peft(base_folder):
  model_config, params = load_model(base_folder)
  config = registry.config_from_dict(dict(peft_type="BOFT", target_modules=["embed_tokens", "q_proj"]))
  with pytest.raises(UnsupportedTargetError, match="'model.embed_tokens' is a .* which BOFT does not support"):
    core.init(jax.random.key(0), params, config, model_config)
  pt = get_backend("torch")
  pt.load_base(base_folder)
  with pytest.raises(TypeError, match="only `torch.nn.Linear` and `torch.nn.Conv2d`"):
    pt.attach_adapter(dict(peft_type="BOFT", target_modules=["embed_tokens", "q_proj"]))


def test_layout_errors_on_the_model_name_the_module(base_folder):
  model_config, params = load_model(base_folder)
  # boft_block_num=3 divides neither 64 (q_proj) nor 128 (down_proj); PEFT: the same message at get_peft_model
  config = registry.config_from_dict(dict(peft_type="BOFT", boft_block_size=0, boft_block_num=3))
  with pytest.raises(config_lib.InvalidConfigError, match=r"q_proj: in_features \(64\) must be divisible by boft_bl"):
    core.init(jax.random.key(0), params, config, model_config)


def test_init():
  spec = ModuleSpec(Q_NAME, "linear", jnp.zeros((32, 64)))
  fresh = boft.init_module(jax.random.key(0), spec, boft.BOFTConfig(boft_n_butterfly_factor=2))
  np.testing.assert_array_equal(np.asarray(fresh["boft_R"]), np.zeros((2, 16, 4, 4)))
  np.testing.assert_array_equal(np.asarray(fresh["boft_s"]), np.ones((32, 1)))
  config = boft.BOFTConfig(init_weights=False, boft_block_size=8)
  value = boft.init_module(jax.random.key(0), ModuleSpec(Q_NAME, "linear", jnp.zeros((1024, 64))), config)
  # PEFT: R ~ N(0, 0.1²) (512 entries), s ~ N(1, 0.1²) (1024 entries: the mean has a std of 0.003)
  assert 0.09 < float(jnp.std(value["boft_R"])) < 0.11  # measured 0.100
  assert 0.09 < float(jnp.std(value["boft_s"])) < 0.11 and 0.985 < float(jnp.mean(value["boft_s"])) < 1.015
  assert not boft.BOFT.identity_at_init(config) and boft.BOFT.identity_at_init(boft.BOFTConfig())
