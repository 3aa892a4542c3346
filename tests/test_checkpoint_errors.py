"""Bad adapter input gives a clear error naming the problem."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from backends.tiny import make_tiny_llama
from jpeft import registry
from jpeft import checkpoint, core
from jpeft import config as config_lib
from jpeft.models import load_model, module_kinds
from jpeft.targets import NoMatchingTargetsError, UnsupportedTargetError


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  return load_model(make_tiny_llama(str(tmp_path_factory.mktemp("m"))))


@pytest.fixture()
def saved(model, tmp_path):
  config, params = model
  peft_config = registry.config_from_dict(dict(peft_type="LORA", r=4, lora_alpha=8, target_modules=["q_proj"]))
  adapter, _ = core.init(jax.random.key(0), params, peft_config, config)
  checkpoint.save_pretrained(str(tmp_path), adapter, peft_config)
  return str(tmp_path)


def _edit(folder, fn):
  path = os.path.join(folder, checkpoint.ADAPTER_WEIGHTS)
  state = load_file(path)
  fn(state)
  save_file(state, path, metadata={"format": "pt"})


def test_roundtrip(model, saved):
  config, params = model
  peft_config, adapter, _ = checkpoint.load_pretrained(saved, params, config)
  assert peft_config.r == 4 and len(adapter) == 2


def test_wrong_shape_names_tensor_and_shapes(model, saved):
  key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
  _edit(saved, lambda s: s.__setitem__(key, np.zeros((64, 5), np.float32)))
  with pytest.raises(core.AdapterCheckpointError, match=r"q_proj.lora_B.weight.*\(64, 5\).*\(64, 4\)"):
    checkpoint.load_pretrained(saved, model[1], model[0])


def test_missing_key(model, saved):
  key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
  _edit(saved, lambda s: s.pop(key))
  with pytest.raises(core.AdapterCheckpointError, match="missing 1 key.*layers.0.self_attn.q_proj.lora_A"):
    checkpoint.load_pretrained(saved, model[1], model[0])


def test_unexpected_key(model, saved):
  _edit(
    saved,
    lambda s: s.__setitem__("base_model.model.model.layers.0.mlp.up_proj.lora_A.weight", np.zeros((4, 64), np.float32)),
  )
  with pytest.raises(core.AdapterCheckpointError, match="unexpected.*up_proj.lora_A"):
    checkpoint.load_pretrained(saved, model[1], model[0])


def test_corrupt_file(model, saved):
  path = os.path.join(saved, checkpoint.ADAPTER_WEIGHTS)
  data = open(path, "rb").read()
  open(path, "wb").write(data[: len(data) // 2])
  with pytest.raises(core.AdapterCheckpointError, match="not a readable safetensors file"):
    checkpoint.load_pretrained(saved, model[1], model[0])


def test_missing_weights_file(model, saved):
  os.remove(os.path.join(saved, checkpoint.ADAPTER_WEIGHTS))
  with pytest.raises(config_lib.FileMissingError, match="adapter_model.safetensors") as info:
    checkpoint.load_pretrained(saved, model[1], model[0])
  assert isinstance(info.value, FileNotFoundError)


def test_integer_and_nonfinite_tensors_are_refused(model, saved):
  key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
  _edit(saved, lambda s: s.__setitem__(key, (s[key] * 100).astype(np.int32)))
  with pytest.raises(core.AdapterCheckpointError, match=r"q_proj.lora_A.weight.*dtype int32"):
    checkpoint.load_pretrained(saved, model[1], model[0])
  _edit(saved, lambda s: s.__setitem__(key, np.full((4, 64), np.nan, np.float32)))
  with pytest.raises(core.AdapterCheckpointError, match=r"q_proj.lora_A.weight.*256 NaN or infinite"):
    checkpoint.load_pretrained(saved, model[1], model[0])


@pytest.mark.parametrize(
  "targets,module",
  [
    (["model.norm"], "model.norm"),
    (["input_layernorm"], "model.layers.0.input_layernorm"),
    (["post_attention_layernorm", "q_proj"], "model.layers.0.post_attention_layernorm"),
    (".*norm", "model.layers.0.input_layernorm"),
  ],
)
def test_norm_targets_are_refused_by_name_and_kind(model, targets, module):
  """PEFT's LoRA adapts Linear and Embedding modules only; a norm target names the module and its kind."""
  peft_config = registry.config_from_dict(dict(peft_type="LORA", target_modules=targets))
  with pytest.raises(UnsupportedTargetError) as info:
    core.init(jax.random.key(0), model[1], peft_config, model[0])
  message = str(info.value)
  assert f"Target module {module!r} is a norm (RMSNorm) layer" in message
  assert "Currently, only the following modules are supported: linear (torch.nn.Linear), embedding" in message
  assert "modules_to_save" in message  # how to train a norm instead
  assert isinstance(info.value, config_lib.JpeftError)
  with pytest.raises(UnsupportedTargetError, match=module):  # the same, before any weight: from the config only
    core.resolve(peft_config, model[0])


def test_norms_train_in_full_through_modules_to_save(model, tmp_path):
  config, params = model
  peft_config = registry.config_from_dict(
    dict(peft_type="LORA", r=2, target_modules=["q_proj"], modules_to_save=["model.norm", "input_layernorm"])
  )
  adapter, _ = core.init(jax.random.key(0), params, peft_config, config)
  assert {"model.norm", "model.layers.0.input_layernorm", "model.layers.1.input_layernorm"} <= set(adapter)
  checkpoint.save_pretrained(str(tmp_path), adapter, peft_config)
  _, loaded, _ = checkpoint.load_pretrained(str(tmp_path), params, config)
  np.testing.assert_array_equal(loaded["model.norm"]["weight"], params["model.norm.weight"])


