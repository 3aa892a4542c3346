"""The decoder-only families jpeft runs -- Llama (Llama 2, 3, 3.1, 3.2, SmolLM), Qwen2/Qwen2.5, Qwen3, Mistral,
Gemma 2 and Gemma 3 (text) -- as one pure function of a flat, Hugging Face-named param dict.

A family is :class:`LlamaConfig` plus the fields where it differs from Llama (``FAMILIES`` lists them): q/k/v biases
(Qwen2), per-head q/k RMSNorm (Qwen3, Gemma 3), sliding-window layers (Mistral; Qwen when enabled; Gemma's
alternating ``layer_types``), Gemma's ``(1 + w)`` RMSNorm, scaled embeddings, gelu-tanh MLP, sandwich norms,
``query_pre_attn_scalar``, attention and final logit soft-capping, and Gemma 3's local RoPE base. ``model_type``
names the family; every default is Llama's.

Params are ``{"model.layers.0.self_attn.q_proj.weight": (out, in) array, ...}`` -- Hugging Face's own
names and layouts, so PEFT's module names, key names and targeting rules apply to them unchanged. A weight
entry may be a plain array or an *adapted weight* (see :mod:`jpeft.core`): any pytree with ``matmul(x)``
(and ``embed(ids)`` for embeddings). The model calls those methods and never needs to know which PEFT
method produced them.

One forward function serves training (no cache), prefill and decoding (a static-shape KV cache written at
``cache_index``). Positions come from the attention mask, so left padding (generation) and right padding
(training) both give each real token the position it would have unpadded.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

Params = Mapping[str, Any]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
  """Hashable decoder hyper-parameters (a jit static argument), built from a transformers config by :meth:`from_hf`.

  The fields after ``model_type`` are where the other families differ from Llama; their defaults are Llama's.
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: tuple[tuple[str, Any], ...] | None = None  # sorted items of the rope parameters dict
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  attention_bias: bool = False  # biases on q, k, v and o
  mlp_bias: bool = False
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None
  model_type: str = "llama"
  # -- where the other families differ (defaults: Llama) --
  qkv_bias: bool = False  # biases on q, k and v only (Qwen2)
  qk_norm: bool = False  # RMSNorm over head_dim on each head of q and k, before RoPE (Qwen3, Gemma 3)
  hidden_act: str = "silu"  # the MLP's gate activation: silu or gelu_pytorch_tanh (Gemma)
  norm_offset: bool = False  # Gemma's RMSNorm: x̂ · (1 + w), scaled in float32 before the cast back
  scale_embeddings: bool = False  # Gemma: embeddings × sqrt(hidden_size), the factor in the embedding's dtype
  sandwich_norms: bool = False  # Gemma 2/3: post-attention norm on the attention output, pre/post feed-forward norms
  query_pre_attn_scalar: int | float | None = (
    None  # attention scale query_pre_attn_scalar^-0.5 instead of head_dim^-0.5
  )
  attn_logit_softcapping: float | None = None  # scores -> cap · tanh(scores / cap) before the mask (Gemma 2)
  final_logit_softcapping: float | None = None  # logits -> cap · tanh(logits / cap) (Gemma 2)
  sliding_window: int | None = None  # a sliding layer's token attends to the last `sliding_window` positions only
  layer_types: tuple[str, ...] | None = None  # per layer "full_attention" / "sliding_attention"; None: all full
  rope_local_theta: float | None = None  # RoPE base of the sliding layers (Gemma 3's rope_local_base_freq)

  @classmethod
  def from_hf(cls, hf_config) -> "LlamaConfig":
    """From a transformers config of a supported family (``LlamaConfig``, ``Qwen2Config``, ..., ``Gemma3TextConfig``)
    or its ``config.json`` dict. A dict of another family than Llama goes through transformers' own config class
    first, so its defaults and derived fields (``layer_types``) are transformers'."""
    if isinstance(hf_config, dict):
      model_type = hf_config.get("model_type", "llama")
      _check_model_type(model_type)
      if model_type != "llama":
        import transformers

        fields = {k: v for k, v in hf_config.items() if k != "model_type"}
        hf_config = transformers.AutoConfig.for_model(model_type, **fields)
    get = (
      (lambda k, d=None: hf_config.get(k, d))
      if isinstance(hf_config, dict)
      else (lambda k, d=None: getattr(hf_config, k, d))
    )
    model_type = get("model_type", "llama")
    _check_model_type(model_type)
    family = FAMILIES[model_type]
    act = get(family.act_field, "silu")
    if act != family.activation:
      raise ValueError(f"unsupported {family.act_field}={act!r} for {model_type} (expected {family.activation!r})")
    rope = get("rope_parameters") or get("rope_scaling") or {}
    rope = dict(rope)
    local_theta = None
    if family.local_rope:  # Gemma 3: {"full_attention": {...}, "sliding_attention": {...}}
      local = dict(rope.get("sliding_attention") or {})
      if local.get("rope_type", "default") != "default":
        raise ValueError(f"unsupported rope_type={local['rope_type']!r} for the sliding layers; supported: default")
      local_theta = float(local.get("rope_theta", get("rope_local_base_freq", 10000.0)))
      rope = dict(rope.get("full_attention") or {})
    rope_theta = float(rope.get("rope_theta", get("rope_theta", 10000.0) or 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3", "linear"):
      raise ValueError(f"unsupported rope_type={rope_type!r}; supported: default, linear, llama3")
    scaling = None
    if rope_type != "default":
      keep = {k: v for k, v in rope.items() if k not in ("rope_theta", "type")}
      keep["rope_type"] = rope_type
      scaling = tuple(sorted((k, v) for k, v in keep.items() if not isinstance(v, (list, dict))))
    if get("use_bidirectional_attention", False):
      raise ValueError(f"use_bidirectional_attention=True is not supported for {model_type}")
    heads = get("num_attention_heads")
    layers = get("num_hidden_layers")
    eos = get("eos_token_id")
    if isinstance(eos, list):
      eos = tuple(eos)
    sliding_window, layer_types = family.sliding(get, layers)
    return cls(
      vocab_size=get("vocab_size"),
      hidden_size=get("hidden_size"),
      intermediate_size=get("intermediate_size"),
      num_hidden_layers=layers,
      num_attention_heads=heads,
      num_key_value_heads=get("num_key_value_heads") or heads,
      head_dim=get("head_dim") or get("hidden_size") // heads,
      rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
      rope_theta=rope_theta,
      rope_scaling=scaling,
      max_position_embeddings=get("max_position_embeddings", 2048),
      tie_word_embeddings=bool(get("tie_word_embeddings", False)),
      attention_bias=bool(get("attention_bias", False)) if family.attention_bias_field else False,
      mlp_bias=bool(get("mlp_bias", False)) if family.mlp_bias_field else False,
      bos_token_id=get("bos_token_id"),
      eos_token_id=eos,
      pad_token_id=get("pad_token_id"),
      model_type=model_type,
      qkv_bias=family.qkv_bias,
      qk_norm=family.qk_norm,
      hidden_act=act,
      norm_offset=family.gemma,
      scale_embeddings=family.gemma,
      sandwich_norms=family.gemma,
      query_pre_attn_scalar=get("query_pre_attn_scalar") if family.gemma else None,  # as given (an int in HF)
      attn_logit_softcapping=_optional_float(get("attn_logit_softcapping")) if family.gemma else None,
      final_logit_softcapping=_optional_float(get("final_logit_softcapping")) if family.gemma else None,
      sliding_window=sliding_window,
      layer_types=layer_types,
      rope_local_theta=local_theta,
    )

  @property
  def eos_token_ids(self) -> tuple[int, ...]:
    if self.eos_token_id is None:
      return ()
    return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

  def is_sliding(self, layer: int) -> bool:
    """Whether layer ``layer`` attends through the sliding window."""
    return (
      self.sliding_window is not None
      and self.layer_types is not None
      and self.layer_types[layer] == "sliding_attention"
    )


def _optional_float(value) -> float | None:
  return None if value is None else float(value)


def _layer_types_of(get) -> tuple[str, ...] | None:
  types = get("layer_types")
  return None if types is None else tuple(types)


def _no_sliding(get, layers):
  return None, None


def _qwen_sliding(get, layers):
  """Qwen2/Qwen3: the window only with ``use_sliding_window``, on the layers ``layer_types`` marks."""
  window = get("sliding_window") if get("use_sliding_window", False) else None
  if window is None:
    return None, None
  return int(window), _layer_types_of(get)


def _mistral_sliding(get, layers):
  """Mistral: every layer slides when ``sliding_window`` is set (transformers' MistralConfig has no layer_types)."""
  window = get("sliding_window")
  return (None, None) if window is None else (int(window), ("sliding_attention",) * layers)


def _gemma_sliding(get, layers):
  """Gemma 2/3: the layers ``layer_types`` marks (transformers derives it: every other layer / 5 of 6)."""
  window = get("sliding_window")
  return (None, None) if window is None else (int(window), _layer_types_of(get))


@dataclasses.dataclass(frozen=True)
class Family:
  """What :meth:`LlamaConfig.from_hf` reads for one ``model_type`` and how the family differs from Llama."""

  architecture: str  # transformers' CausalLM class (``architectures`` of a saved config.json)
  activation: str = "silu"
  act_field: str = "hidden_act"
  attention_bias_field: bool = False  # the config's attention_bias gives q/k/v/o biases
  mlp_bias_field: bool = False
  qkv_bias: bool = False
  qk_norm: bool = False
  gemma: bool = False  # (1 + w) norms, scaled embeddings, sandwich norms, query_pre_attn_scalar, soft-capping
  local_rope: bool = False  # rope_parameters per layer type
  sliding: Any = _no_sliding


FAMILIES: dict[str, Family] = {
  "llama": Family("LlamaForCausalLM", attention_bias_field=True, mlp_bias_field=True),
  "qwen2": Family("Qwen2ForCausalLM", qkv_bias=True, sliding=_qwen_sliding),
  "qwen3": Family("Qwen3ForCausalLM", attention_bias_field=True, qk_norm=True, sliding=_qwen_sliding),
  "mistral": Family("MistralForCausalLM", sliding=_mistral_sliding),
  "gemma2": Family(
    "Gemma2ForCausalLM",
    activation="gelu_pytorch_tanh",
    act_field="hidden_activation",
    attention_bias_field=True,
    gemma=True,
    sliding=_gemma_sliding,
  ),
  "gemma3_text": Family(
    "Gemma3ForCausalLM",
    activation="gelu_pytorch_tanh",
    act_field="hidden_activation",
    attention_bias_field=True,
    qk_norm=True,
    gemma=True,
    local_rope=True,
    sliding=_gemma_sliding,
  ),
}

SUPPORTED_MODEL_TYPES = frozenset(FAMILIES)


def _check_model_type(model_type: str) -> None:
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(
      f"unsupported architecture model_type={model_type!r}: jpeft.models supports {sorted(SUPPORTED_MODEL_TYPES)}"
    )


def hf_config_fields(config: LlamaConfig) -> tuple[dict, tuple[str, ...]]:
  """The ``config.json`` fields that name the family and carry its differences (``architectures``, ``model_type``,
  the activation, sliding windows, Gemma's scalars and per-layer-type RoPE), and the Llama keys the family's
  config does not have (to drop)."""
  c = config
  family = FAMILIES[c.model_type]
  d = {"architectures": [family.architecture], "model_type": c.model_type, family.act_field: c.hidden_act}
  drop = () if family.act_field == "hidden_act" else ("hidden_act",)
  types = list(c.layer_types) if c.layer_types is not None else ["full_attention"] * c.num_hidden_layers
  if c.model_type in ("qwen2", "qwen3"):
    d.update(use_sliding_window=c.sliding_window is not None, sliding_window=c.sliding_window, layer_types=types)
  elif c.model_type == "mistral":
    d["sliding_window"] = c.sliding_window
  if family.gemma:
    d.update(
      query_pre_attn_scalar=c.query_pre_attn_scalar,
      attn_logit_softcapping=c.attn_logit_softcapping,
      final_logit_softcapping=c.final_logit_softcapping,
      sliding_window=c.sliding_window,
      layer_types=types,
    )
  if family.local_rope:
    full = {"rope_type": "default", "rope_theta": c.rope_theta, **dict(c.rope_scaling or ())}
    local = {"rope_type": "default", "rope_theta": c.rope_local_theta}
    d["rope_parameters"] = {"full_attention": full, "sliding_attention": local}
    drop += ("rope_scaling", "rope_theta")
  if c.model_type != "llama":
    drop += ("mlp_bias",)
  return d, drop


LINEAR_SUFFIXES = (
  "self_attn.q_proj",
  "self_attn.k_proj",
  "self_attn.v_proj",
  "self_attn.o_proj",
  "mlp.gate_proj",
  "mlp.up_proj",
  "mlp.down_proj",
)


def _attention_linears(c: LlamaConfig):
  """(name, out, in, bias) of the attention projections."""
  q_out = c.num_attention_heads * c.head_dim
  kv_out = c.num_key_value_heads * c.head_dim
  qkv_bias = c.attention_bias or c.qkv_bias
  return (
    ("self_attn.q_proj", q_out, c.hidden_size, qkv_bias),
    ("self_attn.k_proj", kv_out, c.hidden_size, qkv_bias),
    ("self_attn.v_proj", kv_out, c.hidden_size, qkv_bias),
    ("self_attn.o_proj", c.hidden_size, q_out, c.attention_bias),
  )


def _qk_norms(c: LlamaConfig) -> tuple[str, ...]:
  return ("self_attn.q_norm", "self_attn.k_norm") if c.qk_norm else ()


def _layer_norms(c: LlamaConfig) -> tuple[str, ...]:
  """The hidden-size norms of a layer, in module order."""
  norms = ("input_layernorm", "post_attention_layernorm")
  return norms + (("pre_feedforward_layernorm", "post_feedforward_layernorm") if c.sandwich_norms else ())


def param_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
  """Every tensor the model reads, with its Hugging Face name and (out, in) shape, in model order."""
  c = config
  shapes = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size)}
  for i in range(c.num_hidden_layers):
    p = f"model.layers.{i}."
    shapes[p + "input_layernorm.weight"] = (c.hidden_size,)
    for name, out_dim, in_dim, bias in _attention_linears(c):
      shapes[p + name + ".weight"] = (out_dim, in_dim)
      if bias:
        shapes[p + name + ".bias"] = (out_dim,)
    for name in _qk_norms(c):
      shapes[p + name + ".weight"] = (c.head_dim,)
    for name in _layer_norms(c)[1:]:
      shapes[p + name + ".weight"] = (c.hidden_size,)
    for name, out_dim, in_dim in (
      ("mlp.gate_proj", c.intermediate_size, c.hidden_size),
      ("mlp.up_proj", c.intermediate_size, c.hidden_size),
      ("mlp.down_proj", c.hidden_size, c.intermediate_size),
    ):
      shapes[p + name + ".weight"] = (out_dim, in_dim)
      if c.mlp_bias:
        shapes[p + name + ".bias"] = (out_dim,)
  shapes["model.norm.weight"] = (c.hidden_size,)
  if not c.tie_word_embeddings:
    shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
  return shapes


