"""OFT: orthogonal fine-tuning with block-diagonal rotations of the input (PEFT's ``OFTModel``, ``peft_type="OFT"``).

Linear:    ``y = (x · BlockDiag(R_1 … R_nb)) Wᵀ + b`` -- the input is rotated (``x`` seen as ``(..., nb, b)``,
           ``x_i ← x_i R_i``), the bias is not; merged: ``W ← W · BlockDiag(R)ᵀ``.
Embedding: ``y = W[ids] · BlockDiag(R)`` (the looked-up rows are rotated); merged: ``W ← W · BlockDiag(R)``.

Each ``R_i`` comes from a skew-symmetric ``Q_i = S_i − S_iᵀ``, where ``S_i`` holds row ``i`` of ``oft_R.weight``
(``oft_embedding_R.weight`` on an embedding), shape ``(nb, b(b−1)/2)`` or ``(1, …)`` with ``block_share``, in the
strictly upper triangle in ``torch.triu_indices(b, b, 1)`` (row-major) order. There is no scaling factor.

* ``use_cayley_neumann=True`` (default), ``T = num_cayley_neumann_terms``: PEFT's truncated series of
  ``(I + Q)(I − Q)⁻¹``, ``R = I + 2Q + 2Q² + … + 2Q^{T−2} + Q^{T−1}`` for ``T ≥ 4``; PEFT's loop gives ``I`` for
  ``T ≤ 1``, ``I + 2Q`` for ``T = 2`` and ``I + 2Q + 2Q² + Q³`` for both ``T = 3`` and ``T = 4``.
* ``use_cayley_neumann=False``: the exact ``R = (I − Q)(I + Q)⁻¹``. **PEFT quirk, reproduced**: that is the
  *transpose* (inverse) of what the series approximates, so the two settings rotate the other way for the same
  parameters, and a checkpoint means something else under the other flag.
* ``coft=True``: PEFT overwrites the parameters in place on every forward (and merge), under ``no_grad``, with
  their projection onto ``‖Q_i‖_F ≤ eps/√n`` (``n = oft_R.weight.shape[0]``: ``nb``, or 1 with ``block_share``):
  ``Q_i ← eps' · Q_i / ‖Q_i‖_F`` where it is larger. jpeft applies the same :func:`project` after every optimizer
  update and before a merge, and the forward computes with ``stop_gradient(proj(x)) + (x − stop_gradient(x))``
  (``proj(x)`` exactly, with the identity as gradient).
* Block size: exactly one of ``r`` (the block count) and ``oft_block_size`` is non-zero; one that does not divide
  ``in_features`` is moved, with a warning, to the nearer divisor (the lower one on a tie; ``in_features`` itself
  when it is larger), as PEFT's ``adjust_oft_parameters``.
* ``module_dropout``: **a no-op, as in PEFT 0.21.2**, whose ``MultiplicativeDropoutLayer`` is built but never
  called by any forward; a non-zero value only logs a warning.

The rotation is computed in ``oft_R``'s dtype, the input cast to it and back (the exact solve in at least fp32).
OFT is multiplicative: there is no ``delta()`` and ``core.unmerge`` refuses (PEFT unmerges with ``inv(BlockDiag)``).
Init: zeros (``R = I``); ``init_weights=False``: N(0, 0.1²). References: Qiu et al. 2023 (OFT, COFT), Qiu et al. 2025
(OFTv2, the Cayley-Neumann form). Mirrors ``peft.tuners.oft.layer.OFTRotationModule`` / ``Linear`` / ``Embedding``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import struct

from jpeft.config import check_bias
from jpeft.config import (
  AdapterCheckpointError,
  InvalidConfigError,
  PeftConfig,
  check_finite_number,
  check_int,
  check_probability,
)
from jpeft.methods.base import check_kind, SHARED, Method, ModuleSpec, base_matmul, cached, check_tensor_names, register

# ---------------------------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True, kw_only=True)
class OFTConfig(PeftConfig):
  """PEFT 0.21.2's ``OFTConfig``: every field, with PEFT's defaults; all of them implemented."""

  peft_type: Optional[str] = "OFT"
  r: int = 0
  oft_block_size: int = 32
  module_dropout: float = 0.0
  fan_in_fan_out: bool = False
  bias: str = "none"
  init_weights: bool = True
  coft: bool = False
  eps: float = 6e-5
  block_share: bool = False
  use_cayley_neumann: bool = True
  num_cayley_neumann_terms: int = 5

  def validate(self) -> None:
    check_int("r", self.r, minimum=0, what=" (the number of OFT blocks; 0: derived from oft_block_size)")
    check_int("oft_block_size", self.oft_block_size, minimum=0, what=" (0: derived from r)")
    if self.r == 0 and self.oft_block_size == 0:
      raise InvalidConfigError(
        f"Either `r` or `oft_block_size` must be non-zero. Currently, r = {self.r} and oft_block_size = "
        f"{self.oft_block_size}."
      )
    if self.r != 0 and self.oft_block_size != 0:
      raise InvalidConfigError(
        f"You can only specify either r ({self.r}) or oft_block_size ({self.oft_block_size}), but not both "
        f"simultaneously, because r x oft_block_size == in_features."
      )
    check_probability("module_dropout", self.module_dropout)
    if self.module_dropout > 0:
      logging.warning(
        "OFT `module_dropout`=%s has no effect: PEFT 0.21.2 builds its multiplicative dropout but never applies "
        "it in the forward, and jpeft computes what PEFT computes.",
        self.module_dropout,
      )
    check_finite_number("eps", self.eps)
    if self.coft and self.eps < 0:
      raise InvalidConfigError(f"`eps` (COFT's bound on each ‖Q_i‖) must be >= 0 with coft=True, got {self.eps!r}")
    check_int("num_cayley_neumann_terms", self.num_cayley_neumann_terms)
    if self.use_cayley_neumann and self.num_cayley_neumann_terms < 1:
      raise InvalidConfigError(
        f"`num_cayley_neumann_terms` should be a positive integer with use_cayley_neumann=True but the value "
        f"passed is {self.num_cayley_neumann_terms} (PEFT would silently use R = I: an adapter that cannot train)"
      )
    check_bias(self.bias, "oft_only")
    if self.fan_in_fan_out:  # PEFT resets it for nn.Linear (and drops it for nn.Embedding)
      logging.warning(
        "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting fan_in_fan_out to False."
      )
      self._set("fan_in_fan_out", False)
    if self.use_cayley_neumann and _older_than(self.peft_version, (0, 18)):
      logging.warning(
        "The cayley-neumann parameterization has been slightly changed to be more numerically stable in PEFT "
        "0.18.0 (this config was saved by PEFT %s). Please retrain your adapter weights with newer PEFT versions.",
        self.peft_version,
      )


def _older_than(version, minimum: tuple[int, ...]) -> bool:
  """Whether a saved ``peft_version`` string is below ``minimum`` (unset or unreadable: not known to be)."""
  m = re.match(r"(\d+)\.(\d+)", str(version)) if version is not None else None
  return m is not None and (int(m[1]), int(m[2])) < minimum


# ---------------------------------------------------------------------------------------------------------------
# Blocks and rotations

SUPPORTED_KINDS = ("linear", "embedding")  # PEFT's OFT: nn.Linear, nn.Embedding (and nn.Conv2d)
_TENSOR = {"linear": "oft_R.weight", "embedding": "oft_embedding_R.weight"}


def _nearest_divisor(n: int, p: int) -> int:
  """PEFT's ``adjust_oft_parameters``: ``n`` if ``p >= n``, else the divisor of ``n`` nearest ``p`` (lower on a tie)."""
  if p >= n:
    return n
  higher = next(d for d in range(p, n + 1) if n % d == 0)
  lower = next(d for d in range(p, 0, -1) if n % d == 0)
  return lower if p - lower <= higher - p else higher


