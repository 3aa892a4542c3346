"""MiSS beyond the method table: config and shape errors against PEFT's, the three variants' formulas and merges
against PEFT's ``MissLinear`` and a float64 NumPy reference (the zero-padded fold, mini's tiling, bat's block-affine
map), bat's bf16 path, its unmergeability, ``miss_dropout`` and bad adapters.

Dropout is checked with the randomness made explicit: jpeft draws ``keep = jax.random.bernoulli(rng, 1 - p, shape)``
over the zero-padded input (``jpeft.methods.base.dropout``); the tests draw that very mask from the same key and
give it to PEFT by replacing ``miss_dropout["default"]`` (an ``nn.Dropout``) with ``FixedMaskDropout``, at the
layer level and on the whole tiny Llama (every module's mask from the train step's key).

Float bounds are relative to the compared tensor's largest entry (``numerics.assert_close_to_scale``); measured values
(default CPU kernels, ``--xla_cpu_max_isa=AVX2`` and one core agree to 2 digits) are next to each bound. A layer
output entry is a sum of at most in + r float32 products (in <= 96): measured worst 3.2e-7 = 2.7 eps; bound
LAYER_REL = 8 eps (as tests/test_dropout_parity.py). A formula error (a wrong fold, tiling or block orientation)
moves outputs by > 1e-2 of their scale.
"""

import copy
import logging
import os
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from peft.tuners.miss.layer import MissLinear
from torch import nn

from backends import get_backend
from backends.tiny import make_batch
from jpeft import core, registry, train
from jpeft.config import AdapterCheckpointError, ConfigTypeError, InvalidConfigError
from jpeft.methods import miss
from jpeft.methods.base import ModuleSpec, base_matmul
from jpeft.targets import UnsupportedTargetError
from numerics import EPS32, assert_close_to_scale, scaled_error
from test_dropout_parity import FixedMaskDropout

from method_table import VOCAB

LAYER_REL = 8 * EPS32
# Model level (test_parity's bounds, same model and batch size)
LOGIT_REL = 32 * EPS32
LOSS_REL = 16 * EPS32
GRAD_REL = 1e-5
RATE = 0.3
Q = "model.layers.0.self_attn.q_proj"


def _report(what, value, bound):
  if os.environ.get("JPEFT_PRINT_ERRORS"):
    print(f"[measured] {what}: {value:.3g} (bound {bound:.3g})")


def _peft_model(torch_base, **kw):
  return peft.get_peft_model(copy.deepcopy(torch_base), peft.MissConfig(**kw))


def _peft_error(torch_base, kw):
  """PEFT's error for ``kw``: at config construction or when the adapter is built (``update_layer``, ``bias``)."""
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      _peft_model(torch_base, **kw)
  except Exception as e:  # noqa: BLE001 -- ValueError, TypeError, ZeroDivisionError, NotImplementedError
    return e
  return None


def _jpeft_error(jax_model, kw):
  """jpeft's error for ``kw``: at config construction or when the adapter is initialised."""
  config, params = jax_model
  try:
    core.init(jax.random.key(0), params, registry.config_from_dict(dict(peft_type="MISS", **kw)), config)
  except Exception as e:  # noqa: BLE001
    return e
  return None


# ------------------------------------------------------------------------------------------------------------
# Config and shape errors against PEFT's


