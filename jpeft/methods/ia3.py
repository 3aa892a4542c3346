"""(IA)³, infused adapters by inhibiting and amplifying inner activations (PEFT's ``IA3Model``, ``peft_type="IA3"``).

Output scaling (targets not in ``feedforward_modules``):  ``y = (x Wᵀ + b) ⊙ l``,  l: ``ia3_l`` (out, 1);
input scaling (feed-forward targets):                     ``y = (x ⊙ l) Wᵀ + b``,  l: ``ia3_l`` (1, in).
There is no scaling factor, rank or dropout: ``l`` multiplies the activations as it is. The bias of an
output-scaled module is scaled too; :func:`adapt_module` returns it as a replacement ``bias`` entry ``b ⊙ l``, since
the model adds ``<module>.bias`` after ``matmul``. Products are taken in the wider of the two dtypes and cast back
(an fp32 ``l`` over a bf16 base, as PEFT's autocast_adapter_dtype makes it).

Init (``init_ia3_weights``): True -- ones (the identity); False -- ``N(0, 1)`` (PEFT's ``torch.randn``; not the
identity).

Merge: ``W ⊙ l`` -- ``l`` (out, 1) scales the rows of W (and the bias), ``l`` (1, in) its columns. The method is
multiplicative, so it has no ``delta()`` and :func:`jpeft.core.unmerge` refuses it: PEFT's ``unmerge`` divides the
merged weight by ``l + 1e-8``, which is inexact (and wrong where an entry of ``l`` is near 0); keep the base params.

Which target is feed-forward (``IA3Model._check_target_module_feedforward``): a str ``feedforward_modules`` is
``re.fullmatch``-ed against the full module name; a list matches with a plain ``name.endswith(f)``, **without a dot
boundary** (``["p_proj"]`` makes ``up_proj`` feed-forward), unlike ``target_modules``. None takes PEFT's table for
the architecture (llama: ``down_proj``).

Reference: Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning". Mirrors ``peft.tuners.ia3.layer.Linear``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar, Optional, Union

import jax
import jax.numpy as jnp
from absl import logging
from flax import struct

from jpeft import targets as targets_lib
from jpeft.config import AdapterCheckpointError, InvalidConfigError, PeftConfig, check_regex, show
from jpeft.methods.base import check_kind, Method, ModuleSpec, base_matmul, check_tensor_names, register

# The architecture whose default feedforward_modules apply when the config has none. PEFT's table gives the same
# (down_proj) for every family jpeft.models implements (``SUPPORTED_MODEL_TYPES``: Llama, Qwen2, Qwen3, Mistral,
# Gemma 2, Gemma 3 text), so one entry serves them all (tests/test_families.py checks the defaults per family).
_MODEL_TYPE = "llama"


@dataclasses.dataclass(frozen=True, kw_only=True)
class IA3Config(PeftConfig):
  """PEFT 0.21.2's ``IA3Config``: every field, with PEFT's defaults. All of them are implemented.

  PEFT's class has no ``layers_to_transform`` / ``layers_pattern``; they are refused when set.
  """

  peft_type: Optional[str] = "IA3"
  feedforward_modules: Optional[Union[tuple[str, ...], str]] = None
  fan_in_fan_out: bool = False
  init_ia3_weights: bool = True

  peft_absent_fields: ClassVar[frozenset[str]] = frozenset({"layers_to_transform", "layers_pattern"})

  def validate(self) -> None:
    for name in sorted(self.peft_absent_fields):
      if getattr(self, name) is not None:
        raise InvalidConfigError(f"IA3Config has no field `{name}` (PEFT's IA3Config does not filter layers)")
    ff = self.feedforward_modules
    if isinstance(ff, str):
      check_regex("feedforward_modules", ff)
    # PEFT checks the subset only when both are lists (sets there): never for a str (regex) nor a null on either side.
    if isinstance(ff, tuple) and isinstance(self.target_modules, tuple):
      extra = sorted(set(ff) - set(self.target_modules))
      if extra:
        raise InvalidConfigError(
          f"`feedforward_modules` should be a subset of `target_modules`: {show(extra)} of feedforward_modules="
          f"{show(ff)} not in target_modules={show(self.target_modules)}"
        )
    if self.fan_in_fan_out:
      # PEFT does the same for each nn.Linear target (every Llama target); only GPT-2's Conv1D keeps it True.
      logging.warning(
        "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting fan_in_fan_out to False."
      )
      self._set("fan_in_fan_out", False)


def is_feedforward(config: IA3Config, name: str) -> bool:
  """Whether the target ``name`` (a full module name) scales its input, by PEFT's rule (see the module docstring)."""
  ff = config.feedforward_modules
  if ff is None:
    ff = targets_lib.default_feedforward_modules(_MODEL_TYPE)
    if ff is None:
      raise InvalidConfigError("Please specify `feedforward_modules` in the config (no default for this model)")
  if isinstance(ff, str):
    return re.fullmatch(ff, name) is not None
  return any(name.endswith(f) for f in ff)  # no dot boundary, as in PEFT


