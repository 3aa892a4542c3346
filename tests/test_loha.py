"""LoHa beyond the method table: PEFT's config errors and inits, the layer against PEFT and float64 NumPy (eval and
train mode), PEFT's rank-dropout NaN, bad adapters and targets; and (shared with tests/test_lokr.py) the train-mode
draws made explicit.

Dropout (``module_dropout``, ``rank_dropout``) is checked with the randomness made explicit, not statistically:
jpeft draws ``u = jax.random.uniform(k, shape)`` from the two halves of the module's key (``lycoris.train_keys``) and
keeps where ``u > p``; the tests draw the same uniforms from the same keys and hand them to PEFT by replacing
``torch.rand`` (which PEFT's LyCORIS layers call as ``torch.rand(1)`` and ``torch.rand(out)``) with
:class:`InjectedRand`, so both sides apply the very same masks, and to a float64 NumPy formula.

Bounds (relative to the scale of what is compared, ``numerics``), measured with XLA's default CPU kernels,
``--xla_cpu_max_isa=AVX2`` and one core (``taskset -c 0``; the same to 3 digits): layer outputs and gradients, sums
of ~in·r float32 products: worst 1.55e-7 = 1.3 eps (jpeft vs NumPy and vs PEFT, eval and train; bound 8 eps, as in
test_dropout_parity). A merged weight (``materialize``) against PEFT's ``W + get_delta_weight``: measured 0 (bound
8 eps). Model level (train mode, draws injected): test_parity's bounds; measured loss 0, gradients 1.42e-6. Dropout
moves what is compared far outside the bounds: the layer output by 0.56 of its scale, the model loss by 3.0e-4 relative
(bound 100 · 16 eps = 1.9e-4), and a dropped module's gradients are exactly zero on both sides.
"""

import copy
import os

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from peft.tuners.lycoris_utils import LycorisLayer

from backends import get_backend
from backends.tiny import make_batch
from jpeft import core, registry, train
from jpeft.config import AdapterCheckpointError, ConfigTypeError, InvalidConfigError
from jpeft.methods import loha, lycoris
from jpeft.methods.base import ModuleSpec, base_matmul
from jpeft.targets import UnsupportedTargetError
from numerics import EPS32, assert_close_to_scale, scaled_error

from method_table import METHODS, VOCAB

LAYER_REL = 8 * EPS32
LOSS_REL = 16 * EPS32  # test_parity's
GRAD_REL = 1e-5  # test_parity's
MIN_EFFECT = 1e-2
IN, OUT, R, ALPHA = 24, 16, 4, 6
NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


def _report(what, value, bound):
  if os.environ.get("JPEFT_PRINT_ERRORS"):
    print(f"[measured] {what}: {value:.3g} (bound {bound:.3g})")


# ------------------------------------------------------------------------------------------------------------
# Train-mode draws made explicit (also used by tests/test_lokr.py)


def jax_uniforms(rng, out_features):
  """The uniforms a LyCORIS weight draws from its module key: ``(module u (), rank u (out,))``."""
  k_module, k_rank = jax.random.split(rng)
  return (
    np.asarray(jax.random.uniform(k_module, (), jnp.float32)),
    np.asarray(jax.random.uniform(k_rank, (out_features,), jnp.float32)),
  )


class InjectedRand:
  """Stands in for ``torch.rand`` while PEFT's LyCORIS layers run: ``rand(1)`` gives the current layer's module
  uniform, ``rand(out)`` its rank uniforms. ``current`` names the layer (set by a forward pre-hook at model level)."""

  def __init__(self, uniforms):
    self.uniforms = uniforms  # {layer name: (module u, rank u)}
    self.current = None
    self.calls = []

  def __call__(self, *size, **kwargs):
    size = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
    module_u, rank_u = self.uniforms[self.current]
    self.calls.append((self.current, size))
    if size == (1,):
      return torch.as_tensor(np.reshape(module_u, (1,)))
    assert size == rank_u.shape, (self.current, size, rank_u.shape)
    return torch.as_tensor(rank_u)


