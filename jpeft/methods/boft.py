"""BOFT: butterfly orthogonal fine-tuning (PEFT's ``BOFTModel``, ``peft_type="BOFT"``), Linear targets only.

``y = ((x M) Wᵀ) ⊙ s + b`` -- the input is rotated by an orthogonal ``M`` (the bias is not), the output scaled per
row by ``s`` = ``boft_s`` ``(out, 1)`` (the scaling convention: a free per-output factor, no alpha); merged:
``W ← (W Mᵀ) ⊙ s``. ``M = B_{m−1} ⋯ B_1 B_0`` over ``m = boft_n_butterfly_factor`` butterfly factors, each
``B_k = P_k · BlockDiag(Q_{k,0} … Q_{k,nb−1}) · P_kᵀ`` with ``Q = (I − S)(I + S)⁻¹`` (the exact Cayley transform,
:func:`jpeft.methods.oft.cayley`) of ``S = ½(R − Rᵀ)``, ``R`` = ``boft_R[k, i]`` (shape ``(m, nb, b, b)``).
``P_k`` is PEFT's ``block_butterfly_perm`` (``P[i, perm[i]] = 1``): within groups of ``2^k·b`` inputs, the chunks
of ``b/2`` taken evens first, then odds; ``P_0 = I``. The permutations are numpy constants, applied as gathers.

* Block layout: exactly one of ``boft_block_size`` (``b``) and ``boft_block_num`` (``nb``) is non-zero, and it must
  divide ``in_features`` (no adjustment, unlike OFT); with ``m > 1`` PEFT's further conditions (``nb``, ``b`` even,
  ``b·2^(m−1)`` dividing ``in_features``), with PEFT's messages.
* ``boft_n_butterfly_factor > 1`` (**PEFT quirk**): PEFT computes it only with its CUDA extension ``fbd_cuda``
  (ninja + CUDA). Without it -- every CPU run -- PEFT warns, silently uses *one* factor and yet keeps the requested
  value in the saved config: such a checkpoint holds ``boft_R`` of shape ``(1, nb, b, b)`` and PEFT computed with it
  the one-factor transform ``BlockDiag(Q)`` (``P = I``, no butterfly), the same block size. jpeft implements the
  real factor (``boft_R (m, nb, b, b)``); :func:`checkpoint_config` loads such a PEFT checkpoint as what PEFT
  computed, ``boft_n_butterfly_factor=1``, with a warning. An adapter jpeft saves with ``m > 1`` loads in PEFT only
  where ``fbd_cuda`` builds (elsewhere PEFT refuses its shape).
* ``boft_dropout = p`` (training, ``rng`` given): PEFT's multiplicative dropout -- in *one* factor drawn uniformly,
  exactly ``int(p·nb)`` of the ``nb`` rotations, chosen by a random permutation (``perm[i] < int(p·nb)``), are
  replaced by ``I``. jpeft draws the factor and the permutation with JAX (:func:`block_dropout_draw`). The merge
  never drops.

Dtypes as PEFT: the rotations are computed in ``boft_R``'s dtype (the solve in at least fp32), then cast to the
compute dtype, in which the input is rotated; ``s`` multiplies in the wider dtype, the result is cast back. The
merge is computed in the adapter's dtype. BOFT is multiplicative: no ``delta()``; ``core.unmerge`` refuses (PEFT
unmerges with ``Mᵀ`` and ``1/s``). Init: ``R = 0``, ``s = 1`` (identity); ``init_weights=False``: ``R ~ N(0, 0.1²)``,
``s ~ N(1, 0.1²)``. Reference: Liu et al. 2024 (BOFT). Mirrors ``peft.tuners.boft.layer.Linear``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import struct

from jpeft.config import (
  AdapterCheckpointError,
  ConfigTypeError,
  InvalidConfigError,
  PeftConfig,
  check_bias,
  check_int,
  show,
)
from jpeft.config import type_name
from jpeft.methods.base import check_kind, Method, ModuleSpec, base_matmul, cached, check_tensor_names, register
from jpeft.methods.oft import cayley, rotate_blocks

# ---------------------------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True, kw_only=True)
class BOFTConfig(PeftConfig):
  """PEFT 0.21.2's ``BOFTConfig``: every field, with PEFT's defaults; all of them implemented."""

  peft_type: Optional[str] = "BOFT"
  boft_block_size: int = 4
  boft_block_num: int = 0
  boft_n_butterfly_factor: int = 1
  boft_dropout: float = 0.0
  fan_in_fan_out: bool = False
  bias: str = "none"
  init_weights: bool = True

  def validate(self) -> None:
    check_int("boft_block_size", self.boft_block_size, minimum=0, what=" (0: derived from boft_block_num)")
    check_int("boft_block_num", self.boft_block_num, minimum=0, what=" (0: derived from boft_block_size)")
    if self.boft_block_size == 0 and self.boft_block_num == 0:
      raise InvalidConfigError(
        f"Either `boft_block_size` or `boft_block_num` must be non-zero. Currently, boft_block_size = "
        f"{self.boft_block_size} and boft_block_num = {self.boft_block_num}."
      )
    if self.boft_block_size != 0 and self.boft_block_num != 0:
      raise InvalidConfigError(
        f"You can only specify either boft_block_size ({self.boft_block_size}) or boft_block_num "
        f"({self.boft_block_num}), but not both simultaneously, because boft_block_size x boft_block_num == "
        f"in_features."
      )
    m = self.boft_n_butterfly_factor
    check_int("boft_n_butterfly_factor", m)
    if m < 1:  # PEFT raises this at layer creation only where fbd_cuda builds (on a CPU it silently uses 1)
      raise InvalidConfigError(
        f"You can only specify boft_n_butterfly_factor {m} to be a positive integer number "
        f"(`boft_n_butterfly_factor`, the number of butterfly factors)."
      )
    p = self.boft_dropout
    if isinstance(p, bool) or not isinstance(p, (int, float)):
      raise ConfigTypeError(f"`boft_dropout` must be a number in [0, 1], got {show(p)} ({type_name(p)})")
    if not 0.0 <= p <= 1.0:  # PEFT fails inside torch (p > 1) or drops nothing (p < 0), in the first train step
      raise InvalidConfigError(
        f"`boft_dropout` (the share of the blocks replaced by the identity) has to be in [0, 1], got {p!r}"
      )
    check_bias(self.bias, "boft_only")
    if self.fan_in_fan_out:  # PEFT resets it for nn.Linear
      logging.warning(
        "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting fan_in_fan_out to False."
      )
      self._set("fan_in_fan_out", False)


def checkpoint_config(config: BOFTConfig, state, source: str) -> BOFTConfig:
  """The config a saved adapter was made with: a PEFT checkpoint whose config asks for ``m > 1`` butterfly factors
  but whose every ``boft_R`` holds one (PEFT without ``fbd_cuda``) is read as ``boft_n_butterfly_factor=1``."""
  m = config.boft_n_butterfly_factor
  leading = [np.shape(v)[0] for k, v in state.items() if k.endswith(".boft_R") and np.ndim(v) == 4]
  if m == 1 or not leading or any(n != 1 for n in leading):
    return config
  logging.warning(
    "%s: the config asks for boft_n_butterfly_factor=%d, but every boft_R holds one butterfly factor (shape "
    "(1, nb, b, b)): PEFT saved it without its CUDA extension fbd_cuda (e.g. on a CPU), where it silently trains "
    "and computes a single factor -- the block-diagonal rotation BlockDiag(Q) without butterfly permutations -- "
    "while keeping the requested factor in the config. jpeft loads it as what PEFT computed with it: "
    "boft_n_butterfly_factor=1.",
    source,
    m,
  )
  return config.replace(boft_n_butterfly_factor=1)


# ---------------------------------------------------------------------------------------------------------------
# Layout, butterfly permutations, rotations


def layout(name: str, in_features: int, config) -> tuple[int, int]:
  """``(nb, b)`` for a module with ``in_features`` inputs; PEFT's ``update_layer`` errors (with the module name)."""
  bs, nb, m = config.boft_block_size, config.boft_block_num, config.boft_n_butterfly_factor
  power = 2 ** (m - 1)
  error = None
  if bs == 0:
    if in_features % nb:
      error = f"in_features ({in_features}) must be divisible by boft_block_num ({nb})!"
    elif m > 1 and m - 1 > int(np.log2(nb)):
      error = f"Invalid combination of boft_n_butterfly_factor ({m}) and boft_block_num ({nb})!"
    elif m > 1 and nb % power:
      error = f"boft_block_num ({nb}) must be a multiple of 2 raised to the power of boft_n_butterfly_factor ({m})!"
    bs = in_features // nb
  else:
    if in_features % bs:
      error = f"in_features ({in_features}) must be divisible by boft_block_size ({bs})!"
    elif m > 1 and (in_features < bs * power or in_features % (bs * power)):
      error = (
        f"Invalid combination of in_features ({in_features}), boft_n_butterfly_factor ({m}) and boft_block_size ({bs})!"
      )
    nb = in_features // bs
  if error is None and m > 1 and nb % 2:
    error = f"boft_block_num ({nb}) must be an even number!"
  if error is None and m > 1 and bs % 2:
    error = f"boft_block_size ({bs}) must be an even number!"
  if error is not None:
    raise InvalidConfigError(f"{name}: {error}")
  return nb, bs