# ---------------------------------------------------------------------------------------------------------------
# Method

SUPPORTED_KINDS = ("linear",)  # PEFT's IA3 wraps nn.Linear / Conv1D / convolutions, not embeddings nor norms


@struct.dataclass
class IA3Weight:
  """A Linear weight whose output (``feedforward=False``) or input (``feedforward=True``) is scaled by ``ia3_l``."""

  base: jax.Array  # (out, in)
  ia3_l: jax.Array  # (out, 1), or (1, in) when feedforward
  feedforward: bool = struct.field(pytree_node=False)

  def matmul(self, x, dtype=None):
    dtype = dtype or x.dtype
    scale = self.ia3_l.reshape(-1)
    if self.feedforward:  # PEFT: (x.to(l.dtype) * l).to(x.dtype), then the base layer
      return base_matmul(_scaled(x, scale), self.base, dtype)
    return _scaled(base_matmul(x, self.base, dtype), scale)

  def materialize(self):
    return _scaled(self.base, self.ia3_l)  # rows for (out, 1), columns for (1, in)


def _scaled(x, scale):
  """``x ⊙ scale`` (broadcast) in the wider dtype, returned in ``x``'s."""
  dt = jnp.promote_types(x.dtype, scale.dtype)
  return (x.astype(dt) * scale.astype(dt)).astype(x.dtype)


def _shape(spec: ModuleSpec, feedforward: bool) -> tuple[int, int]:
  out_dim, in_dim = spec.weight.shape
  return (1, in_dim) if feedforward else (out_dim, 1)


def init_module(key, spec: ModuleSpec, config) -> dict:
  check_kind(spec, SUPPORTED_KINDS, "IA3")
  shape = _shape(spec, is_feedforward(config, spec.name))
  return {"ia3_l": jnp.ones(shape) if config.init_ia3_weights else jax.random.normal(key, shape)}


def adapt_module(spec: ModuleSpec, tensors: dict, config, shared, rng) -> dict:
  del shared, rng  # no model-level tensors, no dropout
  check_kind(spec, SUPPORTED_KINDS, "IA3")
  check_tensor_names(spec, tensors, (("ia3_l",),), "IA3")
  ff = is_feedforward(config, spec.name)
  scale, shape = tensors["ia3_l"], _shape(spec, ff)
  if tuple(scale.shape) != shape:
    raise AdapterCheckpointError(
      f"the IA3 vector `ia3_l` of {spec.name!r} has shape {tuple(scale.shape)}; this "
      f"{'feed-forward' if ff else 'non-feed-forward'} target of weight {tuple(spec.weight.shape)} needs {shape} "
      f"(feedforward_modules={show(config.feedforward_modules)})"
    )
  entries = {"weight": IA3Weight(spec.weight, scale, feedforward=ff)}
  if spec.bias is not None and not ff:
    entries["bias"] = _scaled(spec.bias, scale.reshape(-1))
  return entries


def _identity_at_init(config) -> bool:
  return bool(config.init_ia3_weights)


def _tensor_axes(tensor: str, kind: str, config):
  """``ia3_l`` (out, 1) follows the base's out axis and (1, in) its in axis. The module name (hence which shape)
  is not passed here, so both dims are declared: :mod:`jpeft.sharding` drops a mesh axis that does not divide a
  dimension, and the size-1 dim is thus left replicated (giving ``(0, None)`` and ``(None, 1)``)."""
  del kind, config
  return (0, 1) if tensor == "ia3_l" else None


IA3 = register(
  Method(
    config_class=IA3Config,
    init_module=init_module,
    adapt_module=adapt_module,
    supported_kinds=SUPPORTED_KINDS,
    identity_at_init=_identity_at_init,
    tensor_axes=_tensor_axes,
  )
)
