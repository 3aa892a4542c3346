"""BEFT beyond the method table: the config against PEFT's, PEFT's default target and init_weights=False against
PEFT, the merge into a base bias (against PEFT's merge_and_unload and transformers on the merged folder), the refusal
to merge without one (as PEFT), the bf16 rounding of the sum, and bad input.

Float bounds are relative to the compared tensor's largest entry (``numerics.assert_close_to_scale``); the measured
value is next to each (``JPEFT_PRINT_ERRORS=1 pytest -s``).
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

from backends import get_backend
from backends.tiny import make_batch, make_tiny_llama
from jpeft import checkpoint, core, registry
from jpeft import config as config_lib
from jpeft.methods import beft
from jpeft.methods.base import ModuleSpec
from jpeft.models import forward, load_model
from jpeft.targets import UnsupportedTargetError
from numerics import EPS32, assert_close_to_scale

VOCAB = 256
# Logits of the tiny model (tests/test_parity.py's LOGIT_REL): measured worst 4.7e-7; bound 32 eps = 3.8e-6. A bias
# off by 1% of its size gives > 1e-4 here.
LOGIT_REL = 32 * EPS32


@pytest.fixture(autouse=True)
def _quiet():
  with warnings.catch_warnings():  # PEFT warns on every module without a bias
    warnings.filterwarnings("ignore", message="Detected that the base layer has no bias term")
    yield


# ------------------------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("kwargs", [dict(), dict(init_weights=False, target_modules=["q_proj"])])
def test_config_accepted_like_peft(kwargs):
  theirs, ours = peft.BeftConfig(**kwargs), beft.BeftConfig(**kwargs)
  assert ours.init_weights == theirs.init_weights


@pytest.mark.parametrize("field", ["exclude_modules", "layers_to_transform", "layers_pattern"])
def test_fields_peft_lacks_are_refused(field):
  value = {"exclude_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": "layers"}[field]
  with pytest.raises(TypeError, match=field):
    peft.BeftConfig(**{field: value})
  with pytest.raises(config_lib.InvalidConfigError, match=f"BeftConfig has no field `{field}`"):
    beft.BeftConfig(**{field: value, **({"layers_to_transform": [0]} if field == "layers_pattern" else {})})


def test_bad_config_type_names_the_field():
  with pytest.raises(config_lib.ConfigTypeError, match="`init_weights` must be true or false"):
    beft.BeftConfig(init_weights="yes")


# ------------------------------------------------------------------------------------------------------------
# Init, default target, init_weights=False against PEFT


def test_init_law():
  spec = ModuleSpec("model.layers.0.self_attn.v_proj", "linear", jnp.zeros((4096, 8)))
  np.testing.assert_array_equal(
    np.asarray(beft.init_module(jax.random.key(0), spec, beft.BeftConfig())["beft_bias"]), 0
  )
  rand = np.asarray(beft.init_module(jax.random.key(0), spec, beft.BeftConfig(init_weights=False))["beft_bias"])
  assert rand.shape == (1, 4096)
  assert abs(rand.mean()) < 0.06 and abs(rand.std() - 1) < 0.05  # N(0, 1), PEFT's torch.randn (4096 draws)


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
  return make_tiny_llama(str(tmp_path_factory.mktemp("beft")), initializer_range=0.1)


@pytest.fixture(scope="module")
def biased_folder(tmp_path_factory):
  # q, k, v, o and gate, up, down all with biases (0.1·N(0, 1))
  return make_tiny_llama(
    str(tmp_path_factory.mktemp("beft-bias")), initializer_range=0.1, attention_bias=True, mlp_bias=True
  )


def _backends(folder):
  jx, pt = get_backend("jax"), get_backend("torch")
  for b in (jx, pt):
    b.load_base(folder)
  return jx, pt


def test_default_target_and_random_init_match_peft(base_folder, tmp_path):
  cfg = dict(peft_type="BEFT", init_weights=False)  # target_modules null: PEFT's llama table, v_proj
  jx, pt = _backends(base_folder)
  pt.attach_adapter(cfg, seed=0)
  jx.attach_adapter(cfg, seed=0)
  keys = {f"base_model.model.model.layers.{i}.self_attn.v_proj.beft_bias" for i in range(2)}
  assert set(pt.adapter_state_dict()) == set(jx.adapter_state_dict()) == keys
  pt.save_adapter(str(tmp_path))  # PEFT's N(0, 1) biases, loaded by jpeft
  jx.load_adapter(str(tmp_path))
  b = make_batch(0, 2, 12, VOCAB)
  mask = b["attention_mask"].astype(bool)
  ref = pt.logits(b["input_ids"], b["attention_mask"])
  # measured 4.2e-7
  assert_close_to_scale(jx.logits(b["input_ids"], b["attention_mask"]), ref, LOGIT_REL, mask=mask, what="randn")
  plain = get_backend("torch")
  plain.load_base(base_folder)
  assert np.abs(plain.logits(b["input_ids"], b["attention_mask"]) - ref)[mask].max() > 0.1  # not the identity


# ------------------------------------------------------------------------------------------------------------
# Merge


def _perturbed_both(folder, cfg):
  jx, pt = _backends(folder)
  pt.attach_adapter(cfg, seed=0)
  rng = np.random.default_rng(0)
  state = {k: (v + 0.3 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in pt.adapter_state_dict().items()}
  pt.set_adapter_state_dict(state)
  jx.attach_adapter(cfg, seed=0)
  jx.set_adapter_state_dict(state)
  return jx, pt


def test_merge_into_a_base_bias_matches_peft(biased_folder, tmp_path):
  cfg = dict(peft_type="BEFT", target_modules=["q_proj", "v_proj", "down_proj"])
  jx, pt = _perturbed_both(biased_folder, cfg)
  b = make_batch(1, 2, 12, VOCAB)
  mask = b["attention_mask"].astype(bool)
  ref = pt.logits(b["input_ids"], b["attention_mask"])
  # measured 4.7e-7 (and merged below 4.7e-7)
  assert_close_to_scale(jx.logits(b["input_ids"], b["attention_mask"]), ref, LOGIT_REL, mask=mask, what="unmerged")
  adapter = jx.trainable
  pt.merge()
  jx.merge()
  merged = {k: v.detach().numpy() for k, v in pt.model.state_dict().items()}
  for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.1.mlp.down_proj"):
    np.testing.assert_array_equal(np.asarray(jx.params[name + ".weight"]), merged[name + ".weight"])  # W unchanged
    np.testing.assert_array_equal(np.asarray(jx.params[name + ".bias"]), merged[name + ".bias"])  # b + β, in fp32
    assert np.abs(merged[name + ".bias"] - np.asarray(jx.base_params[name + ".bias"])).max() > 0.1
  assert_close_to_scale(jx.logits(b["input_ids"], b["attention_mask"]), ref, LOGIT_REL, mask=mask, what="merged")
  # the merged folder is the base architecture with new biases: transformers reads it as it is (measured 4.1e-7)
  model_config, _ = load_model(biased_folder)
  checkpoint.save_merged_model(str(tmp_path), jx.params, model_config)
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(b["input_ids"]).long(), attention_mask=torch.tensor(b["attention_mask"]))
  assert_close_to_scale(theirs.logits.numpy(), ref, LOGIT_REL, mask=mask, what="transformers on the merged folder")
  with pytest.raises(NotImplementedError, match="cannot be unmerged by subtraction"):
    core.unmerge(jx.params, adapter, jx.peft_config, model_config=model_config)


@pytest.mark.parametrize("mlp_bias", [False, True])
def test_merge_without_a_base_bias_is_refused_like_peft(tmp_path, mlp_bias):
  """PEFT raises ValueError for a target without a bias; jpeft raises UnmergeableError naming it (mlp_bias=False:
  the attention targets have biases, down_proj has none; True: the no-bias base of tests/test_parity.py's rows)."""
  folder = make_tiny_llama(str(tmp_path), initializer_range=0.1, attention_bias=not mlp_bias, mlp_bias=False)
  cfg = dict(peft_type="BEFT", target_modules=["v_proj", "down_proj"])
  jx, pt = _perturbed_both(folder, cfg)
  with pytest.raises(ValueError, match="Base layer has no bias, cannot merge bias adapter"):
    pt.merge()
  module = "v_proj" if mlp_bias else "down_proj"  # the first module (by name) without a bias
  with pytest.raises(core.UnmergeableError, match=rf"BEFT cannot be merged into 'model.layers.\d.*{module}'.*no bias"):
    jx.merge()


def test_bf16_sum_is_rounded_once_like_peft():
  """PEFT: ``(base(x) + β).to(bf16)`` with an fp32 β promotes the sum to fp32 and rounds it once."""
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.standard_normal((64, 32)), jnp.bfloat16)
  beta = jnp.asarray(rng.standard_normal((1, 64)) * 1e-2, jnp.float32)
  x = jnp.asarray(rng.standard_normal((8, 32)), jnp.bfloat16)
  out = beft.BeftWeight(w, beta, name="m").matmul(x)
  y = jnp.einsum("ti,oi->to", x, w)
  assert out.dtype == jnp.bfloat16
  expected = (y.astype(jnp.float32) + beta[0]).astype(jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(expected, np.float32))
  double = y + beta[0].astype(jnp.bfloat16)  # rounding β to bf16 first would round twice
  assert np.any(np.asarray(double, np.float32) != np.asarray(expected, np.float32))


