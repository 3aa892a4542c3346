"""BEFT: bias-efficient fine-tuning, a trained output bias (PEFT's ``BeftModel``, ``peft_type="BEFT"``).

Linear: ``y = x Wᵀ + b + β``, β: ``beft_bias`` (1, out), flattened; no scaling factor. The sum is taken in the wider
of the base output's and β's dtype and returned in the output's (PEFT: ``(base(x) + β).to(base(x).dtype)``).
Init: zeros (the identity); ``init_weights=False``: ``N(0, 1)`` (PEFT's ``torch.randn``; not the identity).
Llama's default target (PEFT's table): ``v_proj``.

Merge: ``b ← b + β``, **only into a base bias**, as PEFT. A module with a bias is adapted by replacing that bias
(the ``bias`` entry ``b + β``, computed in fp32 and rounded to ``b``'s dtype as PEFT's in-place merge rounds it), so
merging is exact and automatic. A module without one (every Llama linear unless ``attention_bias``/``mlp_bias``)
cannot be merged: PEFT raises ``ValueError``; jpeft raises :class:`jpeft.core.UnmergeableError` naming the module.
Decision: jpeft does not write a new bias into the merged folder, because a Llama config has no per-module bias switch
(``attention_bias`` gives q, k, v and o a bias, ``mlp_bias`` gate, up and down), so the merged model would change
architecture and need zero biases written for untargeted modules; a merged folder must load as the base model's
architecture. Keep the adapter (``core.apply``) instead. Unmerge (``b − β``) is not offered: ``core.unmerge`` undoes
weight deltas only, and ``core.merge`` never modifies the base params.

Reference: "BEFT: Bias-Efficient Fine-Tuning of Language Models" (arXiv 2509.15974). Mirrors
``peft.tuners.beft.layer.Linear``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp
from flax import struct

from jpeft.config import AdapterCheckpointError, InvalidConfigError, PeftConfig, UnmergeableError
from jpeft.methods.base import (
  check_kind,
  Method,
  ModuleSpec,
  add_in_adapter_dtype,
  base_matmul,
  check_tensor_names,
  register,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BeftConfig(PeftConfig):
  """PEFT 0.21.2's ``BeftConfig``: every field, with PEFT's defaults; all of them implemented.

  PEFT's class has no ``exclude_modules``, ``layers_to_transform`` nor ``layers_pattern``: they are refused when set
  (and ignored, with a warning, in a config file, as PEFT ignores unknown keys).
  """

  peft_type: Optional[str] = "BEFT"
  init_weights: bool = True

  peft_absent_fields: ClassVar[frozenset[str]] = frozenset({"exclude_modules", "layers_to_transform", "layers_pattern"})

  def validate(self) -> None:
    for name in sorted(self.peft_absent_fields):
      if getattr(self, name) is not None:
        raise InvalidConfigError(f"BeftConfig has no field `{name}` (PEFT's BeftConfig does not filter modules)")


SUPPORTED_KINDS = ("linear",)  # PEFT's BEFT wraps nn.Linear only


@struct.dataclass
class BeftWeight:
  """A Linear weight without a bias whose output gets ``beft_bias``; it cannot be merged (no base bias)."""

  base: jax.Array  # (out, in)
  beft_bias: jax.Array  # (1, out)
  name: str = struct.field(pytree_node=False)

  def matmul(self, x, dtype=None):
    return add_in_adapter_dtype(base_matmul(x, self.base, dtype or x.dtype), self.beft_bias.reshape(-1))

  def materialize(self):
    raise UnmergeableError(
      f'BEFT cannot be merged into {self.name!r}: its base layer has no bias (PEFT: "Base layer has no bias, '
      f"cannot merge bias adapter\"), and jpeft does not add bias tensors the model's architecture lacks; keep the "
      f"adapter (core.apply) instead"
    )


def init_module(key, spec: ModuleSpec, config) -> dict:
  check_kind(spec, SUPPORTED_KINDS, "BEFT")
  shape = (1, int(spec.weight.shape[0]))
  return {"beft_bias": jnp.zeros(shape) if config.init_weights else jax.random.normal(key, shape)}


def adapt_module(spec: ModuleSpec, tensors: dict, config, shared, rng) -> dict:
  del config, shared, rng  # no options, no model-level tensors, no dropout
  check_kind(spec, SUPPORTED_KINDS, "BEFT")
  check_tensor_names(spec, tensors, (("beft_bias",),), "BEFT")
  beta, shape = tensors["beft_bias"], (1, int(spec.weight.shape[0]))
  if tuple(beta.shape) != shape:
    raise AdapterCheckpointError(
      f"{spec.name}: `beft_bias` has shape {tuple(beta.shape)}, but this {tuple(spec.weight.shape)} weight needs "
      f"{shape} (1, out_features)"
    )
  if spec.bias is not None:
    return {"bias": add_in_adapter_dtype(spec.bias, beta.reshape(-1))}
  return {"weight": BeftWeight(spec.weight, beta, name=spec.name)}


BEFT = register(
  Method(
    config_class=BeftConfig,
    init_module=init_module,
    adapt_module=adapt_module,
    supported_kinds=SUPPORTED_KINDS,
    identity_at_init=lambda config: bool(config.init_weights),
    tensor_axes=lambda tensor, kind, config: (None, 0) if tensor == "beft_bias" else None,
  )
)