def module_kinds(config: LlamaConfig) -> dict[str, str]:
  """Module names in model order (as ``torch.nn.Module.named_modules`` lists them) -> kind.

  Kinds: ``linear``, ``embedding``, ``norm``. ``lm_head`` is listed even when tied (it is a module in
  transformers, sharing the embedding's weight).
  """
  kinds = {"model.embed_tokens": "embedding"}
  for i in range(config.num_hidden_layers):
    p = f"model.layers.{i}."
    for s in LINEAR_SUFFIXES[:4]:
      kinds[p + s] = "linear"
    for s in _qk_norms(config):
      kinds[p + s] = "norm"
    for s in LINEAR_SUFFIXES[4:]:
      kinds[p + s] = "linear"
    for s in _layer_norms(config):
      kinds[p + s] = "norm"
  kinds["model.norm"] = "norm"
  kinds["lm_head"] = "linear"
  return kinds


def init_params(key: jax.Array, config: LlamaConfig, dtype=jnp.float32, std: float = 0.02) -> dict:
  """Random params (normal(std) weights, identity norms, zero biases) -- for tests and from-scratch runs."""
  shapes = param_shapes(config)
  keys = jax.random.split(key, len(shapes))
  out = {}
  for k, (name, shape) in zip(keys, shapes.items()):
    if name.endswith("norm.weight"):  # the identity: 1, or 0 for Gemma's (1 + w)
      out[name] = (jnp.zeros if config.norm_offset else jnp.ones)(shape, dtype)
    elif name.endswith(".bias"):
      out[name] = jnp.zeros(shape, dtype)
    else:
      out[name] = (std * jax.random.normal(k, shape, jnp.float32)).astype(dtype)
  return out


