"""MiSS: matrix shard sharing (PEFT's ``MissModel``, ``peft_type="MISS"``; Bone's successor), three variants.

One trained tensor per module, ``miss_block`` ``M``; there is no scaling factor (``M`` enters as it is). W is (out, in).

* ``init_weights=True`` (default) / ``False``, ``M`` (r, out): every input is folded onto r dims,
  ``fold(x)_j = Σ_k x_{k·r+j}`` (x zero-padded to a multiple of r), ``y = x Wᵀ + b + fold(dropout(x)) M``,
  i.e. ``ΔW[o, i] = M[i mod r, o]``; merge ``W += ΔW``.
* ``"mini"``, ``M`` (r, mini_r): as the default with ``M_full = M`` tiled ``out / mini_r`` times along its columns
  (``M_full[:, o] = M[:, o mod mini_r]``, torch's ``repeat``); ``mini_r`` must divide ``out``.
* ``"bat"`` (block affine), ``M`` (out/r, r, r); r must divide ``in`` and ``out``. Each r×r block of W, row block
  ``bo``, becomes ``W'_blk = W_blk + W_blk M[bo] + M[bo]`` and the forward is ``y = x W'ᵀ + b``: the update depends
  on W itself, so bat is **not additive** -- it has no ``delta()`` and :func:`jpeft.core.unmerge` refuses it (PEFT
  unmerges with ``(W' − M)(I + M)⁻¹``, which needs an invertible ``I + M``; keep the base params instead). ``W'``
  is built in the wider of the base's and ``M``'s dtypes and the matmul runs in it (PEFT: a bf16 base is upcast to
  ``M``'s fp32); merging rounds ``W'`` to the base dtype.

Dropout (``miss_dropout``) is applied to the padded input before the fold, as PEFT's ``nn.Dropout``; **PEFT's bat
forward applies none**, so neither does jpeft's (a warning says so). Init: zeros (the identity) for True, "mini" and
"bat"; ``False``: ``M`` (r, out) ~ ``U(±1/√out)`` (``kaiming_uniform_(a=√5)``, fan_in = out), the default forward.

PEFT 0.21.2 checks that r is positive and at most ``in`` (``update_layer``) when it builds a module, and accepts
silently what jpeft refuses at config time: an ``init_weights`` string other than "bat"/"mini" (PEFT: the default
variant), a negative ``miss_dropout`` (PEFT: no dropout) and, in mini mode, ``mini_r < 1`` (PEFT: a
ZeroDivisionError or a torch error). Like PEFT, any ``bias`` ending in ``"_only"`` is accepted.

Reference: Kang & Yin 2024, "MiSS: Balancing LoRA Performance and Efficiency with Simple Shard Sharing"
(arXiv 2409.15371). Mirrors ``peft.tuners.miss.layer.MissLinear``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import jax
import jax.numpy as jnp
from absl import logging
from flax import struct

from jpeft.config import (
  AdapterCheckpointError,
  InvalidConfigError,
  PeftConfig,
  check_bias,
  check_int,
  check_probability,
  show,
)
from jpeft.methods.base import (
  kaiming_uniform,
  Method,
  ModuleSpec,
  add_in_adapter_dtype,
  base_matmul,
  check_tensor_names,
  dropout,
)
from jpeft.methods.base import merged_plus, register, unsupported_kind_message
from jpeft.targets import UnsupportedTargetError

_TENSOR = "miss_block"
_MODES = ("bat", "mini")  # the strings PEFT's update_layer compares init_weights with


@dataclasses.dataclass(frozen=True, kw_only=True)
class MissConfig(PeftConfig):
  """PEFT 0.21.2's ``MissConfig``: every field, with PEFT's defaults; all of them implemented."""

  peft_type: Optional[str] = "MISS"
  r: int = 64
  miss_dropout: float = 0.0
  mini_r: int = 1
  init_weights: Union[bool, str] = True
  bias: str = "none"

  def validate(self) -> None:
    check_int("r", self.r, minimum=1, what=" value")
    check_int("mini_r", self.mini_r)
    check_probability("miss_dropout", self.miss_dropout)
    init = self.init_weights
    if isinstance(init, str) and init not in _MODES:
      raise InvalidConfigError(
        f"`init_weights` must be true, false, 'bat' or 'mini', got {show(init)} (PEFT would silently run the default "
        f"variant)"
      )
    if init == "mini" and self.mini_r < 1:
      raise InvalidConfigError(
        f"`mini_r` should be a positive integer (it must divide out_features) with init_weights='mini' but the value "
        f"passed is {self.mini_r}"
      )
    check_bias(self.bias)
    if init == "bat" and self.miss_dropout > 0:
      logging.warning(
        "MiSS `miss_dropout`=%s has no effect with init_weights='bat': PEFT's bat forward applies no dropout, and "
        "jpeft computes what PEFT computes.",
        self.miss_dropout,
      )


# ---------------------------------------------------------------------------------------------------------------
# Adapted weights


def _fold(x, r: int):
  """``Σ_k x[..., k·r:(k+1)·r]`` of ``x`` zero-padded to a multiple of r: (..., in_padded) -> (..., r)."""
  return x.reshape(*x.shape[:-1], x.shape[-1] // r, r).sum(axis=-2)


@struct.dataclass
class MissWeight:
  """A Linear weight with MiSS's shared shard (default and mini variants): ``x Wᵀ + fold(dropout(x)) M_full``."""

  base: jax.Array  # (out, in)
  block: jax.Array  # (r, out), or (r, mini_r) in mini mode
  dropout: float = struct.field(pytree_node=False, default=0.0)
  rng: jax.Array | None = None

  def _full(self):
    """``M_full`` (r, out): the mini block tiled along the outputs (the block itself when it is (r, out))."""
    return jnp.tile(self.block, (1, self.base.shape[0] // self.block.shape[1]))

  def matmul(self, x, dtype=None):
    dtype = dtype or x.dtype
    y = base_matmul(x, self.base, dtype)
    r = self.block.shape[0]
    xp = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, -x.shape[-1] % r)]).astype(self.block.dtype)
    xd = dropout(xp, self.dropout, self.rng, "miss_dropout")  # PEFT drops the padded input
    return add_in_adapter_dtype(y, _fold(xd, r) @ self._full())

  def delta(self):
    """``ΔW[o, i] = M_full[i mod r, o]``, in ``M``'s dtype."""
    r, in_features = self.block.shape[0], self.base.shape[1]
    return jnp.tile(self._full().T, (1, -(-in_features // r)))[:, :in_features]

  def materialize(self):
    return merged_plus(self.base, self.delta())


@struct.dataclass
class MissBatWeight:
  """A Linear weight under MiSS's block-affine map (bat): ``W'_blk = W_blk + W_blk M[bo] + M[bo]``; not additive."""

  base: jax.Array  # (out, in)
  block: jax.Array  # (out / r, r, r)

  def _bat_update(self):
    """``W' − W`` in the wider of the base's and ``M``'s dtypes (PEFT's ``get_delta_weight``)."""
    out_features, in_features = self.base.shape
    r = self.block.shape[-1]
    wide = jnp.promote_types(self.base.dtype, self.block.dtype)
    m = self.block.astype(wide)
    w = self.base.astype(wide).reshape(out_features // r, r, in_features // r, r)  # [bo, a, bi, b]
    update = jnp.einsum("xaib,xbc->xaic", w, m) + m[:, :, None, :]
    return update.reshape(out_features, in_features)

  def matmul(self, x, dtype=None):
    dtype = dtype or x.dtype
    update = self._bat_update()
    weight = self.base.astype(update.dtype) + update
    return base_matmul(x, weight, jnp.promote_types(weight.dtype, dtype)).astype(dtype)

  def materialize(self):
    return merged_plus(self.base, self._bat_update())


# ---------------------------------------------------------------------------------------------------------------
# Method

SUPPORTED_KINDS = ("linear",)  # PEFT's MiSS wraps nn.Linear only


def block_shape(spec: ModuleSpec, config) -> tuple[int, ...]:
  """``miss_block``'s shape for this module, after PEFT's checks of r against the weight's shape."""
  if spec.kind not in SUPPORTED_KINDS:
    raise UnsupportedTargetError(unsupported_kind_message(spec.name, spec.kind, "MISS", SUPPORTED_KINDS))
  out_features, in_features = spec.weight.shape
  r, init = config.r, config.init_weights
  if r > in_features:
    raise InvalidConfigError(
      f"{spec.name}: `r` ({r}) must be less than or equal to in_features ({in_features}) (a {out_features}x"
      f"{in_features} weight)"
    )
  if init == "bat":
    if in_features % r or out_features % r:
      raise InvalidConfigError(
        f"{spec.name}: The weight matrix must be fully divisible into [r, r] blocks (init_weights='bat', r={r}, a "
        f"{out_features}x{in_features} weight)."
      )
    return (out_features // r, r, r)
  if init == "mini":
    if out_features % config.mini_r:
      raise InvalidConfigError(
        f"{spec.name}: mini_r is divided along the out_features dimension: out_features ({out_features}) must be "
        f"divisible by mini_r ({config.mini_r}) with init_weights='mini'."
      )
    return (r, config.mini_r)
  return (r, out_features)


def init_module(key, spec: ModuleSpec, config) -> dict:
  shape = block_shape(spec, config)
  if config.init_weights is False:
    return {_TENSOR: kaiming_uniform(key, shape)}  # kaiming_uniform_(a=√5) of an (r, out) tensor: fan_in = out
  return {_TENSOR: jnp.zeros(shape, jnp.float32)}


def adapt_module(spec: ModuleSpec, tensors: dict, config, shared, rng) -> dict:
  del shared
  shape = block_shape(spec, config)
  check_tensor_names(spec, tensors, ((_TENSOR,),), "MiSS")
  block = tensors[_TENSOR]
  if tuple(block.shape) != shape or not jnp.issubdtype(block.dtype, jnp.floating):
    raise AdapterCheckpointError(
      f"the MiSS adapter of {spec.name!r} has {_TENSOR} {block.dtype}{list(block.shape)}; this config "
      f"(init_weights={show(config.init_weights)}, r={config.r}, mini_r={config.mini_r}) gives a {spec.weight.shape[0]}"
      f"x{spec.weight.shape[1]} weight a float {list(shape)}"
    )
  if config.init_weights == "bat":
    return {"weight": MissBatWeight(spec.weight, block)}
  return {"weight": MissWeight(spec.weight, block, dropout=float(config.miss_dropout), rng=rng)}


def _tensor_axes(tensor: str, kind: str, config):
  """The default block (r, out) follows the base's out axis; the mini and bat blocks are replicated."""
  del kind
  return (None, 0) if tensor == _TENSOR and config.init_weights not in _MODES else None


MISS = register(
  Method(
    config_class=MissConfig,
    init_module=init_module,
    adapt_module=adapt_module,
    supported_kinds=SUPPORTED_KINDS,
    identity_at_init=lambda config: config.init_weights is not False,
    tensor_axes=_tensor_axes,
  )
)