def model_dropout_matches_peft(cfg, folder, monkeypatch, tensor_names):
  """Model level, train mode: PEFT gets the uniforms jpeft draws for each module from the step's key; loss and every
  gradient must match test_parity's bounds, and dropout must move them far outside."""
  jx, pt = get_backend("jax"), get_backend("torch")
  for b in (jx, pt):
    b.load_base(folder)
  pt.attach_adapter(cfg, seed=0)
  rng0 = np.random.default_rng(1)
  state = {
    k: (v + 0.3 * rng0.standard_normal(v.shape) * (np.abs(v).mean() + 0.1)).astype(v.dtype)
    for k, v in pt.adapter_state_dict().items()
  }
  pt.set_adapter_state_dict(state)
  jx.attach_adapter(cfg, seed=0)
  jx.set_adapter_state_dict(state)
  b = make_batch(7, 3, 16, VOCAB)
  batch = {k: jnp.asarray(v, jnp.int32) for k, v in b.items()}
  rng = jax.random.key(5)

  @jax.jit
  def module_keys(adapter, params, key):  # traced under jit, as in the train step (see test_dropout_parity)
    adapted = core.apply(params, adapter, jx.peft_config, rng=key)
    return {n: adapted[n + ".weight"].rng for n in adapter}

  uniforms = {
    n: jax_uniforms(k, jx.params[n + ".weight"].shape[0]) for n, k in module_keys(jx.trainable, jx.params, rng).items()
  }
  kept = [float(u[0]) > cfg["module_dropout"] for u in uniforms.values()]
  assert any(kept) and not all(kept), kept  # both outcomes of module_dropout occur
  fake = InjectedRand(uniforms)
  for name, module in pt.model.named_modules():
    if isinstance(module, LycorisLayer):
      short = name.removeprefix("base_model.model.")
      module.register_forward_pre_hook(lambda m, args, short=short: setattr(fake, "current", short))
  monkeypatch.setattr(torch, "rand", fake)
  loss_pt, g_pt = pt.loss_and_grads(b["input_ids"], b["attention_mask"], b["labels"])
  monkeypatch.undo()
  rank_calls = sum(1 for _, s in fake.calls if s != (1,))
  assert len(fake.calls) - rank_calls == len(uniforms) and rank_calls == sum(kept)

  grad_fn = train.make_grad_fn(jx.model_config, jx.peft_config)
  loss_jx, grads = grad_fn(jx.trainable, jx.params, batch, rng)
  g_jx = {k: np.asarray(v) for k, v in core.to_state_dict(grads).items()}
  what = cfg["peft_type"]
  assert_close_to_scale(np.float64(loss_jx), np.float64(loss_pt), LOSS_REL, what=f"{what}: train loss")
  assert set(g_pt) == set(g_jx)
  assert {k.rsplit(".", 1)[1] for k in g_pt} == set(tensor_names)
  for k in g_pt:
    if not np.abs(g_pt[k]).any():  # the module was dropped this step: no gradient on either side
      assert not np.abs(g_jx[k]).any(), k
      continue
    assert_close_to_scale(g_jx[k], g_pt[k], GRAD_REL, what=f"{what}: gradient {k}")
  assert sum(1 for k in g_pt if np.abs(g_pt[k]).any()) == sum(kept) * len(tensor_names)
  loss_eval, _ = grad_fn(jx.trainable, jx.params, batch, None)
  effect = abs(float(loss_eval) - float(loss_jx)) / abs(float(loss_pt))
  _report(f"{what}: dropout effect on the loss", effect, 100 * LOSS_REL)
  assert effect >= 100 * LOSS_REL


# ------------------------------------------------------------------------------------------------------------
# Layer level: jpeft vs PEFT's loha.Linear vs float64 NumPy


