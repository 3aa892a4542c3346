"""VeRA beyond the method table: torch's generator reproduced bit for bit, PEFT's saved keys and config errors, the
seed check on load, dropout, and bad adapters.

The seeded tensors (``torch_rng.randperm``, ``uniform`` and VeRA's shared projections) are compared with
``np.testing.assert_array_equal``: they are regenerated from a seed, so anything short of bit-exact would make a
``save_projection=False`` checkpoint compute something else in jpeft than in PEFT. The one float comparison (a layer
with dropout against PEFT's layer given the same mask) is relative to scale: a sum of IN + R float32 products per
entry, measured 1.41e-7 = 1.2 eps (bound 8 eps, as in test_dropout_parity); a merged weight (one product per entry
plus the base) came out identical to PEFT's (measured 0, bound 8 eps).
"""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from peft.tuners.vera.model import _kaiming_init
from safetensors.numpy import load_file, save_file

from backends import get_backend
from jpeft import checkpoint, core, registry
from jpeft.config import AdapterCheckpointError, ConfigTypeError, InvalidConfigError
from jpeft.methods import torch_rng, vera
from jpeft.methods.base import ModuleSpec, base_matmul
from numerics import EPS32, assert_close_to_scale, scaled_error
from test_dropout_parity import FixedMaskDropout

from method_table import METHODS

QVD = ["q_proj", "v_proj", "down_proj"]


# the tiny Llama: the `folder`, `torch_base` and `jax_model` fixtures of conftest.py


def _peft_model(torch_base, **kw):
  return peft.get_peft_model(copy.deepcopy(torch_base), peft.VeraConfig(**kw))


# ------------------------------------------------------------------------------------------------------------
# torch's generator, bit for bit


@pytest.mark.parametrize("n", [0, 1, 2, 3, 10, 257, 4096, 100_003])
@pytest.mark.parametrize("seed", [0, 1, 7, 123456789, 2**32 + 3, -1])
def test_randperm_is_torchs(n, seed):
  ours = torch_rng.randperm(n, seed)
  theirs = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
  assert ours.dtype == np.int64
  np.testing.assert_array_equal(ours, theirs)