@pytest.mark.parametrize(
  "kw,error,words",
  [
    (dict(r=0), InvalidConfigError, r"`r` should be a positive integer value but the value passed is 0"),
    (dict(r=-4), InvalidConfigError, r"`r` should be a positive integer value but the value passed is -4"),
    (dict(r=4.0), ConfigTypeError, r"`r`"),
    (dict(r="4"), ConfigTypeError, r"`r`"),
    (dict(r=65), InvalidConfigError, r"q_proj: `r` \(65\) must be less than or equal to in_features \(64\)"),
    (dict(miss_dropout=1.5), InvalidConfigError, r"`miss_dropout`"),
    (dict(bias="some"), InvalidConfigError, r"Requested bias: 'some', is not implemented"),
    (dict(init_weights="bat", r=24), InvalidConfigError, r"q_proj: The weight matrix must be fully divisible"),
    (dict(init_weights="bat", r=64, target_modules=["v_proj"]), InvalidConfigError, r"v_proj: .*divisible.*32x64"),
    (dict(init_weights="mini", mini_r=3), InvalidConfigError, r"q_proj: .*out_features \(64\) must be divisible by"),
    (dict(init_weights="mini", mini_r=0), InvalidConfigError, r"`mini_r` should be a positive integer"),
    (dict(layers_to_transform=[0], target_modules=".*q_proj"), InvalidConfigError, r"`layers_to_transform` cannot"),
    (dict(target_modules=["embed_tokens"]), UnsupportedTargetError, r"embed_tokens.*MISS does not support"),
  ],
)
def test_errors_are_pefts(kw, error, words, torch_base, jax_model):
  full = dict(dict(r=16, target_modules=["q_proj"]), **kw)
  assert _peft_error(torch_base, full) is not None
  got = _jpeft_error(jax_model, full)
  assert isinstance(got, error) and re.search(words, str(got)), repr(got)


@pytest.mark.parametrize(
  "kw",
  [
    dict(),
    dict(r=64, init_weights="bat", target_modules=["q_proj", "o_proj"]),  # one block row and column per 64
    dict(r=8, init_weights="mini", mini_r=32, target_modules=["v_proj"]),  # mini_r = out: the default variant
    dict(r=1, init_weights=False, mini_r=0),  # mini_r only matters with "mini"
    dict(r=24, miss_dropout=0.5, bias="MiSS_only"),  # PEFT accepts any "<x>_only"
    dict(r=16, bias="all", init_weights="bat", miss_dropout=0.2),
  ],
)
def test_config_values_peft_accepts(kw, torch_base, jax_model):
  full = dict(dict(r=16, target_modules=["q_proj"]), **kw)
  assert _peft_error(torch_base, full) is None
  assert _jpeft_error(jax_model, full) is None
  ours, theirs = registry.config_from_dict(dict(peft_type="MISS", **full)), peft.MissConfig(**full)
  for k in ("r", "mini_r", "init_weights", "miss_dropout", "bias"):
    assert getattr(ours, k) == getattr(theirs, k), k


def test_divergences_from_peft_are_refusals(torch_base, jax_model):
  """PEFT runs the default variant for any other truthy ``init_weights`` string and silently disables a negative
  dropout (``p > 0`` picks nn.Dropout); jpeft refuses both rather than compute something the config does not say."""
  for kw, field in ((dict(init_weights="BAT"), "init_weights"), (dict(miss_dropout=-0.1), "miss_dropout")):
    full = dict(dict(r=16, target_modules=["q_proj"]), **kw)
    assert _peft_error(torch_base, full) is None
    with pytest.raises(InvalidConfigError, match=f"`{field}`"):
      registry.config_from_dict(dict(peft_type="MISS", **full))
  layer = _peft_model(torch_base, r=16, target_modules=["q_proj"], init_weights="BAT").base_model.model
  assert tuple(layer.model.layers[0].self_attn.q_proj.miss_block["default"].shape) == (16, 64)  # the default's


def test_bat_dropout_warns_that_it_has_no_effect(caplog):
  caplog.set_level(logging.WARNING, logger="absl")
  miss.MissConfig(init_weights="bat", miss_dropout=0.1)
  assert "no effect with init_weights='bat'" in caplog.text
  caplog.clear()
  miss.MissConfig(init_weights="mini", miss_dropout=0.1)
  miss.MissConfig(init_weights="bat")
  assert caplog.text == ""


