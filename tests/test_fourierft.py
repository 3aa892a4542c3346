"""FourierFT beyond the method table: the frequency indices against PEFT's own, ΔW against ``get_delta_weight``,
PEFT's config errors, ``n_frequency_pattern``'s own matching rule, the saved keys, the init and bad adapters.

The indices are compared with ``np.testing.assert_array_equal``: PEFT regenerates them from ``random_loc_seed`` and
never saves them, so anything short of bit-exact would make every checkpoint compute something else in jpeft.
Float comparisons are relative to scale (``numerics``); each bound has its measured value beside it.
"""

import copy
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from peft.tuners.fourierft.layer import FourierFTLayer, FourierFTLinear
from safetensors.numpy import load_file, save_file

from backends.tiny import make_batch
from jpeft import checkpoint, core, registry
from jpeft.config import AdapterCheckpointError, ConfigTypeError, InvalidConfigError, JpeftError
from jpeft.methods import fourierft
from jpeft.methods.base import ModuleSpec
from jpeft.models import forward
from jpeft.targets import UnsupportedTargetError
from numerics import EPS32, assert_close_to_scale

# On the tiny model: q_proj 64x64, v_proj 32x64 (2 kv heads of 16), down_proj 64x128.
QVD = ["q_proj", "v_proj", "down_proj"]
SHAPES = {"q_proj": (64, 64), "v_proj": (32, 64), "down_proj": (64, 128)}


# the tiny Llama: the `folder`, `torch_base` and `jax_model` fixtures of conftest.py


def _peft_model(torch_base, **kw):
  return peft.get_peft_model(copy.deepcopy(torch_base), peft.FourierFTConfig(**kw))


def _peft_layers(model) -> dict:
  """``{HF module name: FourierFTLayer}`` of a PEFT model."""
  prefix = "base_model.model."
  return {n[len(prefix) :]: m for n, m in model.named_modules() if isinstance(m, FourierFTLayer)}


def _config(**kw):
  return registry.config_from_dict(dict(peft_type="FOURIERFT", **kw))


# ------------------------------------------------------------------------------------------------------------
# The derived indices and ΔW


@pytest.mark.parametrize("seed", [777, 0, 11, 2**32 + 5, -3, 2**64 - 1])
def test_indices_are_peft_buffers(torch_base, seed):
  # n = out·in on v_proj (a full permutation, the largest n PEFT accepts); 40 elsewhere
  kw = dict(n_frequency=40, random_loc_seed=seed, n_frequency_pattern={"v_proj": 2048}, target_modules=QVD)
  layers = _peft_layers(_peft_model(torch_base, **kw))
  config = _config(**kw)
  assert len(layers) == 6
  for name, layer in layers.items():
    n = fourierft.n_frequency_for(config, name)
    assert n == layer.fourierft_n_frequency["default"] == (2048 if name.endswith("v_proj") else 40)
    rows, cols = fourierft.frequency_indices(layer.out_features, layer.in_features, n, seed)
    np.testing.assert_array_equal(np.stack([rows, cols]), layer.indices["default"].numpy(), err_msg=name)
    assert not rows.flags.writeable and not cols.flags.writeable  # the cached arrays cannot be changed by a caller