# ----------------------------------------------------------------------------------------------------------
# Building blocks. Weights may be arrays or adapted weights (``matmul``/``embed`` methods).


def linear(x: jax.Array, weight, bias=None, dtype=None) -> jax.Array:
  """``x Wᵀ + b`` with ``W`` in (out, in) layout, or ``weight.matmul(x)`` for an adapted weight."""
  if hasattr(weight, "matmul"):
    y = weight.matmul(x, dtype=dtype)
  else:
    dt = dtype or x.dtype
    y = jnp.einsum("...i,oi->...o", x.astype(dt), weight.astype(dt))
  if bias is not None:
    y = y + bias.astype(y.dtype)
  return y


def embed(ids: jax.Array, weight, dtype=None) -> jax.Array:
  if hasattr(weight, "embed"):
    out = weight.embed(ids)
  else:
    out = jnp.take(weight, ids, axis=0)
  return out.astype(dtype) if dtype is not None else out


def base_array(weight):
  """The plain base array behind a weight entry (itself for an array)."""
  while hasattr(weight, "base"):
    weight = weight.base
  return weight


def rms_norm(x: jax.Array, weight, eps: float, offset: bool = False) -> jax.Array:
  """Hugging Face's LlamaRMSNorm: normalise in fp32, cast back, then scale. With ``offset`` Gemma's: scale by
  ``1 + w`` in fp32, then cast back."""
  in_dtype = x.dtype
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  w = weight.materialize() if hasattr(weight, "materialize") else weight
  if offset:
    return (x32 * (1.0 + w.astype(jnp.float32))).astype(in_dtype)
  return (w * x32.astype(in_dtype)).astype(in_dtype)


