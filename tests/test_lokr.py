"""LoKr beyond the method table: PEFT's ``factorization`` and factor layout, its inits and config errors, the layer
against PEFT and float64 NumPy (eval and train mode, with and without ``rank_dropout_scale``), merge, bad adapters.

Train-mode draws are made explicit as in tests/test_loha.py (same helpers): the uniforms jpeft draws from each
module's key are handed to PEFT through ``torch.rand``, so both apply the same masks.

Integer layouts (``factorization``, which factors are full, the tensor shapes) are compared exactly. Bounds on floats
(relative to scale, ``numerics``), measured with XLA's default CPU kernels, ``--xla_cpu_max_isa=AVX2`` and one core
(the same to 3 digits): layer outputs and gradients, sums of ~in float32 products (jpeft never forms ΔW, PEFT does):
worst 3.93e-7 = 3.3 eps against float64 NumPy and PEFT (bound 8 eps). Merged weights (one product per entry plus the
base): measured 0 (bound 8 eps). Model level in train mode: test_parity's bounds; measured loss 8.2e-8, gradients
2.5e-6; dropout moves the loss by 1.1e-3 relative (bound 1.9e-4).
"""

import copy
import logging

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from peft.tuners.lokr.layer import Linear as PeftLoKrLinear
from peft.tuners.lokr.layer import factorization as peft_factorization

from jpeft import core, registry
from jpeft.config import AdapterCheckpointError, ConfigTypeError, InvalidConfigError
from jpeft.methods import lokr
from jpeft.methods.base import ModuleSpec
from numerics import EPS32, assert_close_to_scale, scaled_error
from test_loha import InjectedRand, jax_uniforms, model_dropout_matches_peft

from method_table import METHODS

LAYER_REL = 8 * EPS32
MIN_EFFECT = 1e-2
ALPHA = 6


# ------------------------------------------------------------------------------------------------------------
# The factor layout


def test_factorization_is_pefts():
  factors = list(range(-4, 40)) + [64, 100, 128, 577]
  for d in range(1, 330):
    for f in factors:
      assert lokr.factorization(d, f) == peft_factorization(d, f), (d, f)
  for d in (576, 1536, 192, 2048, 4096, 11008):  # SmolLM2 / Llama widths
    assert lokr.factorization(d, -1) == peft_factorization(d, -1), d
  assert lokr.factorization(64, 32) == (32, 2)  # f > √d dividing d: not reordered


def _peft_layer(in_dim, out_dim, **kw):
  r, alpha = kw.pop("r", 4), kw.pop("alpha", ALPHA)
  base = torch.nn.Linear(in_dim, out_dim, bias=False)
  return PeftLoKrLinear(base, "default", config=peft.LoKrConfig(r=r, alpha=alpha, **kw), r=r, alpha=alpha)


def _peft_tensors(module) -> dict:
  return {n: getattr(module, n)["default"].detach().numpy() for n in module.adapter_layer_names if getattr(module, n)}


def _config(**kw):
  return registry.config_from_dict(dict(peft_type="LOKR", target_modules=["lin"], **{"alpha": ALPHA, **kw}))


@pytest.mark.parametrize("decompose_both", [False, True])
@pytest.mark.parametrize("factor", [-1, 0, -3, 3, 4, 8, 32])
def test_tensor_shapes_are_pefts(decompose_both, factor):
  """Which factors are full and every shape (``init_module`` draws ``_shapes``; test_inits_are_pefts checks that), over weights with prime, square and oblong dimensions and ranks around
  the ``r < max / 2`` thresholds."""
  for in_dim, out_dim in ((64, 64), (64, 32), (128, 64), (576, 192), (97, 64), (12, 1)):
    for r in (1, 2, 3, 4, 8, 64):
      kw = dict(r=r, decompose_both=decompose_both, decompose_factor=factor)
      theirs = {n: t.shape for n, t in _peft_tensors(_peft_layer(in_dim, out_dim, **kw)).items()}
      spec = ModuleSpec("lin", "linear", np.zeros((out_dim, in_dim), np.float32))
      assert lokr._shapes(spec, _config(**kw)) == theirs, (in_dim, out_dim, kw)  # what init_module draws