@cached
def block_layout(in_features: int, r: int, oft_block_size: int) -> tuple[int, int]:
  """``(nb, b)``: the number of blocks and the block size PEFT gives a module with ``in_features`` inputs."""
  if r == 0:
    b = oft_block_size
    if in_features % b or b > in_features:
      b = _nearest_divisor(in_features, b)
      logging.warning(f"Invalid `oft_block_size` ({oft_block_size})! Adjusted `oft_block_size` to ({b}).")
    nb = in_features // b
  else:
    nb = r
    if in_features % nb or nb > in_features:
      nb = _nearest_divisor(in_features, nb)
      logging.warning(f"Invalid `r` ({r})! Adjusted `r` to ({nb}).")
    b = in_features // nb
  return nb, b


def _layout(spec: ModuleSpec, config) -> tuple[int, int]:
  in_features = spec.weight.shape[1]  # (out, in) for a linear, (V, H) for an embedding: H is rotated
  nb, b = block_layout(in_features, config.r, config.oft_block_size)
  if b < 2:
    raise InvalidConfigError(
      f"{spec.name}: OFT blocks of size {b} (in_features={in_features}, r={config.r}, oft_block_size="
      f"{config.oft_block_size}) have no rotation parameters (b(b-1)/2 = 0); choose blocks of 2 or more inputs"
    )
  return nb, b