# ------------------------------------------------------------------------------------------------------------
# Bad input


def test_bad_adapter_tensors_are_refused():
  spec = ModuleSpec("model.layers.0.self_attn.v_proj", "linear", jnp.zeros((32, 64)))
  config = beft.BeftConfig()
  for shape in ((32,), (32, 1), (1, 64)):
    with pytest.raises(config_lib.AdapterCheckpointError, match=r"v_proj: `beft_bias` has shape .* needs \(1, 32\)"):
      beft.adapt_module(spec, {"beft_bias": jnp.zeros(shape)}, config, {}, None)
  with pytest.raises(config_lib.AdapterCheckpointError, match=r"holds \['ia3_l'\]; expected \['beft_bias'\]"):
    beft.adapt_module(spec, {"ia3_l": jnp.zeros((32, 1))}, config, {}, None)


def test_embedding_target_is_refused_like_peft(base_folder):
  pt = get_backend("torch")
  pt.load_base(base_folder)
  with pytest.raises(TypeError, match=r"only `torch.nn.Linear` is supported"):
    pt.attach_adapter(dict(peft_type="BEFT", target_modules=["embed_tokens"]))
  model_config, params = load_model(base_folder)
  config = registry.config_from_dict(dict(peft_type="BEFT", target_modules=["embed_tokens"]))
  with pytest.raises(UnsupportedTargetError, match=r"embed_tokens.*BEFT does not support"):
    core.init(jax.random.key(0), params, config, model_config)


def test_identity_at_init_on_a_biased_base(biased_folder):
  model_config, params = load_model(biased_folder)
  config = registry.config_from_dict(dict(peft_type="BEFT", target_modules=["q_proj", "down_proj"]))
  adapter, _ = core.init(jax.random.key(0), params, config, model_config)
  b = make_batch(0, 2, 12, VOCAB)
  out = forward(core.apply(params, adapter, config), model_config, b["input_ids"], b["attention_mask"])
  np.testing.assert_array_equal(
    np.asarray(out), np.asarray(forward(params, model_config, b["input_ids"], b["attention_mask"]))
  )