def test_apply_uses_the_real_module_kind(model):
  config, params = model
  kinds = module_kinds(config)
  assert all(core.module_kind(name) == kind for name, kind in kinds.items())
  assert all(core.module_kind(name, config) == kind for name, kind in kinds.items())
  peft_config = registry.config_from_dict(dict(peft_type="LORA", r=2, target_modules=["q_proj"]))
  # a hand-made adapter on a norm (which init refuses) is refused by apply too, by name and kind
  bad = {"model.norm": {"lora_A.weight": np.zeros((2, 64), np.float32), "lora_B.weight": np.zeros((64, 2), np.float32)}}
  with pytest.raises(UnsupportedTargetError, match=r"'model.norm', a norm \(RMSNorm\) layer"):
    core.apply(params, bad, peft_config)
  with pytest.raises(core.AdapterCheckpointError, match="'model.layers.0.attn.qkv' is not a module"):
    core.apply(params, {"model.layers.0.attn.qkv": bad["model.norm"]}, peft_config)
  # an embedding adapter carrying a linear module's tensors names what it expected
  with pytest.raises(core.AdapterCheckpointError, match="lora_embedding_A"):
    core.apply(params, {"model.embed_tokens": bad["model.norm"]}, peft_config)
  with pytest.raises(core.AdapterCheckpointError, match="model.layers.5.self_attn.q_proj"):
    core.module_kind("model.layers.5.self_attn.q_proj", config)


def test_dropout_below_one_gives_finite_gradients(model):
  """lora_dropout=1 is refused (jax's dropout divides by the keep probability 1 - p = 0); 0.9 trains, finitely."""
  from backends.tiny import make_batch
  from jpeft import train

  config, params = model
  with pytest.raises(config_lib.InvalidConfigError, match="nothing trains"):
    registry.config_from_dict(dict(peft_type="LORA", r=4, lora_dropout=1.0, target_modules=["q_proj", "v_proj"]))
  batch = {k: jnp.asarray(v) for k, v in make_batch(0, 2, 12, 256).items()}
  grads = {}
  for p in (0.0, 0.9):
    peft_config = registry.config_from_dict(
      dict(peft_type="LORA", r=4, lora_dropout=p, target_modules=["q_proj", "v_proj"])
    )
    adapter, _ = core.init(jax.random.key(0), params, peft_config, config)
    adapter = jax.tree_util.tree_map(lambda x: x + 0.05, adapter)  # B != 0: both factors get gradients
    loss, grads[p] = train.make_grad_fn(config, peft_config)(adapter, params, batch, jax.random.key(1))
    leaves = jax.tree_util.tree_leaves(grads[p])
    assert np.isfinite(float(loss)) and all(bool(jnp.isfinite(g).all()) for g in leaves), p
    assert all(float(jnp.abs(g).max()) > 0 for g in leaves), p
  # the dropout was on: the gradients differ from the dropout-free ones
  name = "model.layers.0.self_attn.q_proj"
  assert not np.allclose(grads[0.0][name]["lora_A.weight"], grads[0.9][name]["lora_A.weight"])
  # a LoRA weight built by hand with p = 1 refuses to run rather than return NaN
  from jpeft.methods.lora import LoraWeight

  w = LoraWeight(
    params[name + ".weight"], jnp.ones((4, 64)), jnp.ones((64, 4)), scaling=1.0, dropout=1.0, rng=jax.random.key(0)
  )
  with pytest.raises(config_lib.InvalidConfigError, match="lora_dropout"):
    w.matmul(jnp.ones((1, 64)))


def test_unknown_peft_type(model, saved):
  cfg = json.load(open(os.path.join(saved, "adapter_config.json")))
  cfg["peft_type"] = "NOT_A_METHOD"
  json.dump(cfg, open(os.path.join(saved, "adapter_config.json"), "w"))
  with pytest.raises(config_lib.UnsupportedConfigError, match="NOT_A_METHOD.*LORA"):
    checkpoint.load_pretrained(saved, model[1], model[0])


def test_peft_method_not_in_jpeft_yet(model):
  with pytest.raises(config_lib.UnsupportedConfigError, match="'POLY' is a PEFT method that is not"):
    core.init(jax.random.key(0), model[1], registry.config_from_dict({"peft_type": "POLY"}), model[0])


def test_targets_matching_nothing_shows_names(model):
  peft_config = registry.config_from_dict(dict(peft_type="LORA", target_modules=["qkv_proj"]))
  with pytest.raises(NoMatchingTargetsError, match="qkv_proj.*model.layers.0.self_attn.q_proj"):
    core.init(jax.random.key(0), model[1], peft_config, model[0])


def test_nonpositive_rank():
  with pytest.raises(ValueError, match="`r` should be a positive integer value but the value passed is 0"):
    registry.config_from_dict(dict(peft_type="LORA", r=0, target_modules=["q_proj"]))


def test_unsupported_field_is_named():
  with pytest.raises(config_lib.UnsupportedConfigError, match="use_bdlora"):
    registry.config_from_dict(dict(peft_type="LORA", target_modules=["q_proj"], use_bdlora={"nblocks": 2}))


def test_bias_training_on_a_biased_model_is_refused(tmp_path):
  config, params = load_model(make_tiny_llama(str(tmp_path / "b"), attention_bias=True))
  peft_config = registry.config_from_dict(dict(peft_type="LORA", target_modules=["q_proj"], bias="all"))
  with pytest.raises(config_lib.UnsupportedConfigError, match="bias='all'"):
    core.init(jax.random.key(0), params, peft_config, config)