def test_delta_weight_is_peft(torch_base, jax_model, tmp_path):
  """ΔW against PEFT's ``get_delta_weight`` (fp32 and a bf16 spectrum), and jpeft's merge of a PEFT checkpoint
  against PEFT's ``merge_and_unload``."""
  kw = dict(
    n_frequency=50, scaling=123.5, random_loc_seed=5, n_frequency_pattern={"down_proj": 300}, target_modules=QVD
  )
  model = _peft_model(torch_base, **kw)
  torch.manual_seed(0)
  with torch.no_grad():
    for layer in _peft_layers(model).values():
      layer.fourierft_spectrum["default"].normal_()
  model.save_pretrained(str(tmp_path))
  for name, layer in _peft_layers(model).items():
    spectrum = layer.fourierft_spectrum["default"].detach()
    ours = fourierft.spectral_delta(jnp.asarray(spectrum.numpy()), *SHAPES[name.split(".")[-1]], 123.5, 5)
    # Each entry sums n products through two fp32 FFTs (torch's pocketfft vs XLA's ducc): measured worst 2.2e-7
    # = 1.9 eps of the largest entry; bound 8 eps. Transposed indices or another normalisation give O(1).
    assert_close_to_scale(ours, layer.get_delta_weight("default").detach().numpy(), 8 * EPS32, what=f"ΔW {name}")
    # A bf16 spectrum (autocast_adapter_dtype=False): both compute in fp32, then round ΔW to bf16; an entry whose
    # fp32 values straddle a bf16 rounding boundary differs by one ulp of itself. Measured worst 7.3e-4 (0 on 4 of 6
    # modules); bound one bf16 ulp of the largest entry, 2^-8.
    with torch.no_grad():
      layer.fourierft_spectrum["default"].data = spectrum.to(torch.bfloat16)
    theirs = layer.get_delta_weight("default")
    assert theirs.dtype == torch.bfloat16
    ours = fourierft.spectral_delta(jnp.asarray(spectrum.numpy(), jnp.bfloat16), *layer.weight.shape, 123.5, 5)
    assert ours.dtype == jnp.bfloat16
    assert_close_to_scale(ours, theirs.detach().float().numpy(), 2.0**-8, what=f"bf16 ΔW {name}")
  merged_theirs = {
    k: v.detach().numpy() for k, v in _peft_model_from(torch_base, tmp_path).merge_and_unload().state_dict().items()
  }
  model_config, params = jax_model
  config, adapter, params = checkpoint.load_pretrained(str(tmp_path), params, model_config)
  merged = core.merge(params, adapter, config)
  for name in _peft_layers(model):
    # W + ΔW: ΔW's FFT differences (above) plus one rounding of the sum: measured worst 2.1e-7 = 1.7 eps; bound 8 eps.
    k = name + ".weight"
    assert_close_to_scale(merged[k], merged_theirs[k], 8 * EPS32, what=f"merged {k}")


def _peft_model_from(torch_base, folder):
  return peft.PeftModel.from_pretrained(copy.deepcopy(torch_base), str(folder))


def _bf16_outputs(weight, scaling, x, seed=3, n=100, spectrum_dtype=torch.float32):
  """PEFT's FourierFTLinear on a bf16 ``weight`` and jpeft's, on bf16 ``x`` (the spectrum fp32 as after PEFT's
  autocast, or bf16 as with ``autocast_adapter_dtype=False``)."""
  linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False).to(torch.bfloat16)
  with torch.no_grad():
    linear.weight.copy_(torch.tensor(weight).to(torch.bfloat16))
  layer = FourierFTLinear(
    linear, "default", config=peft.FourierFTConfig(scaling=scaling, random_loc_seed=seed), n_frequency=n
  )
  torch.manual_seed(2)
  with torch.no_grad():
    layer.fourierft_spectrum["default"].data = torch.randn(n).to(spectrum_dtype)
    theirs = layer(torch.tensor(x).to(torch.bfloat16)).float().numpy()
  jax_dtype = jnp.bfloat16 if spectrum_dtype == torch.bfloat16 else jnp.float32
  spectrum = jnp.asarray(layer.fourierft_spectrum["default"].detach().float().numpy(), jax_dtype)
  ours = fourierft.FourierFTWeight(jnp.asarray(weight, jnp.bfloat16), spectrum, scaling=scaling, seed=seed).matmul(
    jnp.asarray(x, jnp.bfloat16)
  )
  assert ours.dtype == jnp.bfloat16
  return np.asarray(ours, np.float32), theirs


def test_bf16_base_keeps_the_adapter_term_in_fp32_like_peft():
  """A bf16 Linear with an fp32 spectrum (PEFT's autocast): the base term in bf16, ΔW's in fp32, one rounding."""
  rng = np.random.default_rng(0)
  # Both round the fp32 sum to bf16 once; the bf16 base products are summed in other orders. Measured 0 of the
  # largest output; bound 2 bf16 ulps (2^-7), as the orders could differ on another CPU. Without ΔW: 1.08.
  ours, theirs = _bf16_outputs(rng.uniform(-0.125, 0.125, (32, 64)), 300.0, rng.standard_normal((8, 64)))
  assert_close_to_scale(ours, theirs, 2 * 2.0**-8, what="bf16 base output")
  # A base term that cancels exactly (every W entry 8, inputs in ± pairs of small integers), so the output is the
  # adapter's term alone. ΔW (~0.01 here) lies mostly below half a bf16 ulp of 8 (2^-5): a bf16 ``W + ΔW`` rounds
  # it away (measured 0.70 of the scale; 0.0027 in the case above). Measured 0; bound 2 bf16 ulps.
  half = rng.choice(np.array([-2.0, -1.0, 1.0, 2.0]), (8, 32))
  ours, theirs = _bf16_outputs(np.full((32, 64), 8.0), 3.0, np.concatenate([half, -half], axis=1))
  assert_close_to_scale(ours, theirs, 2 * 2.0**-8, what="bf16 base output, cancelling base")
  # The same with a bf16 spectrum (autocast_adapter_dtype=False): PEFT still adds x ΔWᵀ to the base term, never
  # rounds W + ΔW. Measured 0 (a bf16 W + ΔW: 0.70); bound 2 bf16 ulps.
  ours, theirs = _bf16_outputs(
    np.full((32, 64), 8.0), 3.0, np.concatenate([half, -half], axis=1), spectrum_dtype=torch.bfloat16
  )
  assert_close_to_scale(ours, theirs, 2 * 2.0**-8, what="bf16 base and spectrum, cancelling base")


