"""HRA beyond the method table: config validation against PEFT's, the paired (identity) init, the reflections of both
modes against PEFT's own layer (odd r, r > in_features), PEFT's Gram-Schmidt quirk (PEFT_METHODS.md §6.1) and what
jpeft does about it, the merge against PEFT's merge_and_unload, and bad input.

Float bounds are relative to the compared tensor's largest entry (``numerics.assert_close_to_scale``); the measured
value is next to each (``JPEFT_PRINT_ERRORS=1 pytest -s``).
"""

import logging
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from peft.tuners.hra.layer import HRALinear

from backends import get_backend
from backends.tiny import make_batch, make_tiny_llama
from jpeft import config as config_lib
from jpeft import core, registry
from jpeft.methods import hra
from jpeft.methods.base import ModuleSpec
from jpeft.models import load_model
from jpeft.targets import UnsupportedTargetError
from numerics import EPS32, assert_close_to_scale

VOCAB = 256
Q_PROJ = "model.layers.0.self_attn.q_proj"
# One layer's output / merged weight against PEFT's (the same r rank-1 updates of an in×in matrix, then one matmul):
# measured worst 5.8e-7 (r = 70 > in_features, without GS; r <= 8: 4.1e-7); bound 16 eps = 1.9e-6. A wrong formula (the
# product reversed, a missing normalisation, the factor 2) gives > 1e-2.
LAYER_REL = 16 * EPS32
# Logits of the tiny model (tests/test_parity.py's LOGIT_REL): measured 7.1e-7; bound 32 eps = 3.8e-6.
LOGIT_REL = 32 * EPS32


def _peft_layer(in_features, out_features, quiet=True, **kw):
  with warnings.catch_warnings():
    if quiet:
      warnings.simplefilter("ignore")
    config = peft.HRAConfig(**kw)
    return HRALinear(torch.nn.Linear(in_features, out_features, bias=True), "default", config, r=config.r)


def _spec(in_features=64, out_features=32, name=Q_PROJ, kind="linear"):
  w = np.random.default_rng(0).standard_normal((out_features, in_features)).astype(np.float32)
  return ModuleSpec(name, kind, jnp.asarray(w))


# ------------------------------------------------------------------------------------------------------------
# Config validation against PEFT's


