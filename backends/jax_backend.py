"""jpeft behind the :class:`backends.base.Backend` interface."""

from __future__ import annotations

import functools
import os
import resource

import jax
import jax.numpy as jnp
import numpy as np

from backends.base import Backend, check_state_keys, is_full_finetuning
from jpeft import checkpoint, core, optim, registry, train
from jpeft.trainer import AMP_DTYPE, ATTN_IMPLEMENTATIONS
from jpeft.generate import generate as jpeft_generate
from jpeft.models import forward, load_model
from jpeft.models.llama import param_shapes

_DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16}


@functools.partial(jax.jit, static_argnames=("peft_config", "config", "compute_dtype"))
def _adapted_logits(params, trainable, input_ids, attention_mask, *, peft_config, config, compute_dtype):
  """The model's logits under its adapter, in one compiled program (one compile per config and batch shape)."""
  if peft_config is not None and trainable is not None:
    params = core.apply(params, trainable, peft_config, model_config=config)
  elif trainable is not None:  # full fine-tuning: the trained copy is the model
    params = trainable
  return forward(params, config, input_ids, attention_mask, compute_dtype=compute_dtype)


class JaxBackend(Backend):
  """The Flax-side Llama with a jpeft adapter; the base params never change (only the adapter trains)."""

  name = "jax"

  def __init__(self, compute_dtype=None):
    self.compute_dtype = compute_dtype
    self.model_config = None
    self.base_params = None  # as loaded (PiSSA/OLoRA residualise a copy, kept in self.params)
    self.params = None
    self.peft_config = None
    self.trainable = None  # the adapter, or all params for full fine-tuning
    self.full = False
    self.source = None
    self._opt = None
    self._merged = False
    self._rng = jax.random.key(0)
    self.gradient_checkpointing = False  # set_training_options: the train step rematerialises each layer
    self.amp = False  # set_training_options: the train step computes in bfloat16
    self._grad_fns = {}  # loss_and_grads' jitted functions by (model, method, compute dtype, remat)

  # -- model and adapter ---------------------------------------------------------------------------------
  def load_base(self, source: str, *, dtype: str = "float32", attn_implementation: str | None = None) -> None:
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
      raise ValueError(
        f"attn_implementation {attn_implementation!r}: jpeft's attention is a plain softmax attention (the math "
        f"of 'eager' and 'sdpa'); use one of {list(ATTN_IMPLEMENTATIONS)}"
      )
    self.model_config, self.base_params = load_model(source, dtype=_DTYPES[str(dtype).lower()])
    self.params = self.base_params
    self.source = source
    self.trainable, self.peft_config, self.full, self._merged = None, None, False, False
    self._opt = None

  def _require(self):
    if self.params is None:
      raise RuntimeError("no base model: call load_base first")

  def attach_adapter(self, peft_config: dict, *, seed: int = 0, autocast_adapter_dtype: bool = True) -> None:
    self._require()
    self._opt, self._merged = None, False
    self._rng = jax.random.key(seed + 1)
    if is_full_finetuning(peft_config):
      self.full, self.peft_config, self.params = True, None, self.base_params
      self.trainable = dict(self.base_params)
      return
    self.full = False
    self.peft_config = registry.config_from_dict(peft_config)
    self.trainable, self.params = core.init(jax.random.key(seed), self.base_params, self.peft_config, self.model_config)
    if not autocast_adapter_dtype:
      self.trainable = train.adapter_in_base_dtype(self.trainable, self.params)

  def _state(self) -> dict:
    if self.trainable is None:
      raise RuntimeError("the adapter was merged" if self._merged else "no adapter attached")
    if self.full:
      shapes = param_shapes(self.model_config)
      return {k: v for k, v in self.trainable.items() if k in shapes}
    return core.to_state_dict(self.trainable, self.params, self.peft_config)

  def adapter_state_dict(self) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in self._state().items()}

  def set_adapter_state_dict(self, state: dict[str, np.ndarray]) -> None:
    current = self._state()
    check_state_keys(current, state)
    if self.full:
      self.trainable = {k: jnp.asarray(state[k], v.dtype) for k, v in self.trainable.items()}
      return
    extra = core.embedding_base_layers(self.trainable, self.params, self.peft_config)
    self.trainable = core.from_state_dict(
      state, self.trainable, extra=extra, config=self.peft_config, params=self.params
    )

  def save_adapter(self, folder: str) -> None:
    if self.full:
      checkpoint.save_merged_model(folder, self.trainable, self.model_config)
      return
    if self.trainable is None:
      raise RuntimeError("no adapter attached")
    opt_state = None if self._opt is None else self._opt[1]  # AdaLoRA: the allocator's mask is the rank_pattern
    checkpoint.save_pretrained(folder, self.trainable, self.peft_config, self.params, opt_state=opt_state)

  def load_adapter(self, folder: str, *, is_trainable: bool = True) -> None:
    self._require()
    self._opt, self._merged = None, False
    if not os.path.isfile(os.path.join(folder, checkpoint.ADAPTER_CONFIG)):
      _, params = load_model(folder, dtype=self.base_params["model.norm.weight"].dtype)
      self.full, self.peft_config, self.trainable, self.params = True, None, params, self.base_params
      return
    self.full = False
    self.peft_config, self.trainable, self.params = checkpoint.load_pretrained(
      folder, self.base_params, self.model_config
    )

  # -- compute -------------------------------------------------------------------------------------------
  def _model_params(self):
    if self.full:
      return self.trainable
    if self.trainable is None:
      return self.params
    return core.apply(self.params, self.trainable, self.peft_config, model_config=self.model_config)

  def logits(self, input_ids, attention_mask) -> np.ndarray:
    self._require()
    return np.asarray(
      _adapted_logits(
        self.params,
        self.trainable,
        jnp.asarray(input_ids),
        jnp.asarray(attention_mask),
        peft_config=None if self.full else self.peft_config,
        config=self.model_config,
        compute_dtype=self.compute_dtype,
      )
    )

  def _batch(self, input_ids, attention_mask, labels):
    return {
      "input_ids": jnp.asarray(input_ids, jnp.int32),
      "attention_mask": jnp.asarray(attention_mask, jnp.int32),
      "labels": jnp.asarray(labels, jnp.int32),
    }

  def _dropout_rng(self):
    self._rng, sub = jax.random.split(self._rng)
    return sub

  def _train_compute_dtype(self):
    return AMP_DTYPE if self.amp else self.compute_dtype

  def set_training_options(self, *, gradient_checkpointing: bool = False, amp: bool = False, compile: bool = False):
    """``compile`` is accepted either way: every jpeft step is ``jax.jit``-ed. A configured optimizer keeps its
    state; its step is rebuilt with the new options."""
    self.gradient_checkpointing, self.amp = bool(gradient_checkpointing), bool(amp)
    if self._opt is not None:
      optimizer, opt_state, _ = self._opt
      self._opt = (optimizer, opt_state, self._make_step(optimizer))

  def _make_step(self, optimizer):
    return train.make_train_step(
      self.model_config,
      self.peft_config,
      optimizer,
      compute_dtype=self._train_compute_dtype(),
      donate=False,
      remat=self.gradient_checkpointing,
    )

  @property
  def compiled_train_step(self):
    """The jitted ``(trainable, opt_state, params, batch, rng)`` step of :meth:`train_step` (None before
    :meth:`configure_optimizer`)."""
    return None if self._opt is None else self._opt[2]

  def loss_and_grads(self, input_ids, attention_mask, labels):
    if self.trainable is None:
      raise RuntimeError("no adapter attached")
    # one jitted function per setting, kept: a new closure per call would trace and compile again every time
    key = (self.model_config, self.peft_config, self._train_compute_dtype(), self.gradient_checkpointing)
    grad_fn = self._grad_fns.get(key)
    if grad_fn is None:
      grad_fn = self._grad_fns[key] = train.make_grad_fn(
        self.model_config, self.peft_config, compute_dtype=key[2], remat=key[3]
      )
    loss, grads = grad_fn(
      self.trainable, self.params, self._batch(input_ids, attention_mask, labels), self._dropout_rng()
    )
    if self.full:
      shapes = param_shapes(self.model_config)
      return float(loss), {k: np.asarray(v) for k, v in grads.items() if k in shapes}
    frozen = core.frozen_tensors(self.peft_config)
    grads = {m: {t: g for t, g in ts.items() if t not in frozen} for m, ts in grads.items()}
    return float(loss), {
      k: np.asarray(v)
      for k, v in core.to_state_dict(grads, self.params, self.peft_config, embedding_layers=False).items()
    }

  def configure_optimizer(
    self,
    *,
    lr,
    weight_decay=0.0,
    betas=(0.9, 0.999),
    eps=1e-8,
    grad_norm_clip=None,
    optimizer_type="AdamW",
    warmup_steps=0,
    total_steps=None,
    lr_scheduler="constant",
    loraplus_lr_ratio=None,
  ) -> None:
    if self.trainable is None:
      raise RuntimeError("no adapter attached")
    kind = optimizer_type.lower().replace("_", "-")
    extra = {}
    if kind in ("lora+", "loraplus"):
      extra = dict(loraplus_lr_ratio=loraplus_lr_ratio, loraplus_weight_decay=weight_decay)
    if kind in ("lora-fa", "lorafa") and eps == 1e-8:
      eps = 1e-6  # PEFT's LoRA-FA default
    optimizer = optim.make_optimizer(
      self.trainable,
      self.peft_config,
      lr=lr,
      optimizer_type=optimizer_type,
      weight_decay=weight_decay,
      betas=tuple(betas),
      eps=eps,
      grad_norm_clip=grad_norm_clip,
      lr_scheduler=lr_scheduler,
      warmup_steps=warmup_steps,
      total_steps=total_steps,
      **extra,
    )
    self._opt = (optimizer, optimizer.init(self.trainable), self._make_step(optimizer))

  def train_step(self, input_ids, attention_mask, labels) -> float:
    if self._opt is None:
      raise RuntimeError("call configure_optimizer first")
    optimizer, opt_state, step = self._opt
    self.trainable, opt_state, metrics = step(
      self.trainable, opt_state, self.params, self._batch(input_ids, attention_mask, labels), self._dropout_rng()
    )
    self._opt = (optimizer, opt_state, step)
    return float(metrics["loss"])

  def generate(self, input_ids, attention_mask, *, max_new_tokens, eos_token_id=None) -> np.ndarray:
    fill = eos_token_id if eos_token_id is not None else 0
    new = jpeft_generate(
      self._model_params(),
      self.model_config,
      input_ids,
      attention_mask,
      max_new_tokens=max_new_tokens,
      eos_token_id=eos_token_id if eos_token_id is not None else (),
      pad_token_id=fill,
      compute_dtype=self.compute_dtype,
    )
    return np.concatenate([np.asarray(input_ids), new.astype(np.asarray(input_ids).dtype)], axis=1)

  def merge(self) -> None:
    if self.full or self.trainable is None:
      return
    self.params = core.merge(self.params, self.trainable, self.peft_config, model_config=self.model_config)
    self.trainable, self._merged, self._opt = None, True, None

  def peak_memory_bytes(self) -> int:
    dev = jax.devices()[0]
    if dev.platform != "cpu":
      stats = dev.memory_stats() or {}
      return int(stats.get("peak_bytes_in_use", 0))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)

  def num_trainable_params(self) -> int:
    if self.trainable is None:
      return 0
    if self.full:
      return core.num_params(self.trainable)
    mask = core.trainable_mask(self.trainable, self.peft_config)
    return int(sum(v.size for m, ts in self.trainable.items() for t, v in ts.items() if mask[m][t]))