@cached
def butterfly_perms(in_features: int, b: int, m: int) -> tuple:
  """PEFT's ``block_butterfly_perm`` of each factor ``k < m`` (None for the identity): within groups of ``2^k·b``
  inputs, the chunks of ``b/2`` reordered evens first, then odds. Each entry is ``(perm, inverse)``."""
  out = []
  for k in range(m):
    if m == 1 or k == 0:
      out.append(None)  # one factor: PEFT's arange; k = 0 reorders chunks (0, 1) into (0, 1)
      continue
    group, r = b * 2**k, b // 2
    chunks = np.concatenate([np.arange(0, group // r, 2), np.arange(1, group // r, 2)])
    within = (chunks[:, None] * r + np.arange(r)).reshape(-1)
    perm = np.arange(in_features).reshape(-1, group)[:, within].reshape(-1)
    out.append((perm, np.argsort(perm)))
  return tuple(out)


def rotations(boft_r):
  """``(m, nb, b, b)`` orthogonal blocks: the exact Cayley transform of ``½(R − Rᵀ)``, in ``boft_R``'s dtype."""
  return cayley(0.5 * (boft_r - jnp.swapaxes(boft_r, -1, -2)))


def butterfly(x, rot, perms, transpose: bool = False):
  """``x M`` (``x Mᵀ`` with ``transpose``) over ``x``'s last axis, ``M = B_{m−1} ⋯ B_0``; ``x P_k`` is the gather
  ``x[..., inverse_k]`` and ``y P_kᵀ`` is ``y[..., perm_k]``. In ``rot``'s dtype, returned in ``x``'s."""
  m = rot.shape[0]
  for k in range(m) if transpose else reversed(range(m)):
    q = jnp.swapaxes(rot[k], -1, -2) if transpose else rot[k]
    if perms[k] is None:
      x = rotate_blocks(x, q)
    else:
      perm, inverse = perms[k]
      x = rotate_blocks(x[..., inverse], q)[..., perm]
  return x


def block_dropout_draw(rng, m: int, nb: int):
  """The draws of PEFT's ``MultiplicativeDropoutLayer``, from JAX: the factor (``torch.randint(0, m)``) and the
  permutation of the ``nb`` blocks (``torch.randperm(nb)``)."""
  k_factor, k_perm = jax.random.split(rng)
  return jax.random.randint(k_factor, (), 0, m), jax.random.permutation(k_perm, nb)


def drop_blocks(rot, rng, p: float):
  """``int(p·nb)`` blocks of one factor replaced by ``I`` (those whose drawn permutation entry is below that count)."""
  m, nb, b = rot.shape[0], rot.shape[1], rot.shape[-1]
  factor, perm = block_dropout_draw(rng, m, nb)
  dropped = (perm < int(p * nb))[None, :] & (jnp.arange(m) == factor)[:, None]
  return jnp.where(dropped[..., None, None], jnp.eye(b, dtype=rot.dtype), rot)


@struct.dataclass
class BoftWeight:
  """A Linear weight behind BOFT's butterfly rotation of the input and scaling of the output."""

  base: jax.Array  # (out, in)
  rot: jax.Array  # (m, nb, b, b), in boft_R's dtype
  scale: jax.Array  # (out, 1): boft_s
  block_size: int = struct.field(pytree_node=False, default=0)

  def _perms(self):
    return butterfly_perms(self.base.shape[1], self.block_size, self.rot.shape[0])

  def matmul(self, x, dtype=None):
    dt = dtype or x.dtype
    y = base_matmul(butterfly(x.astype(dt), self.rot.astype(dt), self._perms()), self.base, dt)
    return (y.astype(jnp.promote_types(dt, self.scale.dtype)) * self.scale[:, 0]).astype(dt)

  def materialize(self):
    """``(W Mᵀ) ⊙ s``, computed in the adapter's dtype (at least the base's), returned in the base dtype."""
    wide = jnp.promote_types(self.base.dtype, self.rot.dtype)
    w = butterfly(self.base.astype(wide), self.rot.astype(wide), self._perms(), transpose=True)
    return (w * self.scale.astype(wide)).astype(self.base.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Method


def _shapes(spec: ModuleSpec, config) -> dict:
  nb, b = layout(spec.name, spec.weight.shape[1], config)
  return {"boft_R": (config.boft_n_butterfly_factor, nb, b, b), "boft_s": (spec.weight.shape[0], 1)}


def init_module(key, spec: ModuleSpec, config) -> dict:
  check_kind(spec, ("linear",), "BOFT")
  shapes = _shapes(spec, config)
  if config.init_weights:
    return {"boft_R": jnp.zeros(shapes["boft_R"]), "boft_s": jnp.ones(shapes["boft_s"])}
  k_r, k_s = jax.random.split(key)
  return {
    "boft_R": 0.1 * jax.random.normal(k_r, shapes["boft_R"]),
    "boft_s": 1.0 + 0.1 * jax.random.normal(k_s, shapes["boft_s"]),
  }


def adapt_module(spec: ModuleSpec, tensors: dict, config, shared, rng) -> dict:
  del shared
  check_kind(spec, ("linear",), "BOFT")
  check_tensor_names(spec, tensors, [("boft_R", "boft_s")], "BOFT")
  for name, shape in _shapes(spec, config).items():
    if tuple(tensors[name].shape) != shape:
      hint = ""
      if name == "boft_R" and tensors[name].shape[0] == 1 and shape[0] > 1:
        hint = " (one butterfly factor: a PEFT checkpoint made without fbd_cuda; load it with load_pretrained)"
      raise AdapterCheckpointError(
        f"{spec.name}: `{name}` has shape {tuple(tensors[name].shape)}, but this config gives the module shape "
        f"{shape}{hint}"
      )
  rot = rotations(tensors["boft_R"])
  if rng is not None and config.boft_dropout > 0:
    rot = drop_blocks(rot, rng, config.boft_dropout)
  return {"weight": BoftWeight(spec.weight, rot, tensors["boft_s"], block_size=rot.shape[-1])}


BOFT = register(
  Method(
    config_class=BOFTConfig,
    init_module=init_module,
    adapt_module=adapt_module,
    identity_at_init=lambda config: config.init_weights is not False,
    tensor_axes=lambda tensor, kind, config: (0, None) if tensor == "boft_s" else None,  # R's blocks: replicated
    checkpoint_config=checkpoint_config,
  )
)