@cached
def _triu(b: int):
  # row-major, the order of torch.triu_indices(b, b, 1); int32 whatever jax_enable_x64 says (a scatter whose numpy
  # int64 indices meet int32 shape arithmetic fails under jax.enable_x64, as in jpeft.convert's float64 pass)
  return tuple(i.astype(np.int32) for i in np.triu_indices(b, 1))


def skew(vec, b: int):
  """``(n, b(b−1)/2) -> (n, b, b)``: ``S − Sᵀ`` with ``S``'s strict upper triangle filled row by row."""
  rows, cols = _triu(b)
  s = jnp.zeros((vec.shape[0], b, b), vec.dtype).at[:, rows, cols].set(vec)
  return s - jnp.swapaxes(s, -1, -2)


def coft_project(vec, b: int, eps: float):
  """COFT: each row's ``Q_i`` scaled onto ``‖Q_i‖_F ≤ eps/√n`` (``n`` rows) where it is larger, as PEFT."""
  bound = np.float32(eps) * (np.float32(1) / np.sqrt(np.float32(vec.shape[0])))
  norm = jnp.sqrt(jnp.sum(jnp.square(skew(vec, b)), axis=(1, 2)))[:, None]
  inside = norm <= bound
  return jnp.where(inside, vec, bound.astype(vec.dtype) * (vec / jnp.where(inside, 1, norm)))


def cayley(q):
  """The exact Cayley transform ``(I − Q)(I + Q)⁻¹`` of a batch ``(..., b, b)`` of skew-symmetric ``Q``, solved in at
  least fp32 and returned in ``q``'s dtype (also BOFT's)."""
  eye = jnp.eye(q.shape[-1], dtype=q.dtype)
  wide = jnp.promote_types(q.dtype, jnp.float32)  # (I − Q)(I + Q)⁻¹ = (I + Q)⁻¹(I − Q): they commute
  return jnp.linalg.solve((eye + q).astype(wide), (eye - q).astype(wide)).astype(q.dtype)


def rotations(vec, b: int, config):
  """The ``(n, b, b)`` rotations of ``oft_R.weight`` rows (after COFT's projection, without gradient through it)."""
  if config.coft:
    # the projected value exactly, with the identity as its gradient (PEFT projects in place under no_grad)
    vec = jax.lax.stop_gradient(coft_project(vec, b, config.eps)) + (vec - jax.lax.stop_gradient(vec))
  q = skew(vec, b)
  if not config.use_cayley_neumann:
    return cayley(q)
  eye = jnp.eye(b, dtype=q.dtype)
  terms, rot = config.num_cayley_neumann_terms, jnp.broadcast_to(eye, q.shape)
  if terms > 1:
    rot = rot + 2 * q
  if terms > 2:  # PEFT's loop: 2Q², 2Q³ … 2Q^{T−2}, then Q^{T−1} once (Q³ already for T = 3)
    power = q @ q
    rot = rot + 2 * power
    for _ in range(3, terms - 1):
      power = power @ q
      rot = rot + 2 * power
    rot = rot + power @ q
  return rot


