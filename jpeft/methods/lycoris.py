"""What the two LyCORIS methods, LoHa and LoKr, share (PEFT's ``peft.tuners.lycoris_utils``).

Both add a weight delta built from small factors: ``y = x Wᵀ + b + x ΔWᵀ``, ``ΔW = s · f(factors)`` with
``s = alpha / r`` after ``rank_pattern`` / ``alpha_pattern`` (PEFT's ``get_pattern_key``: the first pattern ``p`` in
dict order with ``re.match(rf"(.*\\.)?({p})$", name)``), and merge additively, ``W += ΔW``.

Training (``rng`` given; PEFT draws both from torch's global RNG in ``train()`` mode, never in eval or at merge):

* ``module_dropout`` p: the whole adapter is skipped for the step unless ``u > p``, ``u ~ U[0, 1)`` (PEFT's
  ``torch.rand(1) > p``); no rescaling.
* ``rank_dropout`` p: despite its name, it drops **output rows** of ΔW, ``mask_o = [u_o > p]`` for ``u ~ U[0, 1)^out``
  (PEFT's ``torch.rand(out) > p``), divided by ``mean(mask)`` when rescaling (always in LoHa; LoKr only with
  ``rank_dropout_scale``). ``x (mask ⊙ ΔW)ᵀ = mask ⊙ (x ΔWᵀ)``, so jpeft scales the delta's output channels.
  Where every row is dropped PEFT divides 0 by 0 (NaN outputs); jpeft gives a zero delta instead.

jpeft draws the uniforms with ``jax.random.uniform`` from the module's key (split into a module key and a rank key)
and compares them with p exactly as PEFT compares torch's: feeding PEFT the same uniforms reproduces its masks
(tests/test_loha.py, tests/test_lokr.py).

The conv-only field ``use_effective_conv2d`` is kept with PEFT's default and accepted with any value: PEFT ignores it
for ``nn.Linear`` (jpeft's only target kind; PEFT's LyCORIS layers adapt Linear and convolutions, not embeddings).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import jax
import jax.numpy as jnp
from flax import struct

from jpeft.config import AdapterCheckpointError, FrozenDict, InvalidConfigError, PeftConfig, check_finite_number
from jpeft.config import check_int, check_pattern_dict, check_probability, resolve_pattern
from jpeft.methods.base import ModuleSpec, add_in_adapter_dtype, base_matmul, check_tensor_names, merged_plus


@dataclasses.dataclass(frozen=True, kw_only=True)
class LycorisConfig(PeftConfig):
  """The fields LoHa and LoKr share, with PEFT's defaults, and their checks.

  PEFT itself checks only ``r > 0`` (when it builds each layer, after ``rank_pattern``). jpeft also refuses a
  non-integer ``r`` (PEFT crashes in ``torch.empty``, or, for LoKr factors kept full, silently scales by a fractional
  ``alpha / r``), non-finite alphas, and dropout probabilities outside ``[0, 1)`` (PEFT accepts them: a negative
  ``rank_dropout`` is a no-op there, 1 gives NaN (LoHa) or a zero delta (LoKr), ``module_dropout=1`` never applies the
  adapter in training).
  """

  rank_pattern: Optional[FrozenDict] = FrozenDict()
  alpha_pattern: Optional[FrozenDict] = FrozenDict()
  r: int = 8
  alpha: Union[int, float] = 8
  rank_dropout: float = 0.0
  module_dropout: float = 0.0
  use_effective_conv2d: bool = False

  def validate(self) -> None:
    check_int("r", self.r, minimum=1, what=" value")
    check_finite_number("alpha", self.alpha)
    check_probability("rank_dropout", self.rank_dropout)
    check_probability("module_dropout", self.module_dropout)
    self._set(
      "rank_pattern", check_pattern_dict("rank_pattern", self.rank_pattern, lambda f, v: check_int(f, v, minimum=1))
    )
    self._set("alpha_pattern", check_pattern_dict("alpha_pattern", self.alpha_pattern, check_finite_number))


def rank_and_scaling(config: LycorisConfig, module_name: str) -> tuple[int, float]:
  """``(r, alpha / r)`` of one module after ``rank_pattern`` / ``alpha_pattern``."""
  r = resolve_pattern(config.rank_pattern, module_name, config.r)
  alpha = resolve_pattern(config.alpha_pattern, module_name, config.alpha)
  if r <= 0:  # the config refuses these; a config built around validate() must not divide by them
    raise InvalidConfigError(f"{module_name}: `r` should be a positive integer value but the value passed is {r}")
  return r, alpha / r


def check_tensors(spec: ModuleSpec, tensors, shapes: dict, peft_type: str) -> None:
  """The module's tensors are exactly those the config implies, with the config's shapes (names them if not)."""
  check_tensor_names(spec, tensors, (tuple(shapes),), peft_type)
  for name, shape in shapes.items():
    if tuple(tensors[name].shape) != tuple(shape):
      raise AdapterCheckpointError(
        f"the {peft_type} adapter of {spec.name!r} has {name!r} of shape {tuple(tensors[name].shape)}; its "
        f"{tuple(spec.weight.shape)} weight and the config (r after rank_pattern) give {tuple(shape)}"
      )


def adapt(
  weight_class,
  spec: ModuleSpec,
  tensors,
  config: LycorisConfig,
  shapes: dict,
  peft_type: str,
  rng,
  *,
  rescale_rank_dropout: bool,
) -> dict:
  """The ``adapt_module`` of a LyCORIS method: tensors checked against ``shapes``, then ``weight_class`` (a
  :class:`LycorisWeight`) with the module's scaling and the config's dropouts."""
  check_tensors(spec, tensors, shapes, peft_type)
  _, scaling = rank_and_scaling(config, spec.name)
  weight = weight_class(
    spec.weight,
    dict(tensors),
    scaling=scaling,
    rank_dropout=float(config.rank_dropout),
    module_dropout=float(config.module_dropout),
    rescale_rank_dropout=rescale_rank_dropout,
    rng=rng,
  )
  return {"weight": weight}


def _uniforms(rng, shape):
  return jax.random.uniform(rng, shape, jnp.float32)


def train_keys(rng):
  """``(module key, rank key)``: the keys of the two draws, from the module's dropout key."""
  return tuple(jax.random.split(rng))