# ------------------------------------------------------------------------------------------------------------
# Config: PEFT's errors and values


def _peft_outcome(torch_base, kw):
  """None if PEFT builds the model and runs a forward with ``kw``, else the exception's type."""
  try:
    model = _peft_model(torch_base, **kw)
    model(torch.tensor([[1, 2, 3]]))
  except Exception as e:  # noqa: BLE001 -- PEFT raises ValueError, TypeError, RuntimeError, NotImplementedError
    return type(e), None
  return None, model.peft_config["default"]


def _jpeft_outcome(jax_model, kw):
  model_config, params = jax_model
  try:
    config = _config(**kw)
    adapter, base = core.init(jax.random.key(0), params, config, model_config)
    forward(core.apply(base, adapter, config), model_config, np.array([[1, 2, 3]]), np.ones((1, 3), np.int32))
  except JpeftError as e:
    return e, None
  return None, config


_BASE = dict(n_frequency=10, target_modules=QVD)
CONFIG_CASES = {
  # name: (kwargs, jpeft's message when both refuse, else None)
  "defaults": ({"target_modules": QVD}, None),
  "n_frequency=0": (dict(_BASE, n_frequency=0), "`n_frequency` should be a positive integer value"),
  "n_frequency<0": (dict(_BASE, n_frequency=-3), "`n_frequency` should be a positive integer value"),
  "n_frequency>out·in": (dict(_BASE, n_frequency=4097), "_proj: `n_frequency` should be less than or equal"),
  "n_frequency float": (dict(_BASE, n_frequency=10.0), "`n_frequency` must be an integer"),
  "pattern 0": (dict(_BASE, n_frequency_pattern={"v_proj": 0}), r"`n_frequency_pattern\['v_proj'\]` should be"),
  "pattern>out·in": (dict(_BASE, n_frequency_pattern={"v_proj": 2049}), "v_proj: `n_frequency` should be less"),
  "pattern=out·in": (dict(_BASE, n_frequency_pattern={"v_proj": 2048}), None),
  "seed None": (dict(_BASE, random_loc_seed=None), "`random_loc_seed` should be an int"),
  "seed bool": (dict(_BASE, random_loc_seed=True), "`random_loc_seed` must be an integer or null"),
  "seed 2**64": (dict(_BASE, random_loc_seed=2**64), "within torch's seed range"),
  "seed -2**63": (dict(_BASE, random_loc_seed=-(2**63)), None),
  "bias foo": (dict(_BASE, bias="foo"), "Requested bias: 'foo', is not implemented"),
  "bias fourier_only": (dict(_BASE, bias="fourier_only"), None),
  "bias lora_only": (dict(_BASE, bias="lora_only"), None),  # PEFT's tuner takes any "_only" suffix
  "bias all": (dict(_BASE, bias="all"), None),
  "fan_in_fan_out": (dict(_BASE, fan_in_fan_out=True), None),  # both switch it off on a Linear
  "scaling str": (dict(_BASE, scaling="x"), "`scaling` must be a number"),
  "embedding target": (dict(_BASE, target_modules=["embed_tokens", "q_proj"]), "embed_tokens"),
  "init zeros": (dict(_BASE, init_weights=True, scaling=0), None),
}
_FIELDS = ("n_frequency", "scaling", "random_loc_seed", "fan_in_fan_out", "bias", "n_frequency_pattern", "init_weights")


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_config_accepts_and_refuses_what_peft_does(torch_base, jax_model, case):
  kw, message = CONFIG_CASES[case]
  peft_error, theirs = _peft_outcome(torch_base, kw)
  jpeft_error, ours = _jpeft_outcome(jax_model, kw)
  if message is None:
    assert peft_error is None and jpeft_error is None, (peft_error, jpeft_error)
    for f in _FIELDS:
      assert getattr(ours, f) == getattr(theirs, f), f
  else:
    assert peft_error is not None, f"PEFT accepts {kw}"
    assert jpeft_error is not None, f"jpeft accepts {kw}"
    assert re.search(message, str(jpeft_error)), str(jpeft_error)