@pytest.fixture(scope="module")
def layer():
  rng = np.random.default_rng(0)
  w = (rng.standard_normal((OUT, IN)) / np.sqrt(IN)).astype(np.float32)
  t = {
    "hada_w1_a": rng.standard_normal((OUT, R)),
    "hada_w1_b": rng.standard_normal((R, IN)) / np.sqrt(IN),
    "hada_w2_a": rng.standard_normal((OUT, R)),
    "hada_w2_b": rng.standard_normal((R, IN)) / np.sqrt(IN),  # ≠ 0
  }
  t = {k: v.astype(np.float32) for k, v in t.items()}
  x = rng.standard_normal((3, 5, IN)).astype(np.float32)
  g = rng.standard_normal((3, 5, OUT)).astype(np.float32)
  return dict(w=w, t=t, x=x, g=g)


def _numpy(p, keep_module=True, rank_mask=None):
  """float64 output and factor gradients of ``Σ y ⊙ g``."""
  w = p["w"].astype(np.float64)
  t = {k: v.astype(np.float64) for k, v in p["t"].items()}
  x, g = p["x"].reshape(-1, IN).astype(np.float64), p["g"].reshape(-1, OUT).astype(np.float64)
  s = ALPHA / R
  p1, p2 = t["hada_w1_a"] @ t["hada_w1_b"], t["hada_w2_a"] @ t["hada_w2_b"]
  m = np.ones(OUT) if rank_mask is None else rank_mask
  delta = s * p1 * p2 * m[:, None] * float(keep_module)
  y = x @ w.T + x @ delta.T
  gd = s * float(keep_module) * (g * m).T @ x  # dL/d(p1 ⊙ p2)
  grads = {
    "hada_w1_a": (gd * p2) @ t["hada_w1_b"].T,
    "hada_w1_b": t["hada_w1_a"].T @ (gd * p2),
    "hada_w2_a": (gd * p1) @ t["hada_w2_b"].T,
    "hada_w2_b": t["hada_w2_a"].T @ (gd * p1),
  }
  return y.reshape(p["g"].shape), grads


def _jpeft(p, config, rng):
  spec = ModuleSpec("lin", "linear", jnp.asarray(p["w"]))

  def out(t):
    return loha.adapt_module(spec, t, config, {}, rng)["weight"].matmul(jnp.asarray(p["x"]))

  t = {k: jnp.asarray(v) for k, v in p["t"].items()}
  grads = jax.grad(lambda t: jnp.sum(out(t) * p["g"]))(t)
  return np.asarray(out(t)), {k: np.asarray(v) for k, v in grads.items()}


def _peft_layer(p, **kw):
  from peft.tuners.loha.layer import Linear

  base = torch.nn.Linear(IN, OUT, bias=False)
  with torch.no_grad():
    base.weight.copy_(torch.as_tensor(p["w"]))
  module = Linear(base, "default", config=peft.LoHaConfig(r=R, alpha=ALPHA, **kw), r=R, alpha=ALPHA)
  with torch.no_grad():
    for k, v in p["t"].items():
      getattr(module, k)["default"].copy_(torch.as_tensor(v))
  return module


def _peft(p, module, train_mode, uniforms=None, monkeypatch=None):
  module.train(train_mode)
  for k in NAMES:
    getattr(module, k)["default"].grad = None
  fake = None
  if uniforms is not None:
    fake = InjectedRand({"lin": uniforms})
    fake.current = "lin"
    monkeypatch.setattr(torch, "rand", fake)
  y = module(torch.as_tensor(p["x"]))
  (y * torch.as_tensor(p["g"])).sum().backward()
  if monkeypatch is not None:
    monkeypatch.undo()
  grads = {k: getattr(module, k)["default"].grad for k in NAMES}
  return (
    y.detach().numpy(),
    {k: (np.zeros(p["t"][k].shape) if v is None else v.numpy()) for k, v in grads.items()},
    fake,
  )


