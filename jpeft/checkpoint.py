"""Adapters on disk in PEFT's format, and merged models in transformers' format.

``save_pretrained`` writes ``adapter_config.json`` + ``adapter_model.safetensors`` that
``peft.PeftModel.from_pretrained(base, folder)`` loads with no missing or unexpected keys;
``load_pretrained`` reads any PEFT checkpoint of a supported method, checking the exact key set and every
shape (PEFT itself ignores unexpected keys and keeps the init for missing ones; jpeft refuses both).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import config as config_lib
from jpeft import core, registry
from jpeft.models.llama import LlamaConfig, hf_config_fields, param_shapes

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def _to_numpy(x) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(jax.device_get(x)))


def save_pretrained(folder: str, adapter: core.Adapter, config, params=None, *, opt_state=None) -> str:
  """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (PEFT's keys, metadata format=pt).

  With ``opt_state`` (the optimizer state the adapter was trained with), the config saved is the one the training
  made (:func:`jpeft.core.config_after_training`: AdaLoRA's ``rank_pattern``, with the tensors sliced to it).

  With ``params``, the base embedding tables are saved too where PEFT saves them (an adapter on
  ``embed_tokens``/``lm_head`` named in ``target_modules``).

  Every tensor is checked first (an array of finite floats, else :class:`jpeft.core.AdapterCheckpointError`
  naming it), then both files are written to temporary files in ``folder`` and renamed into place: when saving
  fails, ``folder`` keeps what it held before (and a folder this call created is removed), never half an adapter.
  """
  folder = os.fspath(folder)
  if os.path.isfile(folder):
    raise config_lib.InvalidConfigError(f"Provided path ({folder}) should be a directory, not a file")
  config = core.config_after_training(config, opt_state)
  state = _state_to_save(adapter, config, params)
  text = config_lib.config_json(config)
  created = not os.path.isdir(folder)
  os.makedirs(folder, exist_ok=True)
  weights_path = os.path.join(folder, ADAPTER_WEIGHTS)
  config_path = os.path.join(folder, ADAPTER_CONFIG)
  tmp_weights = config_lib.temp_path_for(weights_path)
  tmp_config = config_lib.temp_path_for(config_path)
  replaced = []
  try:
    with open(tmp_config, "w", encoding="utf-8") as f:
      f.write(text)
    if any(v.dtype == jnp.bfloat16 for v in state.values()):
      _save_torch(tmp_weights, state)
    else:
      from safetensors.numpy import save_file

      save_file(state, tmp_weights, metadata={"format": "pt"})
    for tmp, path in ((tmp_weights, weights_path), (tmp_config, config_path)):
      os.replace(tmp, path)
      replaced.append(path)
  except BaseException:
    if created:  # a folder this call made holds nothing afterwards
      for path in replaced:
        os.remove(path)
    raise
  finally:
    for tmp in (tmp_weights, tmp_config):
      if os.path.exists(tmp):
        os.remove(tmp)
    if created and not os.listdir(folder):
      os.rmdir(folder)
  return weights_path


def _state_to_save(adapter, config, params) -> dict[str, np.ndarray]:
  """PEFT's state dict as numpy, every entry checked (the adapter's structure, dtype, finiteness)."""
  if not isinstance(adapter, dict):
    raise core.AdapterCheckpointError(
      f"an adapter is a dict {{module: {{tensor: array}}}}, got {type(adapter).__name__}"
    )
  for module, tensors in adapter.items():
    if not isinstance(module, str) or not isinstance(tensors, dict) or not tensors:
      raise core.AdapterCheckpointError(
        f"adapter entry {module!r}: expected a module name mapped to a non-empty dict of tensors, got "
        f"{type(tensors).__name__}"
      )
    for name in tensors:
      if not isinstance(name, str):
        raise core.AdapterCheckpointError(f"adapter entry {module!r}: tensor names are strings, got {name!r}")
  state = {}
  # What the file holds (AdaLoRA: sliced to rank_pattern's kept ranks; a config with one builds those shapes on load)
  for key, value in core.to_state_dict(core.export_adapter(adapter, config), params, config).items():
    core.check_tensor(value, key, "adapter to save")
    state[key] = _to_numpy(value)
  return state


def _save_torch(path, state):
  import torch
  from safetensors.torch import save_file

  tensors = {
    k: (torch.from_numpy(v.astype(np.float32)).to(torch.bfloat16) if v.dtype == jnp.bfloat16 else torch.from_numpy(v))
    for k, v in state.items()
  }
  save_file(tensors, path, metadata={"format": "pt"})
  return path


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of a safetensors file as numpy (bf16 kept as ml_dtypes bfloat16); clear error if corrupt."""
  import torch
  from safetensors import safe_open

  if not os.path.exists(path):
    raise config_lib.FileMissingError(f"adapter weights not found: {path!r}")
  if not os.path.isfile(path):
    raise core.AdapterCheckpointError(f"{path}: not a file")
  try:
    with safe_open(path, framework="pt") as f:
      keys = list(f.keys())
      tensors = {key: f.get_tensor(key) for key in keys}
  except Exception as e:  # safetensors raises its own error types for truncated/garbled files
    raise core.AdapterCheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
  out = {}
  for key, t in tensors.items():
    if t.dtype == torch.bfloat16:
      out[key] = t.float().numpy().astype(jnp.bfloat16)
    elif t.is_floating_point() and t.dtype not in (torch.float16, torch.float32, torch.float64):
      out[key] = t.float().numpy()  # the float8 types: numpy has none
    else:
      try:
        out[key] = t.numpy()
      except TypeError:  # a dtype numpy cannot hold (complex32, some unsigned ints in older torch, ...)
        raise core.AdapterCheckpointError(
          f"{path}: tensor {key!r} has dtype {str(t.dtype).removeprefix('torch.')}; adapter tensors are floating point"
        ) from None
  return out


def load_pretrained(folder: str, params, model_config: LlamaConfig, *, key=None):
  """Load a PEFT adapter folder for this model.

  Returns ``(config, adapter, params)``: ``params`` is the input unless the method rewrites the base at
  init (PiSSA/OLoRA residuals, recomputed from the base exactly as PEFT does on load).
  """
  folder = os.fspath(folder)
  if not os.path.isdir(folder):
    what = "is a file, not an adapter folder" if os.path.exists(folder) else "does not exist"
    raise config_lib.FileMissingError(
      f"adapter folder {folder!r} {what} (expected {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} inside)"
    )
  config = registry.load_config(folder)
  weights = os.path.join(folder, ADAPTER_WEIGHTS)
  if not os.path.exists(weights):
    raise config_lib.FileMissingError(f"adapter weights not found: {weights!r} (the folder has {ADAPTER_CONFIG} only)")
  state = read_safetensors(weights)
  method = registry.get_method(config.peft_type)
  if method.checkpoint_config is not None:  # what the tensors were really made with (BOFT's CPU butterfly factor)
    config = method.checkpoint_config(config, state, weights)
  template, params = core.init(key if key is not None else jax.random.key(0), params, config, model_config)
  extra = core.embedding_base_layers(template, params, config)
  adapter = core.from_state_dict(
    state, template, source=os.path.join(folder, ADAPTER_WEIGHTS), extra=extra, config=config, params=params
  )
  params = dict(params)
  for key in extra:  # PEFT loads saved embedding base layers into the base model
    if key in state:
      name = key[len(core.PEFT_PREFIX) :].replace(".base_layer.weight", ".weight")
      if name == "lm_head.weight" and name not in params:
        name = "model.embed_tokens.weight"
      params[name] = jnp.asarray(state[key], dtype=params[name].dtype)
  return config, adapter, params


def hf_config_dict(model_config: LlamaConfig) -> dict:
  """A transformers ``config.json`` for this model (its own family's ``model_type`` and fields)."""
  c = model_config
  d = {
    "vocab_size": c.vocab_size,
    "hidden_size": c.hidden_size,
    "intermediate_size": c.intermediate_size,
    "num_hidden_layers": c.num_hidden_layers,
    "num_attention_heads": c.num_attention_heads,
    "num_key_value_heads": c.num_key_value_heads,
    "head_dim": c.head_dim,
    "hidden_act": "silu",
    "rms_norm_eps": c.rms_norm_eps,
    "max_position_embeddings": c.max_position_embeddings,
    "tie_word_embeddings": c.tie_word_embeddings,
    "attention_bias": c.attention_bias,
    "mlp_bias": c.mlp_bias,
    "bos_token_id": c.bos_token_id,
    "pad_token_id": c.pad_token_id,
    "eos_token_id": list(c.eos_token_id) if isinstance(c.eos_token_id, tuple) else c.eos_token_id,
    "rope_theta": c.rope_theta,
  }
  rope = {"rope_type": "default", "rope_theta": c.rope_theta}
  if c.rope_scaling is not None:
    rope.update(dict(c.rope_scaling))
  d["rope_parameters"] = rope
  d["rope_scaling"] = rope
  fields, drop = hf_config_fields(c)  # architectures, model_type and the family's own fields
  d = {k: v for k, v in {**fields, **d, **fields}.items() if k not in drop}
  return d


def save_merged_model(folder: str, merged_params, model_config: LlamaConfig) -> str:
  """Write merged params as a transformers model folder (config.json + model.safetensors).

  If an adapter changed the embedding of a tied model, the head keeps the base embedding (as it did
  during training), so the folder is written untied.
  """
  from safetensors.numpy import save_file

  os.makedirs(folder, exist_ok=True)
  expected = param_shapes(model_config)
  state = {
    k: _to_numpy(v).astype(np.float32) if _to_numpy(v).dtype == jnp.bfloat16 else _to_numpy(v)
    for k, v in merged_params.items()
    if k in expected or k == "lm_head.weight"
  }
  cfg = hf_config_dict(model_config)
  if "lm_head.weight" in state and model_config.tie_word_embeddings:
    cfg["tie_word_embeddings"] = False
  path = os.path.join(folder, "model.safetensors")
  save_file(state, path, metadata={"format": "pt"})
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(cfg, f, indent=2)
  return folder
