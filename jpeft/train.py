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


def loss_token_count(batch) -> jax.Array:
  """The number of positions the batch's loss averages over (what ``make_loss_fn`` returns as ``n_tokens``)."""
  if "loss_targets" in batch:
    return jnp.sum(batch["loss_targets"] != -100)
  return jnp.sum(batch["labels"][:, 1:] != -100)


def accumulate(grad: Callable, accum_steps: int) -> Callable:
  """``grad`` over ``accum_steps`` equal micro-batches of the batch's rows, one after the other (``lax.scan``).

  Each micro-batch's mean loss and gradients are weighted by its share of the batch's loss tokens, so the result is
  the full batch's token-mean loss and its gradient (the regulariser, added to every micro-batch's loss, comes out
  once). Only one micro-batch's activations are alive at a time. Dropout draws one key per micro-batch, so with
  dropout the masks differ from the full batch's. A float32 accumulator serves low-precision adapters.
  """
  if accum_steps == 1:
    return grad

  def fn(trainable, params, batch, rng=None):
    rows = jax.tree_util.tree_leaves(batch)[0].shape[0]
    if rows % accum_steps:
      raise ValueError(f"batch of {rows} rows does not split into {accum_steps} equal micro-batches")
    micro = jax.tree_util.tree_map(lambda x: x.reshape(accum_steps, rows // accum_steps, *x.shape[1:]), batch)
    total = loss_token_count(batch)
    rngs = None if rng is None else jax.random.split(rng, accum_steps)
    floating = lambda x: jnp.issubdtype(x.dtype, jnp.inexact)  # noqa: E731

    def body(carry, xs):
      loss_sum, grad_sum = carry
      mb, r = xs
      share = jnp.where(total > 0, loss_token_count(mb) / jnp.maximum(total, 1), 1.0 / accum_steps)
      (loss, _), grads = grad(trainable, params, mb, r)
      grad_sum = jax.tree_util.tree_map(
        lambda a, g: a + share * g.astype(jnp.float32) if floating(g) else a, grad_sum, grads
      )
      return (loss_sum + share * loss.astype(jnp.float32), grad_sum), None

    zeros = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, jnp.float32 if floating(x) else x.dtype), trainable)
    (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), (micro, rngs))
    grads = jax.tree_util.tree_map(lambda g, x: g.astype(x.dtype), grads, trainable)
    return (loss, total), grads

  return fn


def make_train_step(
  model_config,
  peft_config,
  optimizer: optax.GradientTransformation,
  *,
  compute_dtype=None,
  donate: bool = True,
  remat: bool = False,
  accum_steps: int = 1,
):
  """Jitted ``(trainable, opt_state, params, batch, rng) -> (trainable, opt_state, metrics)``.

  ``metrics`` holds the loss (before the update), the number of loss tokens and the gradient norm (of the trained
  tensors). ``remat`` recomputes each decoder layer in the backward pass instead of keeping its activations.
  ``accum_steps`` > 1 computes the gradient over that many micro-batches of the batch's rows (:func:`accumulate`):
  the same loss and update as the full batch, with one micro-batch's activations in memory. The
  method's parameter constraint (:func:`jpeft.core.project`: OFT's COFT) is enforced before the gradient, as PEFT
  projects in its forward and then updates the projected values, and again after the update.
  """
  if not isinstance(accum_steps, int) or accum_steps < 1:
    raise ValueError(f"accum_steps must be a positive integer, got {accum_steps!r}")
  if accum_steps > 1 and core.batch_coupled(peft_config):
    raise ValueError(
      f"accum_steps={accum_steps} with {peft_config.peft_type}: a row's output depends on the other rows of its "
      "batch, so micro-batches would not compute the full batch's loss"
    )
  grad = value_and_grad(make_loss_fn(model_config, peft_config, compute_dtype=compute_dtype, remat=remat), peft_config)
  grad = accumulate(grad, accum_steps)

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


def memory_stats(compiled) -> dict:
  """XLA's buffer sizes of a compiled step (``compiled.memory_analysis()``), in bytes.

  ``peak_bytes`` = arguments + outputs + temporaries - aliases (outputs written into donated inputs): the buffers the
  step holds at once. It is XLA's own accounting of its buffer assignment, known before the step runs; the process
  holds more (the runtime, the host copies, what evaluation allocates), which is what a measured peak adds.
  """
  m = compiled.memory_analysis()
  get = lambda name: int(getattr(m, name, 0) or 0)  # noqa: E731
  out = {
    "argument_bytes": get("argument_size_in_bytes"),
    "output_bytes": get("output_size_in_bytes"),
    "temp_bytes": get("temp_size_in_bytes"),
    "alias_bytes": get("alias_size_in_bytes"),
    "code_bytes": get("generated_code_size_in_bytes"),
  }
  out["peak_bytes"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
  return out


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