def test_config_error_types():
  with pytest.raises(ConfigTypeError, match="random_loc_seed"):
    _config(random_loc_seed=None)
  with pytest.raises(InvalidConfigError, match="n_frequency"):
    _config(n_frequency=0)
  with pytest.raises(InvalidConfigError, match="scaling"):
    _config(scaling=float("inf"))
  with pytest.raises(InvalidConfigError, match="n_frequency_pattern"):
    _config(n_frequency_pattern={"(v_proj": 3})  # not a regular expression
  with pytest.raises(ConfigTypeError, match="n_frequency_pattern"):
    _config(n_frequency_pattern={"v_proj": "3"})
  assert _config(n_frequency_pattern=None).n_frequency_pattern == {}  # PEFT crashes on None; jpeft reads {}


@pytest.mark.parametrize(
  "pattern",
  [
    {"v_proj": 7},
    {"q_proj|v_proj": 7},  # PEFT's ungrouped regex: `.*\.q_proj|v_proj$` -- q_proj matches, v_proj never does
    {"v_proj": 7, "self_attn.v_proj": 9},  # the first matching key wins
    {"self_attn.v_proj": 9, "v_proj": 7},
    {"model.layers.0.self_attn.q_proj": 7},  # a full name matches only exactly (no dot before it)
    {"layers.1.self_attn.q_proj": 7},
    {"proj": 7},  # no dot boundary before "proj": matches nothing
    {r"layers\.0\..*": 7},
  ],
)
def test_n_frequency_pattern_resolves_as_peft(torch_base, jax_model, pattern):
  kw = dict(n_frequency=10, target_modules=QVD, n_frequency_pattern=pattern)
  theirs = {n: m.fourierft_n_frequency["default"] for n, m in _peft_layers(_peft_model(torch_base, **kw)).items()}
  config = _config(**kw)
  model_config, params = jax_model
  adapter, _ = core.init(jax.random.key(0), params, config, model_config)
  ours = {name: tensors["fourierft_spectrum"].shape[0] for name, tensors in adapter.items()}
  assert ours == theirs
  assert {n: fourierft.n_frequency_for(config, n) for n in theirs} == theirs


# ------------------------------------------------------------------------------------------------------------
# Saved keys, init


def test_saved_keys_hold_the_spectrum_only(torch_base, jax_model, tmp_path):
  kw = dict(n_frequency=20, target_modules=QVD, n_frequency_pattern={"v_proj": 30})
  model_config, params = jax_model
  config = _config(**kw)
  adapter, base = core.init(jax.random.key(0), params, config, model_config)
  assert {t for tensors in adapter.values() for t in tensors} == {"fourierft_spectrum"}
  weight = core.apply(base, adapter, config)["model.layers.0.self_attn.v_proj.weight"]
  assert [x.shape for x in jax.tree_util.tree_leaves(weight)] == [(32, 64), (30,)]  # W and the spectrum, no indices
  checkpoint.save_pretrained(str(tmp_path / "jpeft"), adapter, config)
  _peft_model(torch_base, **kw).save_pretrained(str(tmp_path / "peft"))
  ours = load_file(str(tmp_path / "jpeft" / "adapter_model.safetensors"))
  theirs = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
  assert set(ours) == set(theirs) and len(ours) == 6
  assert all(k.endswith(".fourierft_spectrum") for k in ours)
  assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


@pytest.mark.parametrize("init_weights", [False, True])
def test_init(jax_model, init_weights):
  model_config, params = jax_model
  config = _config(n_frequency=1000, target_modules=["q_proj", "v_proj"], init_weights=init_weights)
  assert registry.get_method("FOURIERFT").identity_at_init(config) is init_weights
  adapter, _ = core.init(jax.random.key(0), params, config, model_config)
  spectra = np.concatenate([np.asarray(t["fourierft_spectrum"]) for t in adapter.values()])
  assert spectra.shape == (4000,) and spectra.dtype == np.float32
  if init_weights:
    assert not spectra.any()
  else:  # N(0, 1) like torch.randn: over 4000 draws the mean is within 0.05 and the std within 0.05 of 1
    assert abs(spectra.mean()) < 0.05 and abs(spectra.std() - 1) < 0.05, (spectra.mean(), spectra.std())


