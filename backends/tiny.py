"""Shared fixtures for parity tests: tiny random checkpoints of each model family, batches, embedded models."""

from __future__ import annotations

import os

import numpy as np


# Per family: the transformers config and model classes, and the tiny config's own fields beyond the shared ones.
# The sliding windows (6) are shorter than the test sequences; Gemma 2's soft-caps are small enough to bend the
# random model's scores and logits (the real 50 / 30 would leave them linear); query_pre_attn_scalar differs from
# head_dim so that the scale is checked.
TINY_FAMILIES = {
  "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
  "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
  "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
  "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 6}),
  "gemma2": (
    "Gemma2Config",
    "Gemma2ForCausalLM",
    {
      "head_dim": 16,
      "query_pre_attn_scalar": 24,
      "sliding_window": 6,
      "attn_logit_softcapping": 2.0,
      "final_logit_softcapping": 4.0,
      "layer_types": ["sliding_attention", "full_attention"],
    },
  ),
  "gemma3_text": (
    "Gemma3TextConfig",
    "Gemma3ForCausalLM",
    {
      "head_dim": 16,
      "query_pre_attn_scalar": 24,
      "sliding_window": 6,
      "layer_types": ["sliding_attention", "full_attention"],
      "rope_parameters": {
        "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
      },
    },
  ),
}
# Gemma's RMSNorm scales by (1 + w): its weights are drawn around 0, the others' around 1.
_ZERO_CENTERED_NORMS = ("gemma2", "gemma3_text")


def make_tiny_model(
  folder: str,
  model_type: str = "llama",
  *,
  seed: int = 0,
  tie_word_embeddings: bool = False,
  num_key_value_heads: int = 2,
  rope_scaling: dict | None = None,
  vocab_size: int = 256,
  hidden_size: int = 64,
  intermediate_size: int = 128,
  num_hidden_layers: int = 2,
  num_attention_heads: int = 4,
  max_position_embeddings: int = 64,
  rope_theta: float = 10000.0,
  initializer_range: float = 0.2,
  **family_fields,
) -> str:
  """Save a random fp32 causal LM of the family ``model_type`` (a key of :data:`TINY_FAMILIES`) into ``folder``
  (safetensors) and return ``folder``.

  Weights are drawn with a larger std than Hugging Face's default so that logits are far from zero; RMSNorm
  weights are ``1 + 0.1 * N(0, 1)`` (``0.1 * N(0, 1)`` for Gemma's ``1 + w`` norms) and biases ``0.1 * N(0, 1)``
  so that a backend that drops them is caught. ``family_fields`` go to the transformers config over the family's
  tiny defaults (e.g. ``sliding_window``, ``attention_bias``, ``layer_types``). ``rope_scaling`` takes a
  transformers rope dict such as ``{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
  "high_freq_factor": 4.0, "original_max_position_embeddings": 16}``; it is stored as transformers 5's
  ``rope_parameters`` together with ``rope_theta``.
  """
  import torch
  import transformers

  if model_type not in TINY_FAMILIES:
    raise ValueError(f"no tiny config for model_type={model_type!r}; known: {sorted(TINY_FAMILIES)}")
  config_name, model_name, defaults = TINY_FAMILIES[model_type]
  fields = {**defaults, **family_fields}
  if "rope_parameters" not in fields:
    rope_parameters = {"rope_type": "default", "rope_theta": float(rope_theta)}
    if rope_scaling is not None:
      rope_parameters = dict(rope_scaling)
      if "type" in rope_parameters and "rope_type" not in rope_parameters:
        rope_parameters["rope_type"] = rope_parameters.pop("type")
      rope_parameters.setdefault("rope_theta", float(rope_theta))
    fields["rope_parameters"] = rope_parameters

  config = getattr(transformers, config_name)(
    vocab_size=vocab_size,
    hidden_size=hidden_size,
    intermediate_size=intermediate_size,
    num_hidden_layers=num_hidden_layers,
    num_attention_heads=num_attention_heads,
    num_key_value_heads=num_key_value_heads,
    max_position_embeddings=max_position_embeddings,
    initializer_range=initializer_range,
    tie_word_embeddings=tie_word_embeddings,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=None,
    dtype="float32",
    **fields,
  )
  torch.manual_seed(seed)
  model = getattr(transformers, model_name)(config).to(torch.float32)
  generator = torch.Generator().manual_seed(seed + 1)
  norm_center = 0.0 if model_type in _ZERO_CENTERED_NORMS else 1.0
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name.endswith("norm.weight"):
        param.copy_(norm_center + 0.1 * torch.randn(param.shape, generator=generator))
      elif name.endswith(".bias"):
        param.copy_(0.1 * torch.randn(param.shape, generator=generator))
  os.makedirs(folder, exist_ok=True)
  model.save_pretrained(folder, safe_serialization=True)
  return folder