@struct.dataclass
class LycorisWeight:
  """A Linear weight plus ``x ΔWᵀ``; a subclass defines ``delta()`` (ΔW, scaling included) and may override
  ``delta_matmul`` (``x ΔWᵀ`` without forming ΔW)."""

  base: jax.Array  # (out, in)
  factors: dict  # the module's tensors, by PEFT's names
  scaling: float = struct.field(pytree_node=False)
  rank_dropout: float = struct.field(pytree_node=False, default=0.0)
  module_dropout: float = struct.field(pytree_node=False, default=0.0)
  rescale_rank_dropout: bool = struct.field(pytree_node=False, default=True)
  rng: jax.Array | None = None

  def delta(self) -> jax.Array:
    raise NotImplementedError

  def delta_matmul(self, x):
    return x @ self.delta().T

  def matmul(self, x, dtype=None):
    dtype = dtype or x.dtype
    y = base_matmul(x, self.base, dtype)
    d = self.delta_matmul(x.astype(self.adapter_dtype))
    if self.rng is not None and (self.rank_dropout or self.module_dropout):
      k_module, k_rank = train_keys(self.rng)
      if self.rank_dropout:
        d = d * self.rank_mask(k_rank).astype(d.dtype)
      if self.module_dropout:
        d = jnp.where(_uniforms(k_module, ()) > self.module_dropout, d, jnp.zeros((), d.dtype))
    return add_in_adapter_dtype(y, d)

  def rank_mask(self, key) -> jax.Array:
    """The (out,) row mask of ``rank_dropout`` (rescaled by its mean when ``rescale_rank_dropout``)."""
    keep = (_uniforms(key, (self.base.shape[0],)) > self.rank_dropout).astype(jnp.float32)
    if not self.rescale_rank_dropout:
      return keep
    mean = keep.mean()
    return jnp.where(mean > 0, keep / jnp.where(mean > 0, mean, 1.0), 0.0)

  @property
  def adapter_dtype(self):
    """The adapter's dtype (that of its factors), in which the delta is computed."""
    return next(iter(self.factors.values())).dtype

  def materialize(self):
    return merged_plus(self.base, self.delta())