@pytest.mark.parametrize("init", [True, "lycoris", False])
@pytest.mark.parametrize("layout", ["full", "w2-factored", "both-factored"])
def test_inits_are_pefts(init, layout):
  """The same tensors are zero as in PEFT; the others follow U(±1/√fan_in) (PEFT's kaiming_uniform(a=√5))."""
  kw = {"full": dict(r=8), "w2-factored": dict(r=2), "both-factored": dict(r=1, decompose_both=True)}[layout]
  kw = dict(kw, init_weights=init)
  theirs = _peft_tensors(_peft_layer(128, 64, **kw))
  spec = ModuleSpec("lin", "linear", jnp.zeros((64, 128)))
  config = _config(**kw)
  ours = {n: np.asarray(t) for n, t in lokr.init_module(jax.random.key(0), spec, config).items()}
  assert set(ours) == set(theirs)
  for n, v in ours.items():
    assert (not v.any()) == (not theirs[n].any()), n
    if v.any():
      bound = 1 / np.sqrt(v.shape[1])
      assert bound >= np.abs(v).max() > 0.6 * bound and np.abs(theirs[n]).max() <= bound, n
  assert registry.get_method("LOKR").identity_at_init(config) == (init is not False)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 128)), jnp.float32)
  weight = lokr.adapt_module(spec, ours, config, {}, None)["weight"]
  assert (np.abs(np.asarray(weight.matmul(x))).max() == 0) == (init is not False)


# ------------------------------------------------------------------------------------------------------------
# Layer level: jpeft vs PEFT's lokr.Linear vs float64 NumPy

IN, OUT = 24, 16  # in (4, 6), out (4, 4)
LAYOUTS = {"full": dict(r=8), "factored": dict(r=1, decompose_both=True)}


@pytest.fixture(scope="module")
def layers():
  out = {}
  for name, kw in LAYOUTS.items():
    rng = np.random.default_rng(len(name))
    shapes = {n: t.shape for n, t in _peft_tensors(_peft_layer(IN, OUT, **kw)).items()}
    t = {n: (rng.standard_normal(s) / np.sqrt(s[1])).astype(np.float32) for n, s in shapes.items()}
    out[name] = dict(
      kw=kw,
      w=(rng.standard_normal((OUT, IN)) / np.sqrt(IN)).astype(np.float32),
      t=t,
      x=rng.standard_normal((3, 5, IN)).astype(np.float32),
      g=rng.standard_normal((3, 5, OUT)).astype(np.float32),
    )
  return out


def _numpy(p, keep_module=True, row_mask=None):
  """float64 output and factor gradients of ``Σ y ⊙ g`` with ``ΔW = s · kron(w1, w2)`` formed explicitly."""
  t = {k: v.astype(np.float64) for k, v in p["t"].items()}
  w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
  w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
  s = ALPHA / p["kw"]["r"]
  m = (np.ones(OUT) if row_mask is None else row_mask) * float(keep_module)
  x, g = p["x"].reshape(-1, IN).astype(np.float64), p["g"].reshape(-1, OUT).astype(np.float64)
  y = x @ p["w"].astype(np.float64).T + x @ (s * np.kron(w1, w2) * m[:, None]).T
  gw = (s * (g * m).T @ x).reshape(w1.shape[0], w2.shape[0], w1.shape[1], w2.shape[1])  # dL/dΔW as (a, b, c, d)
  d1, d2 = np.einsum("abcd,bd->ac", gw, w2), np.einsum("abcd,ac->bd", gw, w1)
  grads = {}
  for i, dw in ((1, d1), (2, d2)):
    if f"lokr_w{i}" in t:
      grads[f"lokr_w{i}"] = dw
    else:
      grads[f"lokr_w{i}_a"], grads[f"lokr_w{i}_b"] = dw @ t[f"lokr_w{i}_b"].T, t[f"lokr_w{i}_a"].T @ dw
  return y.reshape(p["g"].shape), grads


def _jpeft(p, config, rng):
  spec = ModuleSpec("lin", "linear", jnp.asarray(p["w"]))

  def out(t):
    return lokr.adapt_module(spec, t, config, {}, rng)["weight"].matmul(jnp.asarray(p["x"]))

  t = {k: jnp.asarray(v) for k, v in p["t"].items()}
  grads = jax.grad(lambda t: jnp.sum(out(t) * p["g"]))(t)
  return np.asarray(out(t)), {k: np.asarray(v) for k, v in grads.items()}