def test_randperm_returns_a_fresh_copy_and_refuses_torchs_64bit_branch():
  a = torch_rng.randperm(50, 3)
  a[:] = 0  # the cache is not touched
  np.testing.assert_array_equal(
    torch_rng.randperm(50, 3), torch.randperm(50, generator=torch.Generator().manual_seed(3))
  )
  with pytest.raises(NotImplementedError, match="64-bit"):
    torch_rng.randperm(2**32 // 20 + 1, 0)


@pytest.mark.parametrize(
  "shape,lo,hi,seed",
  [((16, 64), -0.3, 0.3, 0), ((64, 16), -1.0, 2.0, 7), ((3, 5, 7), -0.123, 0.5, 99), ((1,), 0.0, 1.0, 2**40)],
)
def test_uniform_is_torchs(shape, lo, hi, seed):
  theirs = torch.empty(shape).uniform_(lo, hi, generator=torch.Generator().manual_seed(seed)).numpy()
  np.testing.assert_array_equal(torch_rng.uniform(shape, lo, hi, seed), theirs)


@pytest.mark.parametrize(
  "r,max_in,max_out,seed", [(8, 128, 64, 0), (16, 64, 64, 7), (256, 576, 1536, 42), (3, 5, 7, 2**32 + 1), (4, 9, 6, -1)]
)
def test_projections_are_pefts_kaiming_init(r, max_in, max_out, seed):
  """A first, then B, from one generator (PEFT's ``_init_vera_A_vera_B``), including SmolLM2-sized projections."""
  g = torch.Generator().manual_seed(seed)
  a = _kaiming_init((r, max_in), generator=g).numpy()
  b = _kaiming_init((max_out, r), generator=g).numpy()
  ours_a, ours_b = vera._projections(r, max_in, max_out, seed)
  np.testing.assert_array_equal(ours_a, a)
  np.testing.assert_array_equal(ours_b, b)


@pytest.mark.parametrize(
  "kw",
  [
    dict(r=8, target_modules=QVD),  # A (8, 128) from down_proj's in, B (64, 8)
    dict(r=8, save_projection=False, projection_prng_key=7, target_modules=["q_proj", "up_proj"]),  # B (128, 8)
    dict(r=5, projection_prng_key=2**33 + 11, target_modules=["v_proj", "k_proj"]),  # both (32, 64): max in = 64
  ],
)
def test_shared_projections_are_peft_models(kw, torch_base, jax_model):
  """Over a whole model: the max over the targets' shapes and the seeded draw equal PEFT's buffers exactly."""
  model = _peft_model(torch_base, **kw)
  theirs = {n: getattr(model.base_model, n)["default"].numpy() for n in ("vera_A", "vera_B")}
  config, params = jax_model
  peft_config = registry.config_from_dict(dict(peft_type="VERA", **kw))
  adapter, _ = core.init(jax.random.key(0), params, peft_config, config)
  if peft_config.save_projection:
    ours = {n: np.asarray(v) for n, v in adapter[core.SHARED].items()}
  else:
    assert core.SHARED not in adapter
    ours = vera.derive_shared(core._adapted_specs(params, adapter, peft_config, config), peft_config)
  assert set(ours) == set(theirs)
  for n in theirs:
    np.testing.assert_array_equal(ours[n], theirs[n], err_msg=n)


@pytest.mark.parametrize("autocast", [True, False])
def test_bf16_base_rounds_like_peft(autocast, folder):
  """Over a bf16 base PEFT moves every fresh adapter tensor to bf16 (λ_d = bf16(0.1), the projections rounded),
  then upcasts it to fp32 unless ``autocast_adapter_dtype=False``: jpeft holds the same values exactly."""
  cfg = dict(peft_type="VERA", r=8, target_modules=QVD, projection_prng_key=3)
  states = {}
  for name in ("jax", "torch"):
    b = get_backend(name)
    b.load_base(folder, dtype="bfloat16")
    b.attach_adapter(cfg, seed=0, autocast_adapter_dtype=autocast)
    states[name] = b.adapter_state_dict()
  assert set(states["jax"]) == set(states["torch"])
  for k, v in states["torch"].items():
    np.testing.assert_array_equal(np.asarray(states["jax"][k], np.float32), v, err_msg=k)
  assert not np.array_equal(states["torch"]["base_model.vera_A"], vera._projections(8, 128, 64, 3)[0])


# ------------------------------------------------------------------------------------------------------------
# Saved keys


@pytest.mark.parametrize("save_projection", [True, False])
def test_saved_keys_are_pefts(save_projection, folder, tmp_path):
  cfg = dict(peft_type="VERA", r=4, save_projection=save_projection, target_modules=["q_proj", "down_proj"])
  keys = {}
  for name in ("jax", "torch"):
    b = get_backend(name)
    b.load_base(folder)
    b.attach_adapter(cfg, seed=0)
    b.save_adapter(str(tmp_path / name))
    keys[name] = set(load_file(str(tmp_path / name / checkpoint.ADAPTER_WEIGHTS)))
  expected = {
    f"base_model.model.model.layers.{i}.{m}.vera_lambda_{v}"
    for i in (0, 1)
    for m in ("self_attn.q_proj", "mlp.down_proj")
    for v in ("b", "d")
  }
  if save_projection:
    expected |= {"base_model.vera_A", "base_model.vera_B"}  # once, at model level; no per-layer copies
  assert keys["torch"] == expected
  assert keys["jax"] == expected


# ------------------------------------------------------------------------------------------------------------
# Loading: the seed check and missing projections


def _saved_vera(folder, tmp_path, **kw):
  jx = get_backend("jax")
  jx.load_base(folder)
  jx.attach_adapter(dict(peft_type="VERA", r=8, target_modules=QVD, **kw), seed=0)
  out = tmp_path / "adapter"
  jx.save_adapter(str(out))
  return jx, out


def _edit(out, *, config=None, tensors=None):
  if config is not None:
    path = out / checkpoint.ADAPTER_CONFIG
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
  if tensors is not None:
    path = str(out / checkpoint.ADAPTER_WEIGHTS)
    state = load_file(path)
    for k, v in tensors.items():
      if v is None:
        del state[k]
      else:
        state[k] = v(state[k])
    save_file(state, path)


def test_projections_of_another_seed_are_refused(folder, torch_base, tmp_path):
  jx, out = _saved_vera(folder, tmp_path)
  _edit(out, config={"projection_prng_key": 5})
  with pytest.raises(AdapterCheckpointError) as info:
    checkpoint.load_pretrained(str(out), jx.base_params, jx.model_config)
  message = str(info.value)
  assert "base_model.vera_A" in message and "projection_prng_key=5" in message and str(out) in message
  # PEFT itself loads the file and silently uses the saved projections, which are not seed 5's
  model = peft.PeftModel.from_pretrained(copy.deepcopy(torch_base), str(out))
  saved = load_file(str(out / checkpoint.ADAPTER_WEIGHTS))["base_model.vera_A"]
  np.testing.assert_array_equal(model.base_model.vera_A["default"].numpy(), saved)
  assert not np.array_equal(saved, vera._projections(8, 128, 64, 5)[0])


def test_a_changed_vera_b_is_refused_by_name(folder, tmp_path):
  jx, out = _saved_vera(folder, tmp_path, projection_prng_key=3)
  _edit(out, tensors={"base_model.vera_B": lambda v: v * np.float32(1.0 + 2**-20)})
  with pytest.raises(AdapterCheckpointError, match=r"`base_model\.vera_B`.*projection_prng_key=3"):
    checkpoint.load_pretrained(str(out), jx.base_params, jx.model_config)


def test_projections_rounded_to_bf16_are_accepted(folder, tmp_path):
  """PEFT rounds the projections to a bf16 base's dtype before upcasting them: such a file is this seed's."""
  jx, out = _saved_vera(folder, tmp_path)
  bf16 = lambda v: np.asarray(jnp.asarray(v).astype(jnp.bfloat16).astype(jnp.float32))  # noqa: E731
  _edit(out, tensors={"base_model.vera_A": bf16, "base_model.vera_B": bf16})
  _, adapter, _ = checkpoint.load_pretrained(str(out), jx.base_params, jx.model_config)
  assert not np.array_equal(np.asarray(adapter[core.SHARED]["vera_A"]), vera._projections(8, 128, 64, 0)[0])


def test_missing_projection_is_refused_like_peft(folder, torch_base, tmp_path):
  jx, out = _saved_vera(folder, tmp_path)
  _edit(out, tensors={"base_model.vera_A": None})
  with pytest.raises(AdapterCheckpointError, match=r"missing 1 key.*base_model\.vera_A"):
    checkpoint.load_pretrained(str(out), jx.base_params, jx.model_config)
  with pytest.raises(ValueError, match="Specified to load vera_A and vera_B from state dictionary however"):
    peft.PeftModel.from_pretrained(copy.deepcopy(torch_base), str(out))


def test_projections_in_a_save_projection_false_file_are_refused(folder, torch_base, tmp_path):
  """PEFT warns and ignores them; jpeft's strict key check refuses the unexpected keys."""
  jx, out = _saved_vera(folder, tmp_path)
  _edit(out, config={"save_projection": False})
  with pytest.raises(AdapterCheckpointError, match=r"2 unexpected key.*base_model\.vera_A"):
    checkpoint.load_pretrained(str(out), jx.base_params, jx.model_config)
  with pytest.warns(UserWarning, match="however they are present in state dictionary"):
    peft.PeftModel.from_pretrained(copy.deepcopy(torch_base), str(out))


# ------------------------------------------------------------------------------------------------------------
# Config validation against PEFT


def _peft_error(torch_base, kw):
  """PEFT's error for ``kw``: at config construction or when the adapter is built (``r``, the seed, ``bias``)."""
  try:
    _peft_model(torch_base, **kw)
  except Exception as e:  # noqa: BLE001 -- ValueError, TypeError, RuntimeError, NotImplementedError
    return e
  return None


@pytest.mark.parametrize(
  "kw,error,field",
  [
    (dict(r=0), InvalidConfigError, "r"),
    (dict(r=-3), InvalidConfigError, "r"),
    (dict(r=4.5), ConfigTypeError, "r"),
    (dict(vera_dropout=1.5), InvalidConfigError, "vera_dropout"),
    (dict(projection_prng_key=2**64), InvalidConfigError, "projection_prng_key"),
    (dict(projection_prng_key=1.5), ConfigTypeError, "projection_prng_key"),
    (dict(bias="some"), InvalidConfigError, "bias"),
    (dict(layers_pattern="layers"), InvalidConfigError, "layers_pattern"),
  ],
)
def test_config_errors_are_pefts(kw, error, field, torch_base):
  kw = dict(dict(r=4, target_modules=["q_proj"]), **kw)
  assert _peft_error(torch_base, kw) is not None
  with pytest.raises(error, match=f"`{field}`"):
    registry.config_from_dict(dict(peft_type="VERA", **kw))


@pytest.mark.parametrize(
  "kw",
  [
    dict(projection_prng_key=-1),
    dict(projection_prng_key=2**64 - 1),
    dict(bias="lora_only"),  # PEFT accepts any "<x>_only"
    dict(bias="all"),
    dict(vera_dropout=0.0, d_initial=-2),
    dict(layers_pattern="layers", layers_to_transform=[1]),
  ],
)
def test_config_values_peft_accepts(kw, torch_base):
  full = dict(dict(r=4, target_modules=["q_proj"]), **kw)
  assert _peft_error(torch_base, full) is None
  config = registry.config_from_dict(dict(peft_type="VERA", **full))
  theirs = peft.VeraConfig(**full)
  for k in kw:
    assert getattr(config, k) == (tuple(v) if isinstance(v := getattr(theirs, k), list) else v), k


def test_divergences_from_peft_are_refusals(torch_base):
  """PEFT silently disables a negative dropout (``p > 0`` picks nn.Dropout) and accepts p = 1 and a NaN d_initial;
  jpeft refuses all three, as it does for LoRA."""
  for kw in (dict(vera_dropout=-0.1), dict(vera_dropout=1.0), dict(d_initial=float("nan"))):
    kw = dict(dict(r=4, target_modules=["q_proj"]), **kw)
    assert _peft_error(torch_base, kw) is None
    with pytest.raises(InvalidConfigError, match="vera_dropout|d_initial"):
      registry.config_from_dict(dict(peft_type="VERA", **kw))


def test_fan_in_fan_out_is_reset_like_peft(torch_base):
  model = _peft_model(torch_base, r=4, target_modules=["q_proj"], fan_in_fan_out=True)
  assert model.peft_config["default"].fan_in_fan_out is False
  config = registry.config_from_dict(dict(peft_type="VERA", r=4, target_modules=["q_proj"], fan_in_fan_out=True))
  assert config.fan_in_fan_out is False


@pytest.mark.parametrize("kw", [dict(init_weights=False), dict(d_initial=0.3)])
def test_inits_are_pefts(kw, torch_base, jax_model):
  """λ_b = 0, λ_d = d_initial (exactly); init_weights=False: λ_b = 1 and λ_d random (PEFT: randn of the global RNG)."""
  model = _peft_model(torch_base, r=4, target_modules=["q_proj"], **kw)
  layer = model.base_model.model.model.layers[0].self_attn.q_proj
  config, params = jax_model
  peft_config = registry.config_from_dict(dict(peft_type="VERA", r=4, target_modules=["q_proj"], **kw))
  adapter, _ = core.init(jax.random.key(0), params, peft_config, config)
  ours = adapter["model.layers.0.self_attn.q_proj"]
  lambda_b = layer.vera_lambda_b["default"].detach().numpy()
  np.testing.assert_array_equal(np.asarray(ours["vera_lambda_b"]), lambda_b)
  if kw.get("init_weights", True):
    np.testing.assert_array_equal(np.asarray(ours["vera_lambda_d"]), layer.vera_lambda_d["default"].detach().numpy())
  else:
    assert np.all(lambda_b == 1) and np.std(np.asarray(ours["vera_lambda_d"])) > 0.1
  assert registry.get_method("VERA").identity_at_init(peft_config) == kw.get("init_weights", True)


# ------------------------------------------------------------------------------------------------------------
# Dropout (layer level, against PEFT's vera.Linear with jpeft's mask injected)

RATE = 0.3
IN, OUT, R = 24, 16, 4


def test_dropout_only_in_training_and_as_peft_applies_it():
  torch.manual_seed(0)
  model = peft.get_peft_model(
    torch.nn.Sequential(torch.nn.Linear(IN, OUT, bias=False)),
    peft.VeraConfig(r=R, target_modules=["0"], vera_dropout=RATE),
  )
  layer = model.base_model.model[0]
  rng = np.random.default_rng(0)
  lambda_b, lambda_d = rng.standard_normal(OUT).astype(np.float32), rng.standard_normal(R).astype(np.float32)
  with torch.no_grad():
    layer.vera_lambda_b["default"].copy_(torch.as_tensor(lambda_b))
    layer.vera_lambda_d["default"].copy_(torch.as_tensor(lambda_d))
  x = rng.standard_normal((3, 5, IN)).astype(np.float32)
  weight = layer.base_layer.weight.detach().numpy()
  spec = ModuleSpec("lin", "linear", jnp.asarray(weight))
  shared = {"vera_A": layer.vera_A["default"].numpy(), "vera_B": layer.vera_B["default"].numpy()}
  config = registry.config_from_dict(dict(peft_type="VERA", r=R, target_modules=["lin"], vera_dropout=RATE))
  tensors = {"vera_lambda_b": jnp.asarray(lambda_b), "vera_lambda_d": jnp.asarray(lambda_d)}
  key = jax.random.key(3)

  def ours(rng):
    return np.asarray(vera.adapt_module(spec, tensors, config, shared, rng)["weight"].matmul(jnp.asarray(x)))

  def theirs(train):
    model.train(train)
    with torch.no_grad():
      return layer(torch.as_tensor(x)).numpy()

  eval_out = ours(None)
  np.testing.assert_array_equal(eval_out, ours(None))
  assert_close_to_scale(eval_out, theirs(False), 8 * EPS32, what="vera eval layer vs PEFT")
  train_out = ours(key)
  assert scaled_error(train_out, eval_out) > 1e-2  # dropout acts in training
  np.testing.assert_array_equal(train_out, ours(key))  # the key decides the mask
  keep = np.array(jax.random.bernoulli(key, 1.0 - RATE, x.shape))  # base.dropout's draw on the same key
  layer.vera_dropout["default"] = FixedMaskDropout(keep, RATE)
  assert_close_to_scale(train_out, theirs(True), 8 * EPS32, what="vera train layer vs PEFT, same mask")
  # dropout is on the adapter's input only: the base product sees the whole x
  zero_b = vera.adapt_module(spec, dict(tensors, vera_lambda_b=jnp.zeros(OUT)), config, shared, key)["weight"]
  base_only = base_matmul(jnp.asarray(x), spec.weight, jnp.float32)
  np.testing.assert_array_equal(np.asarray(zero_b.matmul(jnp.asarray(x))), np.asarray(base_only))


# ------------------------------------------------------------------------------------------------------------
# Bad adapters and sharding axes


def test_bad_adapter_entries_are_refused(jax_model):
  config, params = jax_model
  peft_config = registry.config_from_dict(METHODS["vera"])
  adapter, _ = core.init(jax.random.key(0), params, peft_config, config)
  name = "model.layers.0.mlp.down_proj"
  bad = dict(adapter, **{name: {"vera_lambda_b": adapter[name]["vera_lambda_b"]}})
  with pytest.raises(AdapterCheckpointError, match=r"down_proj.*vera_lambda_d"):
    core.apply(params, bad, peft_config)
  small = dict(
    adapter,
    **{core.SHARED: {"vera_A": adapter[core.SHARED]["vera_A"][:, :64], "vera_B": adapter[core.SHARED]["vera_B"]}},
  )
  with pytest.raises(AdapterCheckpointError, match=r"do not cover 'model\.layers\.0\.mlp\.down_proj'"):
    core.apply(params, small, peft_config)
  no_shared = {k: v for k, v in adapter.items() if k != core.SHARED}
  with pytest.raises(AdapterCheckpointError, match="vera_A"):
    core.apply(params, no_shared, peft_config)


def test_frozen_tensors_and_axes():
  config = registry.config_from_dict(METHODS["vera"])
  method = registry.get_method("VERA")
  assert core.frozen_tensors(config) == {"vera_A", "vera_B"}
  assert method.tensor_axes("vera_lambda_b", "linear", config) == (0,)
  assert method.tensor_axes("vera_lambda_d", "linear", config) is None


def test_merged_model_matches_peft_merge(folder, torch_base, tmp_path):
  """PEFT's merge_and_unload of the same perturbed adapter gives the weights jpeft's merge gives."""
  jx = get_backend("jax")
  jx.load_base(folder)
  jx.attach_adapter(METHODS["vera"], seed=0)
  state = jx.adapter_state_dict()
  rng = np.random.default_rng(1)
  state = {
    k: v if k.startswith("base_model.vera_") else v + rng.standard_normal(v.shape).astype(v.dtype)
    for k, v in state.items()
  }
  jx.set_adapter_state_dict(state)
  jx.save_adapter(str(tmp_path))
  merged = core.merge(jx.params, jx.trainable, jx.peft_config)
  theirs = peft.PeftModel.from_pretrained(copy.deepcopy(torch_base), str(tmp_path)).merge_and_unload().state_dict()
  for k in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
    assert_close_to_scale(np.asarray(merged[k]), theirs[k].numpy(), 8 * EPS32, what=f"merged {k}")
