"""Bad adapter input gives a clear error naming the problem."""

import json
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from backends.tiny import make_tiny_llama
from jpeft import checkpoint, core
from jpeft import config as config_lib
from jpeft.models import load_model
from jpeft.targets import NoMatchingTargetsError


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  return load_model(make_tiny_llama(str(tmp_path_factory.mktemp("m"))))


@pytest.fixture()
def saved(model, tmp_path):
  config, params = model
  peft_config = config_lib.config_from_dict(dict(peft_type="LORA", r=4, lora_alpha=8, target_modules=["q_proj"]))
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
  with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
    checkpoint.load_pretrained(saved, model[1], model[0])


def test_unknown_peft_type(model, saved):
  cfg = json.load(open(os.path.join(saved, "adapter_config.json")))
  cfg["peft_type"] = "NOT_A_METHOD"
  json.dump(cfg, open(os.path.join(saved, "adapter_config.json"), "w"))
  with pytest.raises(config_lib.UnsupportedConfigError, match="NOT_A_METHOD.*LORA"):
    checkpoint.load_pretrained(saved, model[1], model[0])


def test_peft_method_not_in_jpeft_yet(model):
  with pytest.raises(config_lib.UnsupportedConfigError, match="'OFT' is a PEFT method that is not"):
    core.init(jax.random.key(0), model[1], config_lib.config_from_dict({"peft_type": "OFT"}), model[0])


def test_targets_matching_nothing_shows_names(model):
  peft_config = config_lib.config_from_dict(dict(peft_type="LORA", target_modules=["qkv_proj"]))
  with pytest.raises(NoMatchingTargetsError, match="qkv_proj.*model.layers.0.self_attn.q_proj"):
    core.init(jax.random.key(0), model[1], peft_config, model[0])


def test_nonpositive_rank():
  with pytest.raises(ValueError, match="`r` should be a positive integer value but the value passed is 0"):
    config_lib.config_from_dict(dict(peft_type="LORA", r=0, target_modules=["q_proj"]))


def test_unsupported_field_is_named():
  with pytest.raises(config_lib.UnsupportedConfigError, match="use_bdlora"):
    config_lib.config_from_dict(dict(peft_type="LORA", target_modules=["q_proj"], use_bdlora={"nblocks": 2}))


def test_bias_training_on_a_biased_model_is_refused(tmp_path):
  config, params = load_model(make_tiny_llama(str(tmp_path / "b"), attention_bias=True))
  peft_config = config_lib.config_from_dict(dict(peft_type="LORA", target_modules=["q_proj"], bias="all"))
  with pytest.raises(config_lib.UnsupportedConfigError, match="bias='all'"):
    core.init(jax.random.key(0), params, peft_config, config)