def make_tiny_llama(
  folder: str,
  *,
  attention_bias: bool = False,
  mlp_bias: bool = False,
  **kwargs,
) -> str:
  """A tiny random ``LlamaForCausalLM`` (:func:`make_tiny_model` with ``model_type="llama"``)."""
  return make_tiny_model(folder, "llama", attention_bias=attention_bias, mlp_bias=mlp_bias, **kwargs)


def make_batch(
  seed: int,
  batch: int,
  seq_len: int,
  vocab_size: int,
  *,
  pad: str = "right",
  pad_token_id: int = 0,
  min_token_id: int = 3,
) -> dict[str, np.ndarray]:
  """A random batch with padded rows of varying length.

  Row 0 has the full length ``seq_len``; the others are between ``seq_len // 2`` and
  ``seq_len`` tokens long, padded on the ``pad`` side ("right" or "left") with
  ``pad_token_id``. Tokens are drawn from ``[min_token_id, vocab_size)`` (never the pad id).
  ``labels`` are the tokens, with -100 on padding and on a prompt prefix of each row (the
  first one to half of its tokens). Arrays are int32.
  """
  if pad not in ("right", "left"):
    raise ValueError(f"pad must be 'right' or 'left', got {pad!r}")
  if seq_len < 2:
    raise ValueError("seq_len must be at least 2")
  rng = np.random.default_rng(seed)
  lengths = rng.integers(max(2, seq_len // 2), seq_len + 1, size=batch)
  lengths[0] = seq_len
  input_ids = np.full((batch, seq_len), pad_token_id, dtype=np.int32)
  attention_mask = np.zeros((batch, seq_len), dtype=np.int32)
  labels = np.full((batch, seq_len), -100, dtype=np.int32)
  for row, length in enumerate(lengths):
    tokens = rng.integers(min_token_id, vocab_size, size=length)
    tokens[tokens == pad_token_id] = min_token_id if min_token_id != pad_token_id else min_token_id + 1
    prompt = int(rng.integers(1, max(1, length // 2) + 1))
    row_labels = tokens.copy()
    row_labels[:prompt] = -100
    sl = slice(0, length) if pad == "right" else slice(seq_len - length, seq_len)
    input_ids[row, sl] = tokens
    attention_mask[row, sl] = 1
    labels[row, sl] = row_labels
  return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def train_tiny_tokenizer(vocab_size: int):
  """A byte-level BPE ``tokenizers.Tokenizer`` of ``vocab_size`` trained on the embedded math task (EOS ``<eos>``)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  from jpeft.data import format_query, make_split

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=["<eos>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train_from_iterator([format_query(r["question"]) + r["answer"] for r in make_split("train", 40, seed=1)], trainer)
  return tok


def make_tiny_tokenizer(folder: str, vocab_size: int) -> str:
  """Save :func:`train_tiny_tokenizer` as a transformers tokenizer folder and return ``folder``."""
  from transformers import PreTrainedTokenizerFast

  PreTrainedTokenizerFast(tokenizer_object=train_tiny_tokenizer(vocab_size), eos_token="<eos>").save_pretrained(folder)
  return folder


# the LoRA experiment config of the tiny experiment tests: r=4 on q and v, no dropout
TINY_LORA = {
  "peft_type": "LORA",
  "r": 4,
  "lora_alpha": 8,
  "lora_dropout": 0.0,
  "target_modules": ["q_proj", "v_proj"],
  "task_type": "CAUSAL_LM",
}


def write_json(path, obj) -> None:
  """``obj`` as JSON at ``path``, creating its folders."""
  import json

  os.makedirs(os.path.dirname(str(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f)


def make_experiment_assets(root, experiments: dict, *, vocab_size: int = 320) -> dict:
  """A tiny random Llama folder, a tiny tokenizer folder and experiment folders under ``root`` (a ``pathlib.Path``).

  ``experiments`` maps ``"<method>/<name>"`` to ``{file name: JSON content}`` (``adapter_config.json``, optionally
  ``training_params.json``). Returns ``{"root", "model", "tokenizer", "exps"}``.
  """
  make_tiny_tokenizer(str(root / "tokenizer"), vocab_size)
  make_tiny_llama(str(root / "model"), vocab_size=vocab_size, max_position_embeddings=1024)
  exps = root / "experiments"
  for name, files in experiments.items():
    for file_name, content in files.items():
      write_json(exps / name / file_name, content)
  return {"root": root, "model": str(root / "model"), "tokenizer": str(root / "tokenizer"), "exps": exps}