# ------------------------------------------------------------------------------------------------------------
# Bad adapters


def _spec(name="model.layers.0.self_attn.v_proj", kind="linear", shape=(32, 64)):
  return ModuleSpec(name, kind, jnp.zeros(shape, jnp.float32))


def test_bad_adapters_are_refused_by_name():
  config = _config(n_frequency=10)
  good = {"fourierft_spectrum": jnp.zeros(10)}
  fourierft.adapt_module(_spec(), good, config, {}, None)
  with pytest.raises(AdapterCheckpointError, match=r"v_proj.*fourierft_spectrum float32\[7\].*10 entries"):
    fourierft.adapt_module(_spec(), {"fourierft_spectrum": jnp.zeros(7)}, config, {}, None)
  with pytest.raises(AdapterCheckpointError, match=r"v_proj.*int32"):
    fourierft.adapt_module(_spec(), {"fourierft_spectrum": jnp.zeros(10, jnp.int32)}, config, {}, None)
  with pytest.raises(AdapterCheckpointError, match=r"holds \['fourierft_spectrum', 'indices'\]"):
    fourierft.adapt_module(_spec(), dict(good, indices=jnp.zeros((2, 10))), config, {}, None)
  with pytest.raises(UnsupportedTargetError, match="embed_tokens.*FourierFT does not support"):
    fourierft.adapt_module(_spec("model.embed_tokens", "embedding", (256, 64)), good, config, {}, None)
  with pytest.raises(InvalidConfigError, match=r"v_proj: `n_frequency`.*2049.*2048 \(a 32x64 weight"):
    fourierft.adapt_module(_spec(), {"fourierft_spectrum": jnp.zeros(2049)}, _config(n_frequency=2049), {}, None)


def test_checkpoint_that_does_not_fit_the_config_is_refused(torch_base, jax_model, tmp_path):
  model_config, params = jax_model
  _peft_model(torch_base, n_frequency=20, target_modules=["q_proj", "v_proj"]).save_pretrained(str(tmp_path))
  checkpoint.load_pretrained(str(tmp_path), params, model_config)  # as saved: loads
  path = os.path.join(tmp_path, "adapter_config.json")
  with open(path) as f:
    saved = json.load(f)
  with open(path, "w") as f:
    json.dump(dict(saved, n_frequency=21), f)
  with pytest.raises(AdapterCheckpointError, match=r"fourierft_spectrum' has shape \(20,\), the config expects"):
    checkpoint.load_pretrained(str(tmp_path), params, model_config)
  with open(path, "w") as f:
    json.dump(saved, f)
  weights = os.path.join(tmp_path, "adapter_model.safetensors")
  state = load_file(weights)
  key = next(iter(state)).replace("fourierft_spectrum", "indices")
  save_file(dict(state, **{key: np.zeros((2, 20), np.int64)}), weights)  # an indices tensor is no key of PEFT's
  with pytest.raises(AdapterCheckpointError, match="unexpected key"):
    checkpoint.load_pretrained(str(tmp_path), params, model_config)


def test_training_step_moves_the_spectrum_only(jax_model):
  """The derived indices stay out of the gradient: the loss is differentiable in the spectrum alone."""
  from jpeft import train

  model_config, params = jax_model
  config = _config(n_frequency=16, target_modules=["q_proj"])
  adapter, base = core.init(jax.random.key(0), params, config, model_config)
  b = {k: jnp.asarray(v) for k, v in make_batch(0, 2, 8, 256).items()}
  loss, grads = train.make_grad_fn(model_config, config)(adapter, base, b)
  assert np.isfinite(float(loss))
  assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(adapter)
  assert all(np.abs(np.asarray(g["fourierft_spectrum"])).max() > 0 for g in grads.values())


@pytest.mark.parametrize(
  "n,k,seed", [(1, 1, 0), (2, 2, 5), (10, 3, 777), (10, 10, 777), (4096, 100, 11), (20000, 20000, 3)]
)
def test_randperm_prefix_is_torch_randperm_prefix(n, k, seed):
  from jpeft.methods.torch_rng import randperm, randperm_prefix

  expected = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()[:k]
  np.testing.assert_array_equal(randperm_prefix(n, k, seed), expected)
  np.testing.assert_array_equal(randperm(n, seed)[:k], expected)