def _compare(what, ours, theirs, ref):
  (y_jx, g_jx), (y_pt, g_pt), (y_np, g_np) = ours, theirs, ref
  assert_close_to_scale(y_jx, y_np, LAYER_REL, what=f"{what} output: jpeft vs numpy")
  assert_close_to_scale(y_jx, y_pt, LAYER_REL, what=f"{what} output: jpeft vs PEFT")
  for k in g_np:
    if np.abs(g_np[k]).max() == 0:  # module dropped: no gradient anywhere
      assert np.abs(g_jx[k]).max() == 0 and np.abs(g_pt[k]).max() == 0, k
      continue
    assert_close_to_scale(g_jx[k], g_np[k], LAYER_REL, what=f"{what} gradient {k}: jpeft vs numpy")
    assert_close_to_scale(g_jx[k], g_pt[k], LAYER_REL, what=f"{what} gradient {k}: jpeft vs PEFT")


def _config(**kw):
  return registry.config_from_dict(dict(peft_type="LOHA", r=R, alpha=ALPHA, target_modules=["lin"], **kw))


def test_layer_eval_matches_peft_and_numpy(layer):
  config = _config()
  ours = _jpeft(layer, config, None)
  theirs = _peft(layer, _peft_layer(layer), False)[:2]
  _compare("loha eval", ours, theirs, _numpy(layer))
  # training without dropout computes the same as eval
  np.testing.assert_array_equal(_jpeft(layer, config, jax.random.key(0))[0], ours[0])


def _key_with(module_kept, p):
  """A key whose module uniform keeps (or drops) the adapter at module_dropout p."""
  for seed in range(100):
    key = jax.random.key(seed)
    if (float(jax_uniforms(key, OUT)[0]) > p) == module_kept:
      return key
  raise AssertionError("no such key")


@pytest.mark.parametrize("module_kept", [True, False], ids=["module-kept", "module-dropped"])
def test_layer_train_dropouts_match_peft_with_jpeft_draws(layer, module_kept, monkeypatch):
  kw = dict(rank_dropout=0.4, module_dropout=0.5)
  key = _key_with(module_kept, kw["module_dropout"])
  uniforms = jax_uniforms(key, OUT)
  keep = (uniforms[1] > kw["rank_dropout"]).astype(np.float64)
  assert 0 < keep.sum() < OUT
  ours = _jpeft(layer, _config(**kw), key)
  y_pt, g_pt, fake = _peft(layer, _peft_layer(layer, **kw), True, uniforms, monkeypatch)
  # PEFT draws the module uniform first, then (only if the module runs) the rank uniforms
  assert [s for _, s in fake.calls] == ([(1,), (OUT,)] if module_kept else [(1,)])
  ref = _numpy(layer, module_kept, keep / keep.mean())  # LoHa always rescales the row mask by its mean
  _compare(f"loha train ({'kept' if module_kept else 'dropped'})", ours, (y_pt, g_pt), ref)
  effect = scaled_error(_numpy(layer)[0], ref[0])
  _report("loha layer: dropout effect", effect, MIN_EFFECT)
  assert effect >= MIN_EFFECT


def test_rank_dropout_of_every_row_is_a_zero_delta_not_peft_nan(layer, monkeypatch):
  """PEFT divides the all-zero row mask by its mean (0/0: NaN outputs); jpeft's delta is zero instead."""
  kw = dict(rank_dropout=0.999999)  # a valid probability at which every row of this key is dropped
  key = jax.random.key(0)
  uniforms = jax_uniforms(key, OUT)
  assert uniforms[1].max() <= kw["rank_dropout"]
  y_pt, _, _ = _peft(layer, _peft_layer(layer, **kw), True, uniforms, monkeypatch)
  assert np.isnan(y_pt).all()
  y_jx = _jpeft(layer, _config(**kw), key)[0]
  base_only = base_matmul(jnp.asarray(layer["x"]), jnp.asarray(layer["w"]), jnp.float32)
  np.testing.assert_array_equal(y_jx, np.asarray(base_only))  # finite: the base alone


