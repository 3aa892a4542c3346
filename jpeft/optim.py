"""Optimizers over the adapter pytree, as optax transformations.

* :func:`make_optimizer` -- AdamW (torch's decoupled decay) with grad-norm clipping and a constant, linear or
  cosine schedule with linear warmup (transformers' ``get_scheduler`` values, step 0 included).
* :func:`lorafa` -- LoRA-FA (PEFT's ``create_lorafa_optimizer``): every ``lora_A`` frozen, ``lora_B``'s gradient
  projected ``g_B ← (1/s²) g_B (A Aᵀ + 1e-8 I)⁺`` before Adam (eps 1e-6).
* LoRA+ (PEFT's ``create_loraplus_optimizer``): ``lora_B`` and 1-D adapter tensors at ``lr · ratio``,
  embedding LoRA at ``loraplus_lr_embedding``, weight decay ``loraplus_weight_decay`` for all groups.

A method may wrap the transformation after clipping (``Method.optimizer_transform``, read through
:func:`jpeft.core.optimizer_transform`): AdaLoRA's rank allocator sees the clipped gradients and the updated
parameters and keeps its state in the optimizer state, so the train step is the same for every method.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp
import optax

from jpeft import core
from jpeft.methods import lora as lora_lib

OPTIMIZER_TYPES = ("adamw", "lora-fa", "lora+")


def schedule(
  lr: float, *, lr_scheduler: str = "constant", warmup_steps: int = 0, total_steps: int | None = None
) -> optax.Schedule:
  """Linear warmup from 0, then constant / linear / cosine decay to 0 at ``total_steps``."""
  kind = lr_scheduler.lower()
  if kind not in ("constant", "linear", "cosine"):
    raise ValueError(f"unknown lr_scheduler {lr_scheduler!r}; supported: constant, linear, cosine")
  if kind != "constant" and not total_steps:
    raise ValueError(f"lr_scheduler={kind!r} needs total_steps")
  warmup = max(int(warmup_steps), 0)

  def fn(step):
    step = jnp.asarray(step, jnp.float32)
    warm = step / max(warmup, 1)
    if kind == "constant":
      decay = 1.0
    else:
      progress = jnp.clip((step - warmup) / max(total_steps - warmup, 1), 0.0, 1.0)
      decay = 1.0 - progress if kind == "linear" else 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return lr * jnp.where(step < warmup, warm, decay)

  return fn


def _labels(adapter, peft_config, optimizer_type: str):
  """Per-tensor group names for multi_transform."""

  def label(module, tensor, value):
    if optimizer_type == "lora-fa" and tensor.startswith("lora_A"):
      return "frozen"
    if peft_config is not None and tensor in core.frozen_tensors(peft_config):
      return "frozen"
    if optimizer_type == "lora+":
      if tensor.startswith("lora_embedding"):
        return "embedding"
      if "lora_B" in tensor or value.ndim == 1:
        return "b"
    return "default"

  return {m: {t: label(m, t, v) for t, v in ts.items()} for m, ts in adapter.items()}


class LoraFAState(NamedTuple):
  pass


def lorafa_projection(peft_config) -> optax.GradientTransformation:
  """``g_B ← (1/s²) · g_B · pinv(A Aᵀ + 1e-8·I)`` for every (lora_A, lora_B) pair; needs ``params``."""

  def init(params):
    del params
    return LoraFAState()

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("LoRA-FA's projection needs the current adapter params")
    out = {}
    for module, grads in updates.items():
      if "lora_A.weight" in grads and "lora_B.weight" in grads:
        r, alpha = lora_lib.resolve_rank_alpha(peft_config, module)
        s = lora_lib.lora_scaling(r, alpha, peft_config.use_rslora)
        a = params[module]["lora_A.weight"].astype(jnp.float32)
        inv = jnp.linalg.pinv(a @ a.T + 1e-8 * jnp.eye(a.shape[0], dtype=a.dtype))
        g_b = (grads["lora_B.weight"].astype(jnp.float32) @ inv) / (s * s)
        out[module] = {**grads, "lora_B.weight": g_b.astype(grads["lora_B.weight"].dtype)}
      else:
        out[module] = grads
    return out, state

  return optax.GradientTransformation(init, update)


def make_optimizer(
  adapter,
  peft_config=None,
  *,
  lr: float,
  optimizer_type: str = "AdamW",
  weight_decay: float = 0.0,
  betas: tuple[float, float] = (0.9, 0.999),
  eps: float = 1e-8,
  grad_norm_clip: float | None = None,
  lr_scheduler: str = "constant",
  warmup_steps: int = 0,
  total_steps: int | None = None,
  loraplus_lr_ratio: float | None = None,
  loraplus_lr_embedding: float = 1e-6,
  loraplus_weight_decay: float = 0.0,
) -> optax.GradientTransformation:
  """The optimizer for an adapter (or full params when ``peft_config`` is None).

  ``optimizer_type``: ``AdamW``, ``lora-fa`` or ``lora+`` (PEFT's names, case-insensitive).
  """
  kind = optimizer_type.lower().replace("_", "-")
  kind = {"loraplus": "lora+", "lorafa": "lora-fa"}.get(kind, kind)
  if kind not in OPTIMIZER_TYPES:
    raise ValueError(f"unknown optimizer_type {optimizer_type!r}; supported: AdamW, lora-fa, lora+")
  if kind != "adamw" and (peft_config is None or peft_config.peft_type != "LORA"):
    raise ValueError(f"optimizer_type={optimizer_type!r} needs a LoRA adapter")
  b1, b2 = betas
  clip = [optax.clip_by_global_norm(grad_norm_clip)] if grad_norm_clip else []
  sched = lambda base: schedule(
    base,
    lr_scheduler=lr_scheduler,
    warmup_steps=warmup_steps,  # noqa: E731
    total_steps=total_steps,
  )
  labels = _labels(adapter, peft_config, kind) if peft_config is not None else None
  method_transform = core.optimizer_transform(peft_config)  # AdaLoRA's rank allocator, after the clipped update
  wrap = method_transform if method_transform is not None else (lambda inner: inner)

  if kind == "adamw":
    opt = optax.adamw(sched(lr), b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    if labels is not None and any(v == "frozen" for ts in labels.values() for v in ts.values()):
      opt = optax.multi_transform({"default": opt, "frozen": optax.set_to_zero()}, labels)
    return optax.chain(*clip, wrap(opt))

  if kind == "lora-fa":
    # PEFT freezes A (no gradient at all), so clipping sees only the other tensors: zero A first.
    zero_a = optax.multi_transform({"frozen": optax.set_to_zero(), "default": optax.identity()}, labels)
    adam = optax.multi_transform(
      {
        "default": optax.adamw(sched(lr), b1=b1, b2=b2, eps=eps, weight_decay=weight_decay),
        "frozen": optax.set_to_zero(),
      },
      labels,
    )
    return optax.chain(zero_a, *clip, wrap(optax.chain(lorafa_projection(peft_config), adam)))

  ratio = loraplus_lr_ratio if loraplus_lr_ratio is not None else 16.0
  groups = {
    "default": optax.adamw(sched(lr), b1=b1, b2=b2, eps=eps, weight_decay=loraplus_weight_decay),
    "b": optax.adamw(sched(lr * ratio), b1=b1, b2=b2, eps=eps, weight_decay=loraplus_weight_decay),
    "embedding": optax.adamw(sched(loraplus_lr_embedding), b1=b1, b2=b2, eps=eps, weight_decay=loraplus_weight_decay),
    "frozen": optax.set_to_zero(),
  }
  return optax.chain(*clip, wrap(optax.multi_transform(groups, labels)))


def lr_at(opt_kwargs: dict[str, Any], step: int) -> float:
  """The base learning rate at ``step`` (for logging)."""
  return float(
    schedule(
      opt_kwargs["lr"],
      lr_scheduler=opt_kwargs.get("lr_scheduler", "constant"),
      warmup_steps=opt_kwargs.get("warmup_steps", 0),
      total_steps=opt_kwargs.get("total_steps"),
    )(step)
  )