def _peft(p, train_mode, uniforms=None, monkeypatch=None, **kw):
  module = _peft_layer(IN, OUT, **p["kw"], **kw)
  with torch.no_grad():
    module.base_layer.weight.copy_(torch.as_tensor(p["w"]))
    for k, v in p["t"].items():
      getattr(module, k)["default"].copy_(torch.as_tensor(v))
  module.train(train_mode)
  if uniforms is not None:
    fake = InjectedRand({"lin": uniforms})
    fake.current = "lin"
    monkeypatch.setattr(torch, "rand", fake)
  y = module(torch.as_tensor(p["x"]))
  (y * torch.as_tensor(p["g"])).sum().backward()
  if monkeypatch is not None:
    monkeypatch.undo()
  grads = {k: getattr(module, k)["default"].grad.numpy() for k in p["t"]}
  return y.detach().numpy(), grads


def _compare(what, ours, theirs, ref):
  (y_jx, g_jx), (y_pt, g_pt), (y_np, g_np) = ours, theirs, ref
  assert set(g_jx) == set(g_np) == set(g_pt)
  assert_close_to_scale(y_jx, y_np, LAYER_REL, what=f"{what} output: jpeft vs numpy")
  assert_close_to_scale(y_jx, y_pt, LAYER_REL, what=f"{what} output: jpeft vs PEFT")
  for k in g_np:
    assert_close_to_scale(g_jx[k], g_np[k], LAYER_REL, what=f"{what} gradient {k}: jpeft vs numpy")
    assert_close_to_scale(g_jx[k], g_pt[k], LAYER_REL, what=f"{what} gradient {k}: jpeft vs PEFT")


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layer_eval_matches_peft_and_numpy(layers, layout):
  p = layers[layout]
  config = _config(**p["kw"])
  _compare(f"lokr {layout} eval", _jpeft(p, config, None), _peft(p, False), _numpy(p))
  # the merged weight is PEFT's W + get_delta_weight
  module = _peft_layer(IN, OUT, **p["kw"])
  with torch.no_grad():
    module.base_layer.weight.copy_(torch.as_tensor(p["w"]))
    for k, v in p["t"].items():
      getattr(module, k)["default"].copy_(torch.as_tensor(v))
    theirs = (module.base_layer.weight + module.get_delta_weight("default")).numpy()
  spec = ModuleSpec("lin", "linear", jnp.asarray(p["w"]))
  merged = np.asarray(lokr.adapt_module(spec, p["t"], config, {}, None)["weight"].materialize())
  assert_close_to_scale(merged, theirs, LAYER_REL, what=f"lokr {layout} merged weight vs PEFT")