def test_merge_is_pefts(layer):
  module = _peft_layer(layer)
  with torch.no_grad():
    theirs = (module.base_layer.weight + module.get_delta_weight("default")).numpy()
  weight = loha.adapt_module(ModuleSpec("lin", "linear", jnp.asarray(layer["w"])), layer["t"], _config(), {}, None)
  merged = np.asarray(weight["weight"].materialize())
  _report("loha merged weight vs PEFT", scaled_error(merged, theirs), LAYER_REL)
  assert_close_to_scale(merged, theirs, LAYER_REL, what="loha merged weight vs PEFT")


# ------------------------------------------------------------------------------------------------------------
# Model level


def test_model_dropout_matches_peft_with_jpeft_draws(folder, monkeypatch):
  cfg = dict(
    peft_type="LOHA",
    r=4,
    alpha=16,
    rank_dropout=0.3,
    module_dropout=0.4,
    target_modules=["q_proj", "v_proj", "up_proj"],
  )
  model_dropout_matches_peft(cfg, folder, monkeypatch, NAMES)


@pytest.mark.parametrize(
  "kw", [dict(), dict(init_weights=False), dict(r=3, rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 5})]
)
def test_init_keys_shapes_and_laws_are_pefts(kw, torch_base, jax_model):
  """Same keys and shapes as PEFT; w2_b zeros (init_weights=True), else every tensor U(±1/√fan_in) as PEFT's."""
  base = dict(target_modules=["q_proj", "v_proj", "down_proj"], **kw)
  model = peft.get_peft_model(copy.deepcopy(torch_base), peft.LoHaConfig(**base))
  theirs = {k: v.detach().numpy() for k, v in peft.get_peft_model_state_dict(model).items()}
  config, params = jax_model
  peft_config = registry.config_from_dict(dict(peft_type="LOHA", **base))
  adapter, _ = core.init(jax.random.key(0), params, peft_config, config)
  ours = {k: np.asarray(v) for k, v in core.to_state_dict(adapter).items()}
  assert set(theirs) == set(ours)
  for k, v in ours.items():
    t = theirs[k]
    assert v.shape == t.shape and v.dtype == t.dtype == np.float32, k
    if k.endswith("hada_w2_b") and kw.get("init_weights", True):
      assert not v.any() and not t.any(), k
      continue
    bound = 1 / np.sqrt(v.shape[1])
    assert np.abs(v).max() <= bound and np.abs(v).max() > 0.8 * bound, k  # the law, not torch's bits
    assert np.abs(t).max() <= bound and np.abs(t).max() > 0.8 * bound, k
  assert registry.get_method("LOHA").identity_at_init(peft_config) == kw.get("init_weights", True)


def _peft_error(torch_base, kw):
  try:
    peft.get_peft_model(copy.deepcopy(torch_base), peft.LoHaConfig(**kw))
  except Exception as e:  # noqa: BLE001 -- ValueError, TypeError
    return e
  return None


@pytest.mark.parametrize(
  "kw,error,field",
  [
    (dict(r=0), InvalidConfigError, "r"),
    (dict(r=-2), InvalidConfigError, "r"),
    (dict(r=2.5), ConfigTypeError, "r"),  # PEFT: torch.empty(out, 2.5) raises a TypeError
    (dict(rank_pattern={"q_proj": 0}), InvalidConfigError, "rank_pattern"),
    (dict(layers_pattern="layers"), InvalidConfigError, "layers_pattern"),
  ],
)
def test_config_errors_are_pefts(kw, error, field, torch_base):
  kw = dict(dict(r=4, target_modules=["q_proj"]), **kw)
  assert _peft_error(torch_base, kw) is not None
  with pytest.raises(error, match=f"`{field}(`|\\[)"):
    registry.config_from_dict(dict(peft_type="LOHA", **kw))