def _gelu_tanh(x):
  return jax.nn.gelu(x, approximate=True)


_ACTIVATIONS = {"silu": jax.nn.silu, "gelu_pytorch_tanh": _gelu_tanh}


def rope_inv_freq(config: LlamaConfig, *, local: bool = False) -> np.ndarray:
  """Inverse frequencies, with ``llama3``/``linear`` scaling as transformers computes them (float32). ``local``: the
  sliding layers' (Gemma 3's ``rope_local_theta``, unscaled)."""
  dim = config.head_dim
  theta = config.rope_local_theta if local else config.rope_theta
  inv = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
  inv = inv.astype(np.float32)
  if config.rope_scaling is None or local:
    return inv
  s = dict(config.rope_scaling)
  if s["rope_type"] == "linear":
    return (inv / np.float32(s["factor"])).astype(np.float32)
  factor = s["factor"]
  low, high = s["low_freq_factor"], s["high_freq_factor"]
  old_ctx = s.get("original_max_position_embeddings", config.max_position_embeddings)
  low_wl, high_wl = old_ctx / low, old_ctx / high
  wavelen = (2 * math.pi / inv).astype(np.float32)
  inv_l = np.where(wavelen > low_wl, inv / np.float32(factor), inv).astype(np.float32)
  smooth = ((old_ctx / wavelen - low) / (high - low)).astype(np.float32)
  smoothed = ((1 - smooth) * inv_l / np.float32(factor) + smooth * inv_l).astype(np.float32)
  medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
  return np.where(medium, smoothed, inv_l).astype(np.float32)


