"""LN tuning: trained copies of the model's norms (PEFT's ``LNTuningModel``, ``peft_type="LN_TUNING"``).

Each targeted norm is replaced by a trainable copy of itself: the copy's ``weight`` (and ``bias``, for a norm that has
one) is the adapter tensor ``ln_tuning_layers.weight``, initialised to the base norm's own weight, so a fresh adapter
is the identity. The forward is the model's own norm (RMSNorm, Gemma's ``1 + w`` included) with the copied weight.
PEFT's targets for Llama: ``input_layernorm``, ``post_attention_layernorm`` and the final ``norm``
(:mod:`jpeft.targets` holds the table for every family).

Keys: ``base_model.model.<norm>.ln_tuning_layers.weight`` (no adapter name: PEFT saves the copied module's state dict
under it). Merge: the copy becomes the norm (exact; PEFT swaps the modules). There is no additive ``ΔW``: LN tuning is
not convertible to LoRA and ``core.unmerge`` refuses it. PEFT's class has no ``layers_to_transform`` nor
``layers_pattern``; they are refused when set.

Mirrors ``peft.tuners.ln_tuning.layer.LNTuningLayer``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

import jax.numpy as jnp

from jpeft.config import AdapterCheckpointError, InvalidConfigError, PeftConfig
from jpeft.methods.base import Method, ModuleSpec, check_kind, check_tensor_names, register

SUPPORTED_KINDS = ("norm",)  # jpeft's models have RMSNorms; PEFT copies whatever module it is given
WEIGHT, BIAS = "ln_tuning_layers.weight", "ln_tuning_layers.bias"


@dataclasses.dataclass(frozen=True, kw_only=True)
class LNTuningConfig(PeftConfig):
  """PEFT 0.21.2's ``LNTuningConfig``: ``target_modules``, ``exclude_modules``, ``modules_to_save``."""

  peft_type: Optional[str] = "LN_TUNING"

  peft_absent_fields: ClassVar[frozenset[str]] = frozenset({"layers_to_transform", "layers_pattern"})

  def validate(self) -> None:
    for name in sorted(self.peft_absent_fields):
      if getattr(self, name) is not None:
        raise InvalidConfigError(f"LNTuningConfig has no field `{name}` (PEFT's LNTuningConfig does not filter layers)")


def init_module(key, spec: ModuleSpec, config) -> dict:
  del key, config  # a copy of the base norm: nothing random, no options
  check_kind(spec, SUPPORTED_KINDS, "LN_TUNING")
  tensors = {WEIGHT: jnp.array(spec.weight)}
  if spec.bias is not None:
    tensors[BIAS] = jnp.array(spec.bias)
  return tensors


def adapt_module(spec: ModuleSpec, tensors: dict, config, shared, rng) -> dict:
  del config, shared, rng  # no options, no model-level tensors, no dropout
  check_kind(spec, SUPPORTED_KINDS, "LN_TUNING")
  check_tensor_names(spec, tensors, ((WEIGHT,),) if spec.bias is None else ((WEIGHT, BIAS),), "LN_TUNING")
  out = {}
  for suffix, name, base in (("weight", WEIGHT, spec.weight), ("bias", BIAS, spec.bias)):
    if base is None:
      continue
    value = tensors[name]
    if tuple(value.shape) != tuple(base.shape):
      raise AdapterCheckpointError(
        f"{spec.name}: `{name}` has shape {tuple(value.shape)}, but the norm's {suffix} has {tuple(base.shape)}"
      )
    # The copy runs in the model's dtype, as the base norm does; an fp32 copy of a bf16 norm (PEFT's
    # autocast_adapter_dtype) is rounded to bf16 here, where the forward reads it.
    out[suffix] = value.astype(base.dtype)
  return out


LN_TUNING = register(
  Method(
    config_class=LNTuningConfig,
    init_module=init_module,
    adapt_module=adapt_module,
    supported_kinds=SUPPORTED_KINDS,
    tensor_axes=lambda tensor, kind, config: None,  # a norm's weight is replicated
  )
)