class _TwoLinears(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.q_proj, self.v_proj = torch.nn.Linear(16, 16), torch.nn.Linear(16, 8)


@pytest.mark.parametrize(
  "kwargs,message",
  [
    (dict(r=0), r"`r` should be a positive integer value but the value passed is 0"),
    (dict(r=-2), r"`r` should be a positive integer value but the value passed is -2"),
    (dict(bias="hra"), r"Requested bias: .?hra.?, is not implemented"),
  ],
)
def test_values_peft_refuses_when_building_are_refused_in_the_config(kwargs, message):
  # PEFT accepts these configs and raises when it builds the model (update_layer, _mark_only_adapters_as_trainable)
  config = peft.HRAConfig(target_modules=["q_proj", "v_proj"], **kwargs)
  with pytest.raises((ValueError, NotImplementedError), match=message):
    peft.get_peft_model(_TwoLinears(), config)
  with pytest.raises(config_lib.InvalidConfigError, match=message):
    hra.HRAConfig(**kwargs)


@pytest.mark.parametrize(
  "kwargs,message",
  [
    (dict(layers_pattern="layers"), r"`layers_pattern` is specified, `layers_to_transform` must also be specified"),
    (dict(target_modules=".*q_proj", layers_to_transform=[0]), r"`layers_to_transform` cannot be used when"),
    (dict(target_modules=".*q_proj", layers_pattern="layers"), r"`layers_pattern` cannot be used when"),
  ],
)
def test_config_refused_like_peft(kwargs, message):
  with pytest.raises(ValueError, match=message):
    peft.HRAConfig(**kwargs)
  with pytest.raises(config_lib.InvalidConfigError, match=message):
    hra.HRAConfig(**kwargs)


@pytest.mark.parametrize(
  "kwargs",
  [dict(), dict(r=5, apply_GS=True), dict(init_weights=False, bias="hra_only"), dict(bias="lora_only"), dict(r=1)],
)
def test_config_accepted_like_peft(kwargs):
  theirs, ours = peft.HRAConfig(**kwargs), hra.HRAConfig(**kwargs)
  for name in ("r", "apply_GS", "init_weights", "bias"):
    assert getattr(ours, name) == getattr(theirs, name), name
  peft.get_peft_model(_TwoLinears(), peft.HRAConfig(target_modules=["q_proj"], **kwargs))  # builds in PEFT too


@pytest.mark.parametrize(
  "kwargs,words",
  [(dict(r="8"), "`r` must be an integer"), (dict(apply_GS=1), "`apply_GS` must be true or false")],
)
def test_bad_config_types_name_the_field(kwargs, words):
  with pytest.raises(config_lib.ConfigTypeError, match=words):
    hra.HRAConfig(**kwargs)


# ------------------------------------------------------------------------------------------------------------
# Init


def test_paired_init_is_the_identity_with_peft_law():
  u = np.asarray(hra.init_module(jax.random.key(0), _spec(64), hra.HRAConfig(r=8))["hra_u"])
  peft_u = _peft_layer(64, 32, r=8).hra_u["default"].detach().numpy()
  assert u.shape == peft_u.shape == (64, 8)
  for x in (u, peft_u):
    np.testing.assert_array_equal(x[:, 0::2], x[:, 1::2])  # repeat_interleave: columns 2k and 2k+1 are equal
    # kaiming_uniform_(a=√5) on (in, r/2): U(±1/√(r/2)); the sample's largest entry is within 2% of the bound
    assert 0.98 * 0.5 < np.abs(x).max() <= 0.5
  h = np.asarray(hra.reflection(jnp.asarray(u), False))
  assert_close_to_scale(h, np.eye(64), 8 * EPS32, what="paired reflections cancel")  # measured 6.1e-8


@pytest.mark.parametrize("kwargs", [dict(r=5), dict(r=6, init_weights=False)])
def test_unpaired_init_has_peft_law(kwargs, caplog):
  caplog.set_level(logging.WARNING, logger="absl")
  u = np.asarray(hra.init_module(jax.random.key(1), _spec(64), hra.HRAConfig(**kwargs))["hra_u"])
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    peft_u = _peft_layer(64, 32, quiet=False, **kwargs).hra_u["default"].detach().numpy()
  odd = kwargs["r"] % 2 == 1
  assert odd == any("can NOT be performed when r is odd" in str(w.message) for w in caught)
  assert odd == ("The symmetric initialization can NOT be performed when r is odd!" in caplog.text)
  for x in (u, peft_u):
    assert len(np.unique(x[0])) == kwargs["r"]  # independent columns
    assert 0.97 / np.sqrt(kwargs["r"]) < np.abs(x).max() <= 1 / np.sqrt(kwargs["r"])  # U(±1/√r)
  assert not hra.HRA.identity_at_init(hra.HRAConfig(**kwargs))


# ------------------------------------------------------------------------------------------------------------
# The reflections against PEFT's layer


@pytest.mark.parametrize("apply_gs", [False, True])
@pytest.mark.parametrize("r", [1, 3, 8, 70])
def test_layer_output_and_merge_match_peft(apply_gs, r):
  if apply_gs and r > 64:
    return  # refused by jpeft (test_gram_schmidt_needs_r_at_most_in_features)
  layer = _peft_layer(64, 32, r=r, apply_GS=apply_gs, init_weights=False)
  u = layer.hra_u["default"].detach().numpy()
  w = layer.base_layer.weight.detach().numpy()
  x = np.random.default_rng(r).standard_normal((5, 64)).astype(np.float32)
  with torch.no_grad():
    ref = layer(torch.tensor(x)).numpy() - layer.base_layer.bias.numpy()
  ours = hra.HraWeight(jnp.asarray(w), jnp.asarray(u), apply_gs=apply_gs)
  assert_close_to_scale(np.asarray(ours.matmul(jnp.asarray(x))), ref, LAYER_REL, what=f"output r={r}")  # <= 5.4e-7
  layer.merge()
  merged = layer.base_layer.weight.detach().numpy()
  assert_close_to_scale(np.asarray(ours.materialize()), merged, LAYER_REL, what=f"merged r={r}")  # <= 5.8e-7
  assert np.abs(merged - w).max() > 1e-2  # the merge did change W


def test_reflections_are_orthogonal():
  u = jax.random.normal(jax.random.key(2), (64, 6))
  for gs in (False, True):
    h = np.asarray(hra.reflection(u, gs), np.float64)
    assert_close_to_scale(h @ h.T, np.eye(64), 16 * EPS32, what=f"H Hᵀ = I (GS={gs})")  # measured <= 2.0e-7


# ------------------------------------------------------------------------------------------------------------
# PEFT's Gram-Schmidt quirk


def test_peft_gram_schmidt_with_the_paired_init_is_broken_and_jpeft_is_not(caplog):
  """PEFT: apply_GS=True with init_weights=True orthogonalises repeated columns (0/0): NaN or a random reflection.
  jpeft draws independent columns instead (a warning says so): a finite reflection, never the identity."""
  torch.manual_seed(0)
  h = _peft_layer(64, 32, r=8, apply_GS=True).get_delta_weight("default").detach().numpy()
  assert not np.isfinite(h).all() or np.abs(h - np.eye(64)).max() > 0.5
  caplog.set_level(logging.WARNING, logger="absl")
  config = hra.HRAConfig(r=8, apply_GS=True)
  u = hra.init_module(jax.random.key(0), _spec(64), config)["hra_u"]
  assert "PEFT's symmetric init (init_weights=True) repeats every column" in caplog.text
  ours = np.asarray(hra.reflection(u, True), np.float64)
  assert np.isfinite(ours).all()
  assert_close_to_scale(ours @ ours.T, np.eye(64), 16 * EPS32, what="jpeft's GS init is a reflection")  # 1.1e-7
  assert not hra.HRA.identity_at_init(config)


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
  return make_tiny_llama(str(tmp_path_factory.mktemp("hra")), initializer_range=0.1)


def test_untrained_peft_gram_schmidt_checkpoint_is_refused(base_folder, tmp_path):
  pt, jx = get_backend("torch"), get_backend("jax")
  for b in (pt, jx):
    b.load_base(base_folder)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    pt.attach_adapter(dict(peft_type="HRA", r=4, apply_GS=True, target_modules=["q_proj"]), seed=0)
  pt.save_adapter(str(tmp_path))
  with pytest.raises(config_lib.AdapterCheckpointError, match=r"q_proj.*cannot be orthogonalised.*column 1"):
    jx.load_adapter(str(tmp_path))


def test_gram_schmidt_needs_r_at_most_in_features():
  # PEFT builds it; its reflection is then not orthogonal (or NaN): r > in columns cannot be orthonormal
  h = _peft_layer(8, 4, r=10, apply_GS=True, init_weights=False).get_delta_weight("default").detach().numpy()
  assert not np.isfinite(h).all() or np.abs(h @ h.T - np.eye(8)).max() > 1e-2
  with pytest.raises(config_lib.InvalidConfigError, match=r"q_proj: HRA with apply_GS=True needs r <= in_features"):
    hra.init_module(jax.random.key(0), _spec(8, 4), hra.HRAConfig(r=10, apply_GS=True))
  hra.init_module(jax.random.key(0), _spec(8, 4), hra.HRAConfig(r=10))  # without GS it is a product of reflections


# ------------------------------------------------------------------------------------------------------------
# The model: merge against PEFT's merge_and_unload


def test_merge_matches_peft(base_folder):
  cfg = dict(peft_type="HRA", r=4, target_modules=["q_proj", "down_proj"])
  pt, jx = get_backend("torch"), get_backend("jax")
  for b in (pt, jx):
    b.load_base(base_folder)
  pt.attach_adapter(cfg, seed=0)
  rng = np.random.default_rng(0)
  state = {k: (v + 0.1 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in pt.adapter_state_dict().items()}
  pt.set_adapter_state_dict(state)
  jx.attach_adapter(cfg, seed=0)
  jx.set_adapter_state_dict(state)
  b = make_batch(0, 2, 12, VOCAB)
  mask = b["attention_mask"].astype(bool)
  ref = pt.logits(b["input_ids"], b["attention_mask"])
  pt.merge()
  jx.merge()
  merged = {k: v.detach().numpy() for k, v in pt.model.state_dict().items()}
  for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
    # W H: measured <= 2.8e-7; H applied on the other side (H W) is not even the right shape for v/down
    assert_close_to_scale(np.asarray(jx.params[name]), merged[name], LAYER_REL, what=f"merged {name}")
    assert np.abs(merged[name] - np.asarray(jx.base_params[name])).max() > 1e-2
  # measured 7.1e-7
  assert_close_to_scale(jx.logits(b["input_ids"], b["attention_mask"]), ref, LOGIT_REL, mask=mask, what="merged")


# ------------------------------------------------------------------------------------------------------------
# Bad input


def test_bad_adapter_tensors_are_refused():
  config = hra.HRAConfig(r=4)
  spec = _spec(64)
  with pytest.raises(config_lib.AdapterCheckpointError, match=r"q_proj: `hra_u` has shape \(4, 64\).*needs \(64, 4\)"):
    hra.adapt_module(spec, {"hra_u": jnp.zeros((4, 64))}, config, {}, None)  # transposed
  with pytest.raises(config_lib.AdapterCheckpointError, match=r"q_proj: `hra_u` has shape \(64, 8\).*r=4"):
    hra.adapt_module(spec, {"hra_u": jnp.zeros((64, 8))}, config, {}, None)  # another r
  with pytest.raises(config_lib.AdapterCheckpointError, match=r"holds \['hra_u', 'oft_R.weight'\]"):
    hra.adapt_module(spec, {"hra_u": jnp.zeros((64, 4)), "oft_R.weight": jnp.zeros(1)}, config, {}, None)


def test_embedding_target_is_refused_like_peft(base_folder):
  pt = get_backend("torch")
  pt.load_base(base_folder)
  with pytest.raises(TypeError, match=r"only `torch.nn.Linear` and `torch.nn.Conv2d` are supported"):
    pt.attach_adapter(dict(peft_type="HRA", target_modules=["embed_tokens"]))
  model_config, params = load_model(base_folder)
  config = registry.config_from_dict(dict(peft_type="HRA", target_modules=["embed_tokens"]))
  with pytest.raises(UnsupportedTargetError, match=r"embed_tokens.*HRA does not support"):
    core.init(jax.random.key(0), params, config, model_config)