def rotary(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotate (B, T, H, D) by positions (B, T): ``x·cos + rotate_half(x)·sin`` (Hugging Face's layout)."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  cos = jnp.cos(emb)[:, :, None, :].astype(x.dtype)
  sin = jnp.sin(emb)[:, :, None, :].astype(x.dtype)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
  """Position of each token among the real tokens of its row; padding gets 1, as in transformers' ``generate``
  (``(cumsum(mask) - 1).masked_fill(mask == 0, 1)``).

  Padded positions never reach a real token's output, but a method that averages over the whole batch (Lily's
  router) sees their hidden states, so they are computed as transformers computes them.
  """
  pos = jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1
  return jnp.where(attention_mask.astype(bool), pos, 1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """Static-shape cache: keys/values (L, B, S, KV, D) and which slots hold real tokens (B, S)."""

  k: jax.Array
  v: jax.Array
  valid: jax.Array

  @classmethod
  def empty(cls, config: LlamaConfig, batch: int, length: int, dtype=jnp.float32) -> "KVCache":
    shape = (config.num_hidden_layers, batch, length, config.num_key_value_heads, config.head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, length), bool))


def _attention(q, k, v, allowed, dtype, scale: float, softcap: float | None = None):
  """Grouped-query attention. q (B,T,H,D), k/v (B,S,KV,D), allowed (B,T,S) bool -> (B,T,H*D). Scores are
  ``q·k · scale``, soft-capped (``cap · tanh(s / cap)``) before the mask when ``softcap`` is set.

  A query that may attend to no key (a left-padding position) gets 0, as transformers' default SDPA attention
  gives it: padded positions never reach a real token, but Lily's router averages over every position of the batch.
  """
  b, t, h, d = q.shape
  kv = k.shape[2]
  q = q.reshape(b, t, kv, h // kv, d)
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32) * scale
  if softcap is not None:
    scores = softcap * jnp.tanh(scores / softcap)
  scores = jnp.where(allowed[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  probs = jnp.where(jnp.any(allowed, axis=-1)[:, None, None, :, None], probs, 0.0).astype(dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(b, t, h * d)


def forward(
  params: Params,
  config: LlamaConfig,
  input_ids: jax.Array | None,
  attention_mask: jax.Array | None = None,
  *,
  positions: jax.Array | None = None,
  inputs_embeds: jax.Array | None = None,
  cache: KVCache | None = None,
  cache_index: jax.Array | int = 0,
  compute_dtype=None,
  return_hidden: bool = False,
  remat: bool = False,
  logits_at: jax.Array | None = None,
):
  """Causal LM forward. Returns ``logits`` (B, T, V) float32, and the updated cache when one is given.

  Args:
    params: flat Hugging Face-named params (arrays or adapted weights).
    config: the model's :class:`LlamaConfig`.
    input_ids: (B, T) int tokens, or None when ``inputs_embeds`` is given.
    attention_mask: (B, T) 1 for real tokens, 0 for padding (left or right). Defaults to all ones.
    positions: (B, T) rotary positions; by default derived from the mask (and the cache's valid slots).
    inputs_embeds: (B, T, hidden) embeddings instead of ids -- the hook for prompt-style methods.
    cache: a :class:`KVCache`; the new keys/values are written at ``cache_index`` and attention runs over
      every valid slot up to the current token.
    compute_dtype: matmul dtype (defaults to the embedding dtype); norms and softmax run in float32.
    return_hidden: also return the final hidden states (before the head).
    remat: rematerialise each decoder layer in the backward pass (``jax.checkpoint``): activation memory
      drops to one hidden state per layer for ~1/3 more compute.
    logits_at: (B, K) int positions: the head runs on those positions of each row only and the logits are
      (B, K, V). Training on answer tokens needs the head only where there is a label; the head is ~20% of a
      small model's FLOPs and its (B, T, V) float32 logits are the largest activation (see
      :func:`loss_positions`). ``return_hidden`` still returns every position.
  """
  c = config
  if inputs_embeds is None:
    x = embed(input_ids, params["model.embed_tokens.weight"])
    if c.scale_embeddings:  # Gemma: × sqrt(hidden), the factor rounded to the embedding's dtype as transformers does
      x = x * jnp.asarray(np.float32(c.hidden_size**0.5), x.dtype)
  else:
    x = inputs_embeds
  dtype = compute_dtype or x.dtype
  x = x.astype(dtype)
  b, t = x.shape[:2]
  if attention_mask is None:
    attention_mask = jnp.ones((b, t), jnp.int32)
  mask = attention_mask.astype(bool)

  if cache is None:
    if positions is None:
      positions = positions_from_mask(attention_mask)
    key_valid = mask
    q_index = jnp.arange(t)
    k_index = jnp.arange(t)
  else:
    valid = jax.lax.dynamic_update_slice(cache.valid, mask, (0, cache_index))
    if positions is None:
      prior = jnp.sum(
        jnp.where(jnp.arange(cache.valid.shape[1]) < cache_index, cache.valid, False), axis=-1, keepdims=True
      )
      positions = jnp.where(mask, prior + jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 1)
    key_valid = valid
    q_index = cache_index + jnp.arange(t)
    k_index = jnp.arange(cache.valid.shape[1])
  allowed = (k_index[None, None, :] <= q_index[None, :, None]) & key_valid[:, None, :]
  allowed_sliding = allowed
  if c.sliding_window is not None:  # a sliding layer's query sees the last `sliding_window` slots (itself included)
    allowed_sliding = allowed & (k_index[None, None, :] > q_index[None, :, None] - c.sliding_window)

  inv_freq = rope_inv_freq(c)
  inv_freq_local = rope_inv_freq(c, local=True) if c.rope_local_theta is not None else inv_freq
  cache_k, cache_v = (cache.k, cache.v) if cache is not None else (None, None)
  scale = (c.query_pre_attn_scalar if c.query_pre_attn_scalar is not None else c.head_dim) ** -0.5
  act = _ACTIVATIONS[c.hidden_act]

  def norm(x, weight):
    return rms_norm(x, weight, c.rms_norm_eps, c.norm_offset)

  def layer(x, lp, i, positions, masks, cache_k, cache_v):
    sliding = c.is_sliding(i)
    rope = inv_freq_local if sliding else inv_freq
    h = norm(x, lp["input_layernorm.weight"])
    q = linear(h, lp["self_attn.q_proj.weight"], lp.get("self_attn.q_proj.bias"), dtype)
    k = linear(h, lp["self_attn.k_proj.weight"], lp.get("self_attn.k_proj.bias"), dtype)
    v = linear(h, lp["self_attn.v_proj.weight"], lp.get("self_attn.v_proj.bias"), dtype)
    q = q.reshape(b, t, c.num_attention_heads, c.head_dim)
    k = k.reshape(b, t, c.num_key_value_heads, c.head_dim)
    if c.qk_norm:
      q = norm(q, lp["self_attn.q_norm.weight"])
      k = norm(k, lp["self_attn.k_norm.weight"])
    q = rotary(q, positions, rope)
    k = rotary(k, positions, rope)
    v = v.reshape(b, t, c.num_key_value_heads, c.head_dim)
    if cache_k is not None:  # written in place into the (L, B, S, KV, D) buffers: no per-step copies
      cache_k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype)[None], (i, 0, cache_index, 0, 0))
      cache_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype)[None], (i, 0, cache_index, 0, 0))
      k, v = cache_k[i].astype(dtype), cache_v[i].astype(dtype)
    attn = _attention(q, k, v, masks[1] if sliding else masks[0], dtype, scale, c.attn_logit_softcapping)
    attn = linear(attn, lp["self_attn.o_proj.weight"], lp.get("self_attn.o_proj.bias"), dtype)
    if c.sandwich_norms:
      attn = norm(attn, lp["post_attention_layernorm.weight"])
    x = x + attn
    h = norm(x, lp["pre_feedforward_layernorm.weight" if c.sandwich_norms else "post_attention_layernorm.weight"])
    gate = linear(h, lp["mlp.gate_proj.weight"], lp.get("mlp.gate_proj.bias"), dtype)
    up = linear(h, lp["mlp.up_proj.weight"], lp.get("mlp.up_proj.bias"), dtype)
    mlp = linear(act(gate) * up, lp["mlp.down_proj.weight"], lp.get("mlp.down_proj.bias"), dtype)
    if c.sandwich_norms:
      mlp = norm(mlp, lp["post_feedforward_layernorm.weight"])
    x = x + mlp
    return x, cache_k, cache_v

  # remat: keep only each layer's input for the backward pass and recompute the rest (less memory).
  layer_fn = jax.checkpoint(layer, static_argnums=(2,)) if remat else layer
  for i in range(c.num_hidden_layers):
    p = f"model.layers.{i}."
    lp = {k[len(p) :]: v for k, v in params.items() if k.startswith(p)}
    x, cache_k, cache_v = layer_fn(x, lp, i, positions, (allowed, allowed_sliding), cache_k, cache_v)
  x = norm(x, params["model.norm.weight"])
  hidden = x
  if logits_at is not None:
    x = jnp.take_along_axis(x, logits_at[..., None].astype(jnp.int32), axis=1)
  head = params.get("lm_head.weight")
  if head is None:  # tied: the head reads the embedding's base matrix (an embedding adapter is input-only)
    head = base_array(params["model.embed_tokens.weight"])
  logits = linear(x, head, params.get("lm_head.bias"), dtype).astype(jnp.float32)
  if c.final_logit_softcapping is not None:
    logits = c.final_logit_softcapping * jnp.tanh(logits / c.final_logit_softcapping)
  outputs = (logits,)
  if cache is not None:
    outputs += (KVCache(cache_k, cache_v, valid),)
  if return_hidden:
    outputs += (hidden,)
  return outputs[0] if len(outputs) == 1 else outputs