@pytest.mark.parametrize(
  "kw",
  [
    dict(alpha=2.5),
    dict(alpha=-4),
    dict(use_effective_conv2d=True),  # conv-only: PEFT ignores it on Linear layers
    dict(rank_dropout=0.2, module_dropout=0.7),
    dict(rank_pattern={"q_proj": 3}, alpha_pattern={r"layers\.1\..*": 2.0}),
    dict(layers_pattern="layers", layers_to_transform=[1]),
  ],
)
def test_config_values_peft_accepts(kw, torch_base):
  full = dict(dict(r=4, target_modules=["q_proj"]), **kw)
  assert _peft_error(torch_base, full) is None
  config = registry.config_from_dict(dict(peft_type="LOHA", **full))
  theirs = peft.LoHaConfig(**full)
  for k in kw:
    v = getattr(theirs, k)
    assert getattr(config, k) == (tuple(v) if isinstance(v, list) else v), k


@pytest.mark.parametrize(
  "kw,error,field",
  [
    (dict(rank_dropout=1.0), InvalidConfigError, "rank_dropout"),  # PEFT: all rows dropped, 0/0 = NaN outputs
    (dict(rank_dropout=-0.1), InvalidConfigError, "rank_dropout"),  # PEFT: a no-op
    (dict(module_dropout=1.0), InvalidConfigError, "module_dropout"),  # PEFT: never applied in training
    (dict(alpha=float("nan")), InvalidConfigError, "alpha"),
    (dict(alpha_pattern={"q_proj": "2"}), ConfigTypeError, "alpha_pattern"),
    (dict(init_weights="lycoris"), ConfigTypeError, "init_weights"),  # PEFT: truthy, the default init
  ],
)
def test_divergences_from_peft_are_refusals(kw, error, field, torch_base):
  """Values PEFT accepts (and then misbehaves on or ignores) that jpeft refuses, naming the field."""
  kw = dict(dict(r=4, target_modules=["q_proj"]), **kw)
  if "alpha_pattern" not in kw:  # PEFT's alpha "2" fails only in the first forward: alpha / r on a str
    assert _peft_error(torch_base, kw) is None
  with pytest.raises(error, match=f"`{field}(`|\\[)"):
    registry.config_from_dict(dict(peft_type="LOHA", **kw))


def test_embedding_and_norm_targets_are_refused_like_peft(torch_base, jax_model):
  config, params = jax_model
  for target in ("embed_tokens", "input_layernorm"):
    with pytest.raises((TypeError, ValueError), match="not supported"):
      peft.get_peft_model(copy.deepcopy(torch_base), peft.LoHaConfig(target_modules=[target]))
    peft_config = registry.config_from_dict(dict(peft_type="LOHA", target_modules=[target]))
    with pytest.raises(UnsupportedTargetError, match="LOHA does not support"):
      core.init(jax.random.key(0), params, peft_config, config)


def test_bad_adapter_entries_are_refused(jax_model):
  config, params = jax_model
  peft_config = registry.config_from_dict(METHODS["loha"])
  adapter, _ = core.init(jax.random.key(0), params, peft_config, config)
  name = "model.layers.0.mlp.down_proj"
  missing = dict(adapter, **{name: {k: v for k, v in adapter[name].items() if k != "hada_w2_b"}})
  with pytest.raises(AdapterCheckpointError, match=r"down_proj.*hada_w2_b"):
    core.apply(params, missing, peft_config)
  wrong = dict(adapter, **{name: dict(adapter[name], hada_w1_a=adapter[name]["hada_w1_a"][:, :2])})
  with pytest.raises(AdapterCheckpointError, match=r"down_proj.*'hada_w1_a' of shape \(64, 2\).*\(64, 4\)"):
    core.apply(params, wrong, peft_config)


def test_axes_follow_the_base():
  method, config = registry.get_method("LOHA"), registry.config_from_dict(METHODS["loha"])
  assert method.tensor_axes("hada_w1_a", "linear", config) == (0, None)
  assert method.tensor_axes("hada_w2_b", "linear", config) == (None, 1)
  assert lycoris.rank_and_scaling(registry.config_from_dict(METHODS["loha-patterns"]), "x.o_proj") == (4, 0.75)
