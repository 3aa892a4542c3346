"""Batched generation with a static-shape KV cache: one compiled prefill + ``lax.while_loop`` decode.

Greedy (``temperature=0``) or temperature / top-p sampling; each sequence stops at its own EOS; the loop
stops when every sequence is done or ``max_new_tokens`` is reached. Nothing recompiles per token, nor for a new
``max_new_tokens`` within the same bucket: ``max_new_tokens`` is a traced argument, and the cache has a static
length of ``prompt_len`` plus ``max_new_tokens`` rounded up to a multiple of :data:`NEW_TOKEN_BUCKET`, so one
compile serves every ``max_new_tokens`` of a bucket (unused cache slots are masked out, as unfilled slots are).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.models.llama import KVCache, LlamaConfig, forward

NEW_TOKEN_BUCKET = 32  # max_new_tokens is rounded up to a multiple of this for the static cache and token buffer


def new_token_slots(max_new_tokens: int) -> int:
  """The static number of new-token slots compiled for ``max_new_tokens`` (its bucket)."""
  return -(-int(max_new_tokens) // NEW_TOKEN_BUCKET) * NEW_TOKEN_BUCKET


def _select(logits, rng, temperature: float, top_p: float):
  """Next token from (B, V) logits: argmax, or a sample from the temperature/top-p distribution."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each token
    sorted_logits = jnp.where(before < top_p, sorted_logits, -jnp.inf)
    choice = jax.random.categorical(rng, sorted_logits, axis=-1)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(
  jax.jit,
  static_argnames=(
    "config",
    "new_token_slots",
    "temperature",
    "top_p",
    "eos_token_ids",
    "pad_token_id",
    "compute_dtype",
  ),
)
def _generate(
  params,
  input_ids,
  attention_mask,
  rng,
  max_new_tokens,
  *,
  config: LlamaConfig,
  new_token_slots: int,
  temperature: float,
  top_p: float,
  eos_token_ids: tuple[int, ...],
  pad_token_id: int,
  compute_dtype,
):
  b, prompt_len = input_ids.shape
  cache_dtype = compute_dtype or jnp.float32
  cache = KVCache.empty(config, b, prompt_len + new_token_slots, cache_dtype)
  logits, cache = forward(
    params, config, input_ids, attention_mask, cache=cache, cache_index=0, compute_dtype=compute_dtype
  )
  eos = jnp.asarray(eos_token_ids if eos_token_ids else (-1,), jnp.int32)

  def cond(state):
    step, _, _, _, done, _ = state
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(state):
    step, last_logits, cache, tokens, done, rng = state
    rng, sub = jax.random.split(rng)
    tok = _select(last_logits, sub, temperature, top_p)
    tok = jnp.where(done, pad_token_id, tok)
    tokens = tokens.at[:, step].set(tok)
    done = done | jnp.isin(tok, eos)
    logits, cache = forward(
      params,
      config,
      tok[:, None],
      jnp.ones((b, 1), jnp.int32),
      cache=cache,
      cache_index=prompt_len + step,
      compute_dtype=compute_dtype,
    )
    return step + 1, logits[:, -1], cache, tokens, done, rng

  tokens = jnp.full((b, new_token_slots), pad_token_id, jnp.int32)
  state = (jnp.int32(0), logits[:, -1], cache, tokens, jnp.zeros((b,), bool), rng)
  step, _, _, tokens, _, _ = jax.lax.while_loop(cond, body, state)
  return tokens, step


def generate(
  params,
  config: LlamaConfig,
  input_ids,
  attention_mask=None,
  *,
  max_new_tokens: int,
  temperature: float = 0.0,
  top_p: float = 1.0,
  rng: jax.Array | None = None,
  eos_token_id: int | Sequence[int] | None = None,
  pad_token_id: int | None = None,
  compute_dtype=None,
) -> np.ndarray:
  """Generate up to ``max_new_tokens`` for a left-padded batch.

  Args:
    params: model params (adapted weights allowed: an unmerged adapter generates as it trains).
    config: the model config.
    input_ids: (B, P) prompts, **left**-padded.
    attention_mask: (B, P) 1 for real tokens.
    max_new_tokens: the bound on new tokens (any value of one :data:`NEW_TOKEN_BUCKET` bucket reuses a compile).
    temperature: 0 for greedy; otherwise sampling temperature.
    top_p: nucleus sampling mass (only with ``temperature > 0``).
    rng: a PRNG key for sampling.
    eos_token_id: stop token(s); defaults to the config's.
    pad_token_id: filler after a sequence stops; defaults to the config's pad, else its first EOS, else 0.

  Returns:
    (B, max_new_tokens) int32 new tokens; after a sequence's EOS, ``pad_token_id``.
  """
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
    raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
  max_new_tokens = int(max_new_tokens)
  input_ids = jnp.asarray(input_ids, jnp.int32)
  if attention_mask is None:
    attention_mask = jnp.ones_like(input_ids)
  mask = np.asarray(attention_mask)
  if mask.shape != tuple(input_ids.shape):
    raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {tuple(input_ids.shape)}")
  if not mask[:, -1].all():
    raise ValueError("generate needs left-padded prompts: the last position of every row must be a real token")
  if eos_token_id is None:
    eos = config.eos_token_ids
  else:
    eos = (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id)
  if pad_token_id is None:
    pad_token_id = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
  if rng is None:
    rng = jax.random.key(0)
  tokens, _ = _generate(
    params,
    input_ids,
    jnp.asarray(mask, jnp.int32),
    rng,
    jnp.int32(max_new_tokens),
    config=config,
    new_token_slots=new_token_slots(max_new_tokens),
    temperature=float(temperature),
    top_p=float(top_p),
    eos_token_ids=tuple(int(e) for e in eos),
    pad_token_id=int(pad_token_id),
    compute_dtype=compute_dtype,
  )
  return np.asarray(tokens)[:, :max_new_tokens]