def causal_lm_loss(logits: jax.Array, labels: jax.Array, ignore_index: int = -100):
  """Mean next-token cross-entropy over positions whose (shifted) label is not ``ignore_index``.

  Matches transformers' ``ForCausalLMLoss`` (labels are shifted inside). Returns (loss, n_tokens).
  """
  return cross_entropy(logits[:, :-1], labels[:, 1:], ignore_index)


def cross_entropy(logits: jax.Array, targets: jax.Array, ignore_index: int = -100):
  """Mean cross-entropy of ``logits`` (..., V) against ``targets`` (...) over targets that are not
  ``ignore_index`` (no shift). Returns (loss, n_tokens)."""
  logits = logits.astype(jnp.float32)
  valid = targets != ignore_index
  safe = jnp.where(valid, targets, 0)
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
  nll = jnp.where(valid, logz - picked, 0.0)
  n = jnp.sum(valid)
  return jnp.sum(nll) / jnp.maximum(n, 1), n


def loss_positions(labels: np.ndarray, width: int | None = None, ignore_index: int = -100):
  """Host-side (positions, targets), each (B, K), of the next-token loss: the positions ``p`` whose shifted
  label ``labels[:, p + 1]`` is not ``ignore_index``, left-aligned per row and padded with position 0 and
  target ``ignore_index``. ``forward(..., logits_at=positions)`` then ``cross_entropy(logits, targets)``
  equals ``causal_lm_loss(forward(...), labels)``.

  ``width`` K defaults to the most positions of any row; ``None`` is returned instead when a row has more
  than ``width``.
  """
  labels = np.asarray(labels)
  shifted = labels[:, 1:] != ignore_index
  counts = shifted.sum(axis=1)
  k = int(counts.max()) if width is None else int(width)
  if counts.size and counts.max() > k:
    return None
  rows = labels.shape[0]
  positions = np.zeros((rows, k), np.int32)
  targets = np.full((rows, k), ignore_index, np.int32)
  for r in range(rows):
    where = np.flatnonzero(shifted[r])
    positions[r, : len(where)] = where
    targets[r, : len(where)] = labels[r, where + 1]
  return positions, targets
