"""HRA: Householder reflection adaptation (PEFT's ``HRAModel``, ``peft_type="HRA"``).

Linear: ``y = x (W H)ᵀ + b`` with ``H`` (in, in) built from ``U``: ``hra_u`` (in, r), and no scaling factor:

* ``apply_GS=False``: ``u_i = U[:, i] / ‖U[:, i]‖`` and ``H = (I − 2u_0u_0ᵀ)(I − 2u_1u_1ᵀ)⋯(I − 2u_{r−1}u_{r−1}ᵀ)``;
* ``apply_GS=True``: ``q_0 … q_{r−1}`` = (modified) Gram–Schmidt of U's columns in order, ``H = I − 2QQᵀ``.

PEFT computes ``W H`` in ``hra_u``'s dtype (the input and the weight cast to it) and returns the result in the input's
dtype; so does jpeft. Merge: ``W ← W H`` (multiplicative: no ``delta()``; PEFT unmerges with the reflections in
reverse order, jpeft keeps the base params instead).

Init (``init_weights=True``, r even): PEFT's paired init, ``U = repeat_interleave(V, 2, dim=1)`` with ``V`` (in, r/2)
at ``kaiming_uniform_(a=√5)``, i.e. ``U(±1/√(r/2))`` (torch's fan-in of an (in, r/2) tensor is r/2): adjacent
reflections are equal and cancel, so the adapter starts as the identity. r odd (with a warning, as PEFT) or
``init_weights=False``: U at ``kaiming_uniform_(a=√5)`` on (in, r), ``U(±1/√r)``, not the identity.

Decisions (PEFT 0.21.2 quirks, PEFT_METHODS.md §6.1):

* ``apply_GS=True`` with the paired init: Gram–Schmidt of a repeated column divides (rounding noise) by ~0, so PEFT
  starts from NaN logits or a random reflection. No Gram–Schmidt HRA can be the identity (``I − 2QQᵀ`` reflects
  span(Q)), so a fresh jpeft adapter takes r independent columns instead (``U(±1/√r)``, the non-paired init), with a
  warning; and a loaded ``apply_GS=True`` checkpoint whose columns Gram–Schmidt cannot orthogonalise (PEFT's
  untrained paired init) is refused (:func:`check_loaded`), as is ``apply_GS=True`` with ``r > in_features``.
* ``bias``: PEFT accepts ``"none"``, ``"all"`` or anything ending in ``"_only"`` (so does jpeft).

Reference: Yuan et al. 2024, "Bridging The Gap between Low-rank and Orthogonal Adaptation via Householder Reflection
Adaptation". Mirrors ``peft.tuners.hra.layer.HRALinear``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import struct

from jpeft.config import AdapterCheckpointError, InvalidConfigError, PeftConfig, check_bias, check_int
from jpeft.methods.base import (
  check_kind,
  kaiming_uniform,
  SHARED,
  Method,
  ModuleSpec,
  base_matmul,
  check_tensor_names,
  register,
)

# A Gram–Schmidt residual below this fraction of its column's norm leaves the direction q_i to float32 rounding
# (relative error ~eps32 / ratio > 1e-3): PEFT's untrained paired init gives ~1e-7, independent columns ~1.
_GS_MIN_RESIDUAL = 1e-4


@dataclasses.dataclass(frozen=True, kw_only=True)
class HRAConfig(PeftConfig):
  """PEFT 0.21.2's ``HRAConfig``: every field, with PEFT's defaults; all of them implemented.

  PEFT refuses ``r <= 0`` when it builds the layers and an unknown ``bias`` when it marks the trained parameters;
  jpeft refuses both here.
  """

  peft_type: Optional[str] = "HRA"
  r: int = 8
  apply_GS: bool = False
  init_weights: bool = True
  bias: str = "none"

  def validate(self) -> None:
    check_int("r", self.r, minimum=1, what=" value")
    check_bias(self.bias)


# ---------------------------------------------------------------------------------------------------------------
# Reflections


def gram_schmidt(u):
  """PEFT's modified Gram–Schmidt of ``u``'s columns, in order: ``(Q (in, r), residual norms / column norms (r,))``."""
  cols, ratios = [], []
  for i in range(u.shape[1]):
    v = u[:, i]
    for q in cols:
      v = v - jnp.dot(q, v) * q
    norm = jnp.linalg.norm(v)
    cols.append(v / norm)
    ratios.append(norm / jnp.linalg.norm(u[:, i]))
  return jnp.stack(cols, axis=1), jnp.stack(ratios)


def reflection(u, apply_gs: bool):
  """``H`` (in, in) of ``hra_u`` (in, r), in its dtype (the module docstring's formula)."""
  eye = jnp.eye(u.shape[0], dtype=u.dtype)
  if apply_gs:
    q = gram_schmidt(u)[0]
    return eye - 2 * q @ q.T
  u = u / jnp.linalg.norm(u, axis=0)
  h = eye
  for i in range(u.shape[1]):  # H ← H (I − 2 u_i u_iᵀ)
    h = h - 2 * jnp.outer(h @ u[:, i], u[:, i])
  return h


@struct.dataclass
class HraWeight:
  """A Linear weight times the reflections ``H`` of its input space: ``x (W H)ᵀ``."""

  base: jax.Array  # (out, in)
  hra_u: jax.Array  # (in, r)
  apply_gs: bool = struct.field(pytree_node=False)

  def _weight(self):
    adt = self.hra_u.dtype
    return self.base.astype(adt) @ reflection(self.hra_u, self.apply_gs)

  def matmul(self, x, dtype=None):
    return base_matmul(x, self._weight(), self.hra_u.dtype).astype(dtype or x.dtype)

  def materialize(self):
    return self._weight().astype(self.base.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Method

SUPPORTED_KINDS = ("linear",)  # PEFT's HRA wraps nn.Linear and nn.Conv2d, not embeddings nor norms


def init_module(key, spec: ModuleSpec, config) -> dict:
  check_kind(spec, SUPPORTED_KINDS, "HRA")
  in_dim, r = int(spec.weight.shape[1]), config.r
  if config.apply_GS and r > in_dim:
    raise InvalidConfigError(
      f"{spec.name}: HRA with apply_GS=True needs r <= in_features, got r={r} for in_features={in_dim}: Gram-Schmidt "
      f"cannot orthogonalise more than {in_dim} columns (PEFT divides by zero norms and computes NaN or noise)"
    )
  if not config.init_weights:
    return {"hra_u": kaiming_uniform(key, (in_dim, r))}
  if r % 2:
    logging.warning("The symmetric initialization can NOT be performed when r is odd!")
    return {"hra_u": kaiming_uniform(key, (in_dim, r))}
  if config.apply_GS:
    logging.warning(
      "HRA apply_GS=True: PEFT's symmetric init (init_weights=True) repeats every column, which Gram-Schmidt "
      "cannot orthogonalise (PEFT 0.21.2 then computes NaN or a random reflection); jpeft draws r independent "
      "columns instead. The adapter is not the identity at init (no Gram-Schmidt HRA can be)."
    )
    return {"hra_u": kaiming_uniform(key, (in_dim, r))}
  return {"hra_u": jnp.repeat(kaiming_uniform(key, (in_dim, r // 2)), 2, axis=1)}


def _checked_u(spec: ModuleSpec, tensors, config):
  check_tensor_names(spec, tensors, (("hra_u",),), "HRA")
  u, shape = tensors["hra_u"], (int(spec.weight.shape[1]), config.r)
  if tuple(u.shape) != shape:
    raise AdapterCheckpointError(
      f"{spec.name}: `hra_u` has shape {tuple(u.shape)}, but this {tuple(spec.weight.shape)} weight with r={config.r} "
      f"needs {shape} (in_features, r)"
    )
  return u


def adapt_module(spec: ModuleSpec, tensors: dict, config, shared, rng) -> dict:
  del shared, rng  # no model-level tensors, no dropout
  check_kind(spec, SUPPORTED_KINDS, "HRA")
  return {"weight": HraWeight(spec.weight, _checked_u(spec, tensors, config), apply_gs=config.apply_GS)}


def check_loaded(adapter, config, specs, source: str) -> None:
  """With ``apply_GS=True``, every module's columns must be independent enough for Gram–Schmidt (see the module
  docstring); raises :class:`AdapterCheckpointError` naming the module and column otherwise."""
  if not config.apply_GS:
    return
  for name, tensors in adapter.items():
    if name == SHARED or name not in specs:
      continue
    u = _checked_u(specs[name], tensors, config)
    ratios = np.asarray(gram_schmidt(jnp.asarray(u, jnp.float32))[1])
    bad = np.flatnonzero(~(ratios >= _GS_MIN_RESIDUAL))  # NaN (a zero column) too
    if bad.size:
      i = int(bad[0])
      raise AdapterCheckpointError(
        f"{source}: the HRA vectors `hra_u` of {name!r} cannot be orthogonalised (apply_GS=True): column {i} lies in "
        f"the span of the columns before it (Gram-Schmidt keeps {ratios[i]:.3g} of its norm). This is PEFT's "
        f"untrained symmetric init (init_weights=True repeats every column), with which PEFT computes NaN or a "
        f"random reflection; train from independent columns (init_weights=False) instead"
      )


def _identity_at_init(config) -> bool:
  return bool(config.init_weights) and config.r % 2 == 0 and not config.apply_GS


HRA = register(
  Method(
    config_class=HRAConfig,
    init_module=init_module,
    adapt_module=adapt_module,
    supported_kinds=SUPPORTED_KINDS,
    identity_at_init=_identity_at_init,
    tensor_axes=lambda tensor, kind, config: None,  # (in, r): small, replicated
    check_loaded=check_loaded,
  )
)