def test_init_shapes_and_values_are_pefts(torch_base, jax_model):
  """Zeros in PEFT's three shapes; ``init_weights=False``: kaiming_uniform(a=√5) of (r, out), bound 1/√out."""
  config, params = jax_model
  for kw, shape in (
    (dict(), (16, 64)),
    (dict(init_weights="bat"), (4, 16, 16)),
    (dict(init_weights="mini", mini_r=8), (16, 8)),
    (dict(init_weights=False), (16, 64)),
  ):
    full = dict(r=16, target_modules=["q_proj"], **kw)
    theirs = _peft_model(torch_base, **full).base_model.model.model.layers[0].self_attn.q_proj.miss_block["default"]
    peft_config = registry.config_from_dict(dict(peft_type="MISS", **full))
    ours = np.asarray(core.init(jax.random.key(0), params, peft_config, config)[0][Q]["miss_block"])
    assert ours.shape == tuple(theirs.shape) == shape
    if kw.get("init_weights", True) is False:
      bound = 1 / np.sqrt(64)
      for values in (ours, theirs.detach().numpy()):
        assert np.abs(values).max() <= bound and np.abs(values).max() > 0.9 * bound
        assert abs(values.std() - bound / np.sqrt(3)) < 0.1 * bound  # U(±b) has std b/√3
      assert not registry.get_method("MISS").identity_at_init(peft_config)
    else:
      assert not ours.any() and not theirs.detach().numpy().any()
      assert registry.get_method("MISS").identity_at_init(peft_config)


# ------------------------------------------------------------------------------------------------------------
# Layer level: formulas and merges against PEFT's MissLinear and float64 NumPy


