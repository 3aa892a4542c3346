"""Loss, gradients and the jitted train step over an adapter (or all params for full fine-tuning).

The base params are an *argument* of every jitted function (never a closure: captured arrays would become
compile-time constants). Only the adapter is differentiated and updated, so the base cannot change.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jpeft import core
from jpeft.models.llama import LlamaConfig, base_array, causal_lm_loss, cross_entropy, forward


def make_loss_fn(model_config: LlamaConfig, peft_config=None, *, compute_dtype=None, remat: bool = False) -> Callable:
  """``loss(trainable, params, batch, rng) -> (loss, n_tokens)``.

  ``trainable`` is the adapter, or the full params when ``peft_config`` is None (full fine-tuning, in which
  case ``params`` is ignored). ``rng`` drives dropout; None evaluates without it.

  A batch may carry ``loss_positions`` and ``loss_targets`` (``jpeft.models.loss_positions`` of its labels):
  the head then runs on those positions only, with the same loss and gradients.

  The method's regulariser (:func:`jpeft.core.regularizer`: AdaLoRA's orthogonality penalty) is added to the loss,
  as PEFT adds it to ``outputs.loss``.
  """

  def loss_fn(trainable, params, batch, rng=None):
    loss, n = data_loss_fn(trainable, params, batch, rng)
    if peft_config is not None:  # the method's own term (AdaLoRA's orthogonality penalty), as PEFT adds it
      reg = core.regularizer(trainable, peft_config)
      if reg is not None:
        loss = loss + reg.astype(loss.dtype)
    return loss, n

  def data_loss_fn(trainable, params, batch, rng=None):
    if peft_config is None:
      model_params = trainable
    else:
      model_params = core.apply(params, trainable, peft_config, rng=rng, model_config=model_config)
    if "loss_positions" in batch:
      logits = forward(
        model_params,
        model_config,
        batch["input_ids"],
        batch["attention_mask"],
        compute_dtype=compute_dtype,
        remat=remat,
        logits_at=batch["loss_positions"],
      )
      return cross_entropy(logits, batch["loss_targets"])
    logits = forward(
      model_params, model_config, batch["input_ids"], batch["attention_mask"], compute_dtype=compute_dtype, remat=remat
    )
    return causal_lm_loss(logits, batch["labels"])

  return loss_fn


def value_and_grad(loss_fn: Callable, peft_config) -> Callable:
  """``(trainable, params, batch, rng) -> ((loss, n_tokens), grads)``, differentiating the trained tensors only.

  The method's frozen tensors (saved, never trained: VeRA's projections) are not differentiated; their entries in
  ``grads`` are zeros, so the gradient norm and its clipping see the trained tensors alone, as in PyTorch where a
  buffer has no gradient.
  """
  if peft_config is None:
    return jax.value_and_grad(loss_fn, has_aux=True)

  def fn(trainable, params, batch, rng=None):
    trained, frozen = core.split_trainable(trainable, peft_config)
    out, grads = jax.value_and_grad(lambda t: loss_fn(core.join(t, frozen), params, batch, rng), has_aux=True)(trained)
    return out, core.join(grads, jax.tree_util.tree_map(jnp.zeros_like, frozen))

  return fn


def make_grad_fn(model_config, peft_config=None, *, compute_dtype=None, remat: bool = False):
  """Jitted ``(trainable, params, batch, rng) -> (loss, grads)``; ``remat`` as in :func:`make_train_step`."""
  grad = value_and_grad(make_loss_fn(model_config, peft_config, compute_dtype=compute_dtype, remat=remat), peft_config)

  @jax.jit
  def grad_fn(trainable, params, batch, rng=None):
    (loss, _), grads = grad(trainable, params, batch, rng)
    return loss, grads

  return grad_fn


def make_train_step(
  model_config,
  peft_config,
  optimizer: optax.GradientTransformation,
  *,
  compute_dtype=None,
  donate: bool = True,
  remat: bool = False,
):
  """Jitted ``(trainable, opt_state, params, batch, rng) -> (trainable, opt_state, metrics)``.

  ``metrics`` holds the loss (before the update), the number of loss tokens and the gradient norm (of the trained
  tensors). ``remat`` recomputes each decoder layer in the backward pass instead of keeping its activations. The
  method's parameter constraint (:func:`jpeft.core.project`: OFT's COFT) is enforced before the gradient, as PEFT
  projects in its forward and then updates the projected values, and again after the update.
  """
  grad = value_and_grad(make_loss_fn(model_config, peft_config, compute_dtype=compute_dtype, remat=remat), peft_config)

  def step(trainable, opt_state, params, batch, rng):
    if peft_config is not None:  # PEFT projects in its forward, then the optimizer updates the projected values
      trainable = core.project(trainable, peft_config)
    (loss, n), grads = grad(trainable, params, batch, rng)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    if peft_config is not None:
      trainable = core.project(trainable, peft_config)
    return trainable, opt_state, {"loss": loss, "n_tokens": n, "grad_norm": optax.global_norm(grads)}

  return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def adapter_in_base_dtype(adapter: core.Adapter, params) -> core.Adapter:
  """The adapter with every floating tensor in the dtype of the base weight it adapts.

  This is PEFT's ``get_peft_model(..., autocast_adapter_dtype=False)``: ``core.init`` upcasts a fresh adapter
  over a bfloat16/float16 base to float32 (PEFT's default, ``autocast_adapter_dtype=True``); this undoes that.
  Modules without a weight of their own (a tied ``lm_head``, the shared tensors) take the embedding's dtype.
  """
  default = jnp.dtype(base_array(params["model.embed_tokens.weight"]).dtype)
  out = {}
  for module, tensors in adapter.items():
    weight = params.get(f"{module}.weight")
    dtype = jnp.dtype(base_array(weight).dtype) if weight is not None else default
    out[module] = {
      name: value.astype(dtype) if jnp.issubdtype(value.dtype, jnp.floating) else value
      for name, value in tensors.items()
    }
  return out


def cast_trainable(tree: Any, dtype) -> Any:
  return jax.tree_util.tree_map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)