@pytest.mark.parametrize("scale", [False, True], ids=["unscaled", "rank-dropout-scale"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layer_train_dropouts_match_peft_with_jpeft_draws(layers, layout, scale, monkeypatch):
  p = layers[layout]
  kw = dict(rank_dropout=0.4, module_dropout=0.2, rank_dropout_scale=scale)
  key = next(k for k in map(jax.random.key, range(100)) if float(jax_uniforms(k, OUT)[0]) > kw["module_dropout"])
  uniforms = jax_uniforms(key, OUT)
  keep = (uniforms[1] > kw["rank_dropout"]).astype(np.float64)
  assert 0 < keep.sum() < OUT
  ref = _numpy(p, True, keep / keep.mean() if scale else keep)  # LoKr rescales only with rank_dropout_scale
  theirs = _peft(p, True, uniforms, monkeypatch, **kw)
  _compare(f"lokr {layout} train", _jpeft(p, _config(**p["kw"], **kw), key), theirs, ref)
  effect = scaled_error(_numpy(p)[0], ref[0])
  assert effect >= MIN_EFFECT, effect


def test_model_dropout_matches_peft_with_jpeft_draws(folder, monkeypatch):
  cfg = dict(
    peft_type="LOKR",
    r=2,
    alpha=4,
    rank_dropout=0.3,
    module_dropout=0.4,
    rank_dropout_scale=True,
    target_modules=["q_proj", "v_proj", "down_proj"],
  )
  model_dropout_matches_peft(cfg, folder, monkeypatch, ("lokr_w1", "lokr_w2_a", "lokr_w2_b"))


# ------------------------------------------------------------------------------------------------------------
# Config and bad input


def _peft_error(torch_base, kw):
  try:
    peft.get_peft_model(copy.deepcopy(torch_base), peft.LoKrConfig(**kw))
  except Exception as e:  # noqa: BLE001 -- ValueError, TypeError
    return e
  return None


@pytest.mark.parametrize(
  "kw,error,field",
  [
    (dict(r=0), InvalidConfigError, "r"),
    (dict(r=-1), InvalidConfigError, "r"),
    (dict(rank_pattern={"q_proj": -2}), InvalidConfigError, "rank_pattern"),
    (dict(layers_pattern="layers"), InvalidConfigError, "layers_pattern"),
    (dict(decompose_factor=2.0), ConfigTypeError, "decompose_factor"),  # PEFT: torch.empty(2.0, ...) fails
  ],
)
def test_config_errors_are_pefts(kw, error, field, torch_base):
  kw = dict(dict(r=4, target_modules=["q_proj"]), **kw)
  assert _peft_error(torch_base, kw) is not None
  with pytest.raises(error, match=f"`{field}(`|\\[)"):
    registry.config_from_dict(dict(peft_type="LOKR", **kw))


@pytest.mark.parametrize(
  "kw",
  [
    dict(init_weights="lycoris"),
    dict(init_weights=False, decompose_both=True, decompose_factor=4, rank_dropout_scale=True),
    dict(use_effective_conv2d=True),  # conv-only: PEFT forces it off for Linear layers
    dict(alpha=0.5, rank_pattern={"q_proj": 2}, alpha_pattern={"q_proj": 7}),
  ],
)
def test_config_values_peft_accepts(kw, torch_base):
  full = dict(dict(r=4, target_modules=["q_proj"]), **kw)
  assert _peft_error(torch_base, full) is None
  config = registry.config_from_dict(dict(peft_type="LOKR", **full))
  theirs = peft.LoKrConfig(**full)
  for k in kw:
    assert getattr(config, k) == getattr(theirs, k), k


def test_decompose_factor_that_splits_nothing_warns(caplog, torch_base):
  """PEFT accepts decompose_factor 0 or < -1 and splits nothing: w1 is 1x1 (shapes as PEFT's, above); jpeft warns."""
  kw = dict(r=4, decompose_factor=0, target_modules=["q_proj"])
  assert _peft_error(torch_base, kw) is None
  caplog.set_level(logging.WARNING, logger="absl")
  registry.config_from_dict(dict(peft_type="LOKR", **kw))
  assert "splits no dimension" in caplog.text
  caplog.clear()
  registry.config_from_dict(dict(peft_type="LOKR", decompose_factor=4, target_modules=["q_proj"]))
  assert "splits no dimension" not in caplog.text


@pytest.mark.parametrize(
  "kw,error,field",
  [
    (dict(init_weights="LyCORIS"), InvalidConfigError, "init_weights"),  # PEFT: truthy, the default init
    (dict(init_weights="gaussian"), InvalidConfigError, "init_weights"),
    (dict(r=4.5), ConfigTypeError, "r"),  # PEFT: full factors here, so it silently scales by alpha / 4.5
    (dict(rank_dropout=1.0), InvalidConfigError, "rank_dropout"),  # PEFT: every row dropped
    (dict(module_dropout=1.5), InvalidConfigError, "module_dropout"),  # PEFT: never applied in training
  ],
)
def test_divergences_from_peft_are_refusals(kw, error, field, torch_base):
  kw = dict(dict(r=8, target_modules=["q_proj"]), **kw)
  assert _peft_error(torch_base, kw) is None
  with pytest.raises(error, match=f"`{field}(`|\\[)"):
    registry.config_from_dict(dict(peft_type="LOKR", **kw))


def test_bad_adapter_entries_are_refused(jax_model):
  config, params = jax_model
  peft_config = registry.config_from_dict(METHODS["lokr"])
  adapter, _ = core.init(jax.random.key(0), params, peft_config, config)
  name = "model.layers.0.mlp.down_proj"  # w1 full, w2 factored
  assert set(adapter[name]) == {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}
  full_w2 = dict(adapter[name], lokr_w2=jnp.zeros((8, 16)))
  del full_w2["lokr_w2_a"], full_w2["lokr_w2_b"]
  with pytest.raises(AdapterCheckpointError, match=r"down_proj.*lokr_w2.*expected.*lokr_w2_a"):
    core.apply(params, dict(adapter, **{name: full_w2}), peft_config)
  wrong = dict(adapter, **{name: dict(adapter[name], lokr_w1=jnp.zeros((4, 16)))})
  with pytest.raises(AdapterCheckpointError, match=r"down_proj.*'lokr_w1' of shape \(4, 16\).*\(8, 8\)"):
    core.apply(params, wrong, peft_config)