def rotate_blocks(x, rot):
  """``x_i R_i`` over the ``nb`` blocks of ``x``'s last axis (``rot``: ``(nb, b, b)``, or ``(1, b, b)`` shared), in
  ``rot``'s dtype; the result in ``x``'s dtype."""
  nb, b = x.shape[-1] // rot.shape[-1], rot.shape[-1]
  blocks = x.astype(rot.dtype).reshape(*x.shape[:-1], nb, b)
  out = jnp.einsum("...rk,rkc->...rc", blocks, jnp.broadcast_to(rot, (nb, b, b)))
  return out.reshape(x.shape).astype(x.dtype)


@struct.dataclass
class OftWeight:
  """A Linear weight (``matmul``) or an embedding table (``embed``) behind OFT's block rotations."""

  base: jax.Array  # (out, in) or (V, H)
  rot: jax.Array  # (nb or 1, b, b), in oft_R's dtype
  embedding: bool = struct.field(pytree_node=False, default=False)

  def matmul(self, x, dtype=None):
    return base_matmul(rotate_blocks(x, self.rot), self.base, dtype or x.dtype)

  def embed(self, ids):
    return rotate_blocks(jnp.take(self.base, ids, axis=0), self.rot)

  def materialize(self):
    """Linear: ``W · BlockDiag(R)ᵀ`` (each ``(out, b)`` column block times ``R_iᵀ``); embedding: ``W · BlockDiag(R)``
    (each row rotated as a looked-up row is). Computed in ``oft_R``'s dtype, returned in the base dtype."""
    return rotate_blocks(self.base, self.rot if self.embedding else jnp.swapaxes(self.rot, -1, -2))


# ---------------------------------------------------------------------------------------------------------------
# Method


def _shape(spec: ModuleSpec, config) -> tuple[int, int]:
  nb, b = _layout(spec, config)
  return (1 if config.block_share else nb, b * (b - 1) // 2)


def init_module(key, spec: ModuleSpec, config) -> dict:
  check_kind(spec, SUPPORTED_KINDS, "OFT")
  shape = _shape(spec, config)
  value = jnp.zeros(shape) if config.init_weights else 0.1 * jax.random.normal(key, shape)
  return {_TENSOR[spec.kind]: value}


def adapt_module(spec: ModuleSpec, tensors: dict, config, shared, rng) -> dict:
  del shared, rng  # module_dropout is a no-op in PEFT 0.21.2 (see the module docstring)
  check_kind(spec, SUPPORTED_KINDS, "OFT")
  name = _TENSOR[spec.kind]
  check_tensor_names(spec, tensors, [(name,)], "OFT")
  vec, shape = tensors[name], _shape(spec, config)
  if tuple(vec.shape) != shape:
    raise AdapterCheckpointError(
      f"{spec.name}: `{name}` has shape {tuple(vec.shape)}, but this config gives the module shape {shape} "
      f"(in_features={spec.weight.shape[1]}, r={config.r}, oft_block_size={config.oft_block_size}, "
      f"block_share={config.block_share})"
    )
  rot = rotations(vec, _layout(spec, config)[1], config)
  return {"weight": OftWeight(spec.weight, rot, embedding=spec.kind == "embedding")}


def project(adapter: dict, config) -> dict:
  """COFT's projection of every ``oft_R`` tensor (the identity without ``coft``)."""
  if not config.coft:
    return adapter
  out = {}
  for module, tensors in adapter.items():
    out[module] = dict(tensors)
    for t, vec in tensors.items():
      if module != SHARED and t in _TENSOR.values():
        b = int(round((1 + np.sqrt(1 + 8 * vec.shape[1])) / 2))  # n = b(b−1)/2
        out[module][t] = coft_project(vec, b, config.eps)
  return out


OFT = register(
  Method(
    config_class=OFTConfig,
    init_module=init_module,
    adapt_module=adapt_module,
    supported_kinds=SUPPORTED_KINDS,
    identity_at_init=lambda config: config.init_weights is not False,
    tensor_axes=lambda tensor, kind, config: None,  # the blocks are replicated
    project=project,
  )
)