def _numpy_update(w, m, mode, r):
  """float64 ``W' − W``: ``M_full[i mod r, o]`` (default/mini) or ``W_blk M[bo] + M[bo]`` per r×r block (bat)."""
  out_f, in_f = w.shape
  if mode == "bat":
    delta = np.zeros_like(w)
    for bo in range(out_f // r):
      for bi in range(in_f // r):
        blk = w[bo * r : (bo + 1) * r, bi * r : (bi + 1) * r]
        delta[bo * r : (bo + 1) * r, bi * r : (bi + 1) * r] = blk @ m[bo] + m[bo]
    return delta
  full = np.tile(m, (1, out_f // m.shape[1]))  # torch's repeat(1, out / mini_r)
  return np.array([[full[i % r, o] for i in range(in_f)] for o in range(out_f)])


def _layer(mode, out_f, in_f, r, mini_r=1, seed=0, base_dtype=np.float32):
  rng = np.random.default_rng(seed)
  w = (rng.standard_normal((out_f, in_f)) / np.sqrt(in_f)).astype(base_dtype)
  shape = {"bat": (out_f // r, r, r), "mini": (r, mini_r)}.get(mode, (r, out_f))
  m = (0.2 * rng.standard_normal(shape)).astype(np.float32)
  x = rng.standard_normal((3, 5, in_f)).astype(np.float32)
  g = rng.standard_normal((3, 5, out_f)).astype(np.float32)
  return w, m, x, g


def _peft_layer(w, m, mode, r, mini_r=1, dropout=0.0):
  base = nn.Linear(w.shape[1], w.shape[0], bias=False)
  with torch.no_grad():
    base.weight.copy_(torch.as_tensor(np.asarray(w, np.float32)))
  init = {"default": True}.get(mode, mode)
  layer = MissLinear(
    base, "default", config=peft.MissConfig(r=r, mini_r=mini_r, init_weights=init, miss_dropout=dropout), r=r
  )
  with torch.no_grad():
    layer.miss_block["default"].copy_(torch.as_tensor(m))
  return layer


def _jpeft_weight(w, m, mode, dropout=0.0, rng=None):
  if mode == "bat":
    return miss.MissBatWeight(jnp.asarray(w), jnp.asarray(m))
  return miss.MissWeight(jnp.asarray(w), jnp.asarray(m), dropout=dropout, rng=rng)


LAYERS = {
  "default": ("default", 32, 64, 16, 1),
  "default-padded": ("default", 48, 40, 12, 1),  # 40 = 3·12 + 4: the last shard has 4 inputs (padded to 12)
  "default-r-is-in": ("default", 16, 24, 24, 1),
  "mini": ("mini", 48, 64, 8, 4),
  "mini-padded": ("mini", 24, 30, 8, 6),
  "bat": ("bat", 48, 32, 8, 1),  # out > in: 6 block rows, 4 block columns
  "bat-wide": ("bat", 16, 96, 16, 1),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_forward_merge_and_gradient_match_peft_and_numpy(name):
  mode, out_f, in_f, r, mini_r = LAYERS[name]
  w, m, x, g = _layer(mode, out_f, in_f, r, mini_r)
  update = _numpy_update(w.astype(np.float64), m.astype(np.float64), mode, r)
  y_np = x.astype(np.float64) @ (w + update).T

  layer = _peft_layer(w, m, mode, r, mini_r)
  y_pt = layer(torch.as_tensor(x))
  (y_pt * torch.as_tensor(g)).sum().backward()
  grad_pt = layer.miss_block["default"].grad.numpy()

  def out(block):
    return _jpeft_weight(w, block, mode).matmul(jnp.asarray(x))

  y_jx = np.asarray(out(jnp.asarray(m)))
  grad_jx = np.asarray(jax.grad(lambda b: jnp.sum(out(b) * g))(jnp.asarray(m)))
  assert_close_to_scale(y_jx, y_np, LAYER_REL, what=f"{name}: jpeft vs numpy")  # measured <= 3.2e-7
  assert_close_to_scale(y_jx, y_pt.detach().numpy(), LAYER_REL, what=f"{name}: jpeft vs PEFT")  # <= 1.8e-7
  assert_close_to_scale(grad_jx, grad_pt, LAYER_REL, what=f"{name}: gradient vs PEFT")  # <= 1.3e-7
  assert scaled_error(x @ w.T, y_np) > 1e-2  # the adapter matters

  # merge: PEFT's merged weight, jpeft's materialize() (and delta() for the additive variants)
  layer.merge()
  merged_pt = layer.get_base_weight().detach().numpy()
  weight = _jpeft_weight(w, m, mode)
  assert_close_to_scale(
    np.asarray(weight.materialize()), merged_pt, LAYER_REL, what=f"{name}: merged vs PEFT"
  )  # measured <= 1.2e-7
  assert_close_to_scale(merged_pt, w + update, LAYER_REL, what=f"{name}: PEFT merged vs numpy")  # <= 8.1e-8
  assert hasattr(weight, "delta") == (mode != "bat")
  if mode != "bat":
    np.testing.assert_array_equal(np.asarray(weight.delta()), update.astype(np.float32))  # a copy of M's entries


def test_bat_is_not_additive_so_jpeft_does_not_unmerge_by_subtraction():
  """bat's update depends on W: recomputed from the merged W' it is another matrix, so ``W' − update(W')`` is not
  W (by ~|M|·|W|). PEFT's unmerge inverts ``(W' − M)(I + M)⁻¹`` instead; jpeft keeps the base params."""
  w, m, _, _ = _layer("bat", 32, 32, 8, seed=1)
  merged = np.asarray(miss.MissBatWeight(jnp.asarray(w), jnp.asarray(m)).materialize())
  wrong = merged - (np.asarray(miss.MissBatWeight(jnp.asarray(merged), jnp.asarray(m)).materialize()) - merged)
  _report("bat: W' − update(W') vs W", scaled_error(wrong, w), 1e-2)  # measured 0.89
  assert scaled_error(wrong, w) > 1e-2
  layer = _peft_layer(w, m, "bat", 8)
  layer.merge()
  layer.unmerge()
  assert_close_to_scale(layer.get_base_weight().detach().numpy(), w, 16 * EPS32, what="PEFT bat unmerge")  # 2.3e-7


def test_bat_over_a_bf16_base_computes_in_fp32_like_peft():
  """PEFT: ``W' = W.float() + update`` (fp32, from the fp32 block), the bf16 input cast up, one fp32 matmul, the
  output rounded to bf16. Rounding W' to bf16 first (the base dtype) would lose the update's low bits."""
  w, m, x, _ = _layer("bat", 32, 64, 16, seed=2)
  w16 = torch.as_tensor(w).to(torch.bfloat16)
  x16 = torch.as_tensor(x).to(torch.bfloat16)
  base = nn.Linear(64, 32, bias=False).to(torch.bfloat16)
  with torch.no_grad():
    base.weight.copy_(w16)
  layer = MissLinear(base, "default", config=peft.MissConfig(r=16, init_weights="bat"), r=16)
  layer.miss_block["default"].data = torch.as_tensor(m)  # autocast_adapter_dtype keeps the block in fp32
  with torch.no_grad():
    theirs = layer(x16)
  assert theirs.dtype == torch.bfloat16
  theirs = theirs.float().numpy()
  w_bf16 = jnp.asarray(w16.float().numpy()).astype(jnp.bfloat16)
  x_bf16 = jnp.asarray(x16.float().numpy()).astype(jnp.bfloat16)
  ours = miss.MissBatWeight(w_bf16, jnp.asarray(m)).matmul(x_bf16)
  assert ours.dtype == jnp.bfloat16
  # Both round the same fp32 sums to bf16, so outputs are equal but where a reordered fp32 sum lands across a bf16
  # rounding boundary: measured share equal 1.0 (bound 0.95). W' rounded to bf16 first gives 0.59, one ulp at most
  # (0.0033 of the scale), which a scale-relative bound of one bf16 ulp could not tell apart.
  assert_close_to_scale(np.asarray(ours, np.float32), theirs, 2.0**-7, what="bat bf16 vs PEFT")  # measured 0
  share = np.mean(np.asarray(ours, np.float32) == theirs)
  _report("bat bf16: share of outputs equal to PEFT's", share, 0.95)
  assert share >= 0.95
  rounded = miss.MissBatWeight(w_bf16, jnp.asarray(m)).materialize()  # W' in bf16
  in_bf16 = np.asarray(base_matmul(x_bf16, rounded, jnp.bfloat16), np.float32)
  _report("bat bf16: share equal with W' rounded first", np.mean(in_bf16 == theirs), 0.95)
  assert np.mean(in_bf16 == theirs) < 0.95
  merged16 = miss.MissBatWeight(w_bf16, jnp.asarray(m)).materialize()
  assert merged16.dtype == jnp.bfloat16  # merging rounds W' to the base dtype, as PEFT's in-place add
  layer.merge()
  np.testing.assert_array_equal(np.asarray(merged16, np.float32), layer.get_base_weight().float().numpy())


# ------------------------------------------------------------------------------------------------------------
# miss_dropout: jpeft's mask injected into PEFT


def _keep(rng, shape):
  """The mask ``jpeft.methods.base.dropout`` draws: the same call on the same key."""
  return np.array(jax.random.bernoulli(rng, 1.0 - RATE, shape))


@pytest.mark.parametrize("name", ["default-padded", "mini-padded", "bat"])
def test_layer_dropout_matches_peft_with_jpeft_mask(name):
  mode, out_f, in_f, r, mini_r = LAYERS[name]
  w, m, x, g = _layer(mode, out_f, in_f, r, mini_r, seed=3)
  key = jax.random.key(7)
  padded = x.shape[:-1] + (in_f + (-in_f % r),)
  keep = _keep(key, padded)
  assert 0.5 < keep.mean() < 0.9

  layer = _peft_layer(w, m, mode, r, mini_r, dropout=RATE)
  assert isinstance(layer.miss_dropout["default"], nn.Dropout)
  mask = FixedMaskDropout(keep, RATE)
  layer.miss_dropout["default"] = mask
  layer.train()
  y_pt = layer(torch.as_tensor(x))
  (y_pt * torch.as_tensor(g)).sum().backward()
  assert mask.calls == (0 if mode == "bat" else 1)  # PEFT's bat forward applies no dropout

  def out(block, rng):
    return _jpeft_weight(w, block, mode, RATE, rng).matmul(jnp.asarray(x))

  y_jx = np.asarray(out(jnp.asarray(m), key))
  grad = np.asarray(jax.grad(lambda b: jnp.sum(out(b, key) * g))(jnp.asarray(m)))
  assert_close_to_scale(y_jx, y_pt.detach().numpy(), LAYER_REL, what=f"{name} dropout: output")  # <= 1.5e-7
  assert_close_to_scale(grad, layer.miss_block["default"].grad.numpy(), LAYER_REL, what=f"{name} dropout: grad")
  effect = scaled_error(np.asarray(out(jnp.asarray(m), None)), y_jx)
  if mode == "bat":
    assert effect == 0
  else:
    _report(f"{name}: dropout effect", effect, 1e-2)  # measured 0.61 / 0.32
    assert effect > 1e-2


def test_model_dropout_matches_peft_with_jpeft_masks(folder):
  """The whole tiny Llama in train mode (padded r = 24 on q and down): PEFT gets, per module, the mask jpeft draws
  from the step's key; the loss and every gradient match (measured loss 8e-8, gradients <= 1.1e-6; dropout moves the loss by 0.019)."""
  cfg = dict(peft_type="MISS", r=24, miss_dropout=RATE, target_modules=["q_proj", "down_proj"])
  jx, pt = get_backend("jax"), get_backend("torch")
  for b in (jx, pt):
    b.load_base(folder)
  pt.attach_adapter(cfg, seed=0)
  rng = np.random.default_rng(1)
  state = {k: (0.05 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in pt.adapter_state_dict().items()}
  pt.set_adapter_state_dict(state)
  jx.attach_adapter(cfg, seed=0)
  jx.set_adapter_state_dict(state)
  b = make_batch(7, 3, 16, VOCAB)
  key = jax.random.key(11)

  @jax.jit
  def module_keys(adapter, params, key):  # the per-module keys the jitted train step hands out
    adapted = core.apply(params, adapter, jx.peft_config, rng=key)
    return {n: adapted[n + ".weight"].rng for n in adapter}

  masks = {}
  for name, k in module_keys(jx.trainable, jx.params, key).items():
    in_f = jx.params[name + ".weight"].shape[1]
    masks[name] = FixedMaskDropout(_keep(k, b["input_ids"].shape + (in_f + (-in_f % 24),)), RATE)
    module = pt.model.get_submodule("base_model.model." + name)
    module.miss_dropout["default"] = masks[name]
  batch = {k: jnp.asarray(v, jnp.int32) for k, v in b.items()}
  grad_fn = train.make_grad_fn(jx.model_config, jx.peft_config)
  loss_jx, grads = grad_fn(jx.trainable, jx.params, batch, key)
  loss_pt, g_pt = pt.loss_and_grads(b["input_ids"], b["attention_mask"], b["labels"])
  assert all(m.calls == 1 for m in masks.values())
  assert_close_to_scale(np.float64(loss_jx), np.float64(loss_pt), LOSS_REL, what="miss dropout: loss")
  g_jx = {k: np.asarray(v) for k, v in core.to_state_dict(grads).items()}
  assert set(g_jx) == set(g_pt)
  for k in g_pt:
    assert_close_to_scale(g_jx[k], g_pt[k], GRAD_REL, what=f"miss dropout: gradient {k}")
  loss_eval = float(grad_fn(jx.trainable, jx.params, batch, None)[0])
  _report("model: dropout effect on the loss", abs(loss_eval - float(loss_jx)) / abs(float(loss_pt)), 100 * LOSS_REL)
  assert abs(loss_eval - float(loss_jx)) >= 100 * LOSS_REL * abs(float(loss_pt))


# ------------------------------------------------------------------------------------------------------------
# Bad adapters


def test_bad_adapter_entries_are_refused():
  spec = ModuleSpec(Q, "linear", jnp.zeros((64, 64)))
  bat = miss.MissConfig(r=16, init_weights="bat")
  with pytest.raises(AdapterCheckpointError, match=r"q_proj.*float32\[16, 64\].*init_weights='bat'.*\[4, 16, 16\]"):
    miss.adapt_module(spec, {"miss_block": jnp.zeros((16, 64))}, bat, {}, None)  # a default-variant block
  with pytest.raises(AdapterCheckpointError, match=r"int32\[16, 64\]"):
    miss.adapt_module(spec, {"miss_block": jnp.zeros((16, 64), jnp.int32)}, miss.MissConfig(r=16), {}, None)
  with pytest.raises(AdapterCheckpointError, match=r"holds \['lora_A.weight'\]; expected \['miss_block'\]"):
    miss.adapt_module(spec, {"lora_A.weight": jnp.zeros((16, 64))}, miss.MissConfig(r=16), {}, None)
  embedding = ModuleSpec("model.embed_tokens", "embedding", jnp.zeros((256, 64)))
  with pytest.raises(UnsupportedTargetError, match="embed_tokens"):
    miss.init_module(jax.random.key(0), embedding, miss.MissConfig(r=16))


def test_tensor_axes():
  method = registry.get_method("MISS")
  assert method.tensor_axes("miss_block", "linear", miss.MissConfig()) == (None, 0)  # (r, out)
  assert method.tensor_axes("miss_block", "linear", miss.MissConfig(init_weights="mini")) is None
  assert method.tensor_axes("miss_block", "linear", miss.MissConfig(init_weights="bat")) is None
