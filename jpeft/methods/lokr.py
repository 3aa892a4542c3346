"""LoKr: low-rank Kronecker product (PEFT's ``LoKrModel``, ``peft_type="LOKR"``, LyCORIS).

Linear: ``y = x Wᵀ + b + x ΔWᵀ``,  ``ΔW = s · w1 ⊗ w2`` (Kronecker product),  ``s = alpha / r`` after
``rank_pattern`` / ``alpha_pattern`` -- **even where both factors are full, so r then only scales**. With
``out = a·b`` and ``in = c·d`` (``(a, b) = factorization(out, f)``, ``(c, d) = factorization(in, f)``,
``f = decompose_factor``): ``w1`` (a, c) is ``lokr_w1``, or ``lokr_w1_a (a, r) @ lokr_w1_b (r, c)`` when
``decompose_both and r < max(a, c) / 2``; ``w2`` (b, d) is ``lokr_w2``, or ``lokr_w2_a (b, r) @ lokr_w2_b (r, d)``
when ``r < max(b, d) / 2``. The forward never forms ΔW: with x seen as (..., c, d),
``x ΔWᵀ = s · reshape(w1 · (x w2ᵀ))`` (``(w1 ⊗ w2) vec(X) = vec(w1 X w2ᵀ)``). Merge: ``W += ΔW``.

``factorization(n, f)`` (PEFT's, from LyCORIS): ``(f, n / f)`` when ``f > 0`` divides n (**not reordered**, so
``f > √n`` gives ``m > n/m``); otherwise the divisor pair ``m ≤ n/m`` reached by walking the divisors up from 1
while ``m + n/m`` does not grow and ``m`` stays ``≤ f`` (no bound for ``f = -1``: the pair nearest ``√n``).
``f = 0`` or ``f < -1`` stops at ``(1, n)``: nothing is split (PEFT accepts it silently; jpeft warns).

Training: ``module_dropout`` and ``rank_dropout`` as in :mod:`jpeft.methods.lycoris`; the row mask is divided by its
mean only with ``rank_dropout_scale``.

Init (``init_weights``): True -- ``w1`` (or ``w1_a``) zeros, the rest ``kaiming_uniform(a=√5)``
(``U(±1/√fan_in)``, fan_in = dim 1); ``"lycoris"`` -- ``w2`` (or ``w2_b``) zeros, the rest kaiming; both are the
identity. False -- all kaiming (not the identity). PEFT treats any other truthy value as True; jpeft refuses it.

Reference: Yeh et al. 2024 (LyCORIS). Mirrors ``peft.tuners.lokr.layer.Linear`` and ``factorization``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import jax
import jax.numpy as jnp
from absl import logging
from flax import struct

from jpeft.config import InvalidConfigError, show
from jpeft.methods import lycoris
from jpeft.methods.base import kaiming_uniform, Method, ModuleSpec, cached, register


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoKrConfig(lycoris.LycorisConfig):
  """PEFT 0.21.2's ``LoKrConfig``: every field, with PEFT's defaults; all implemented (checks: ``LycorisConfig``,
  plus ``init_weights`` in (True, False, "lycoris"))."""

  peft_type: Optional[str] = "LOKR"
  decompose_both: bool = False
  decompose_factor: int = -1
  rank_dropout_scale: bool = False
  init_weights: Union[bool, str] = True

  def validate(self) -> None:
    super().validate()
    if not isinstance(self.init_weights, bool) and self.init_weights != "lycoris":
      raise InvalidConfigError(
        f"`init_weights` must be true, false or 'lycoris', got {show(self.init_weights)} (PEFT would silently use "
        f"the default init for any other truthy value)"
      )
    if self.decompose_factor == 0 or self.decompose_factor < -1:
      logging.warning(
        "LoKr decompose_factor=%d is neither -1 nor positive: PEFT's factorization then splits no dimension "
        "(every factor pair is (1, n)), so lokr_w1 is 1x1 and w2 has the whole weight's shape.",
        self.decompose_factor,
      )


@cached
def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
  """PEFT's (LyCORIS') split of ``dimension`` into two factors (see the module docstring)."""
  if factor > 0 and dimension % factor == 0:
    return factor, dimension // factor
  limit = dimension if factor == -1 else factor
  m = 1
  for candidate in range(2, dimension + 1):
    if m >= dimension // m:
      break
    if dimension % candidate:
      continue
    if candidate + dimension // candidate > m + dimension // m or candidate > limit:
      break
    m = candidate
  return min(m, dimension // m), max(m, dimension // m)


def _shapes(spec: ModuleSpec, config) -> dict:
  """The module's tensors and their shapes (which factors are full follows PEFT's ``update_layer``)."""
  out_dim, in_dim = spec.weight.shape
  r, _ = lycoris.rank_and_scaling(config, spec.name)
  a, b = factorization(int(out_dim), config.decompose_factor)
  c, d = factorization(int(in_dim), config.decompose_factor)
  shapes = {}
  if config.decompose_both and r < max(a, c) / 2:
    shapes.update(lokr_w1_a=(a, r), lokr_w1_b=(r, c))
  else:
    shapes["lokr_w1"] = (a, c)
  if r < max(b, d) / 2:
    shapes.update(lokr_w2_a=(b, r), lokr_w2_b=(r, d))
  else:
    shapes["lokr_w2"] = (b, d)
  return shapes


@struct.dataclass
class LoKrWeight(lycoris.LycorisWeight):
  """A Linear weight plus ``x ΔWᵀ`` with ``ΔW = s · w1 ⊗ w2``."""

  def _factor(self, i: int):
    f = self.factors
    full = f"lokr_w{i}"
    return f[full] if full in f else f[f"lokr_w{i}_a"] @ f[f"lokr_w{i}_b"]

  def delta(self):
    return jnp.kron(self._factor(1), self._factor(2)) * self.scaling

  def delta_matmul(self, x):
    w1, w2 = self._factor(1), self._factor(2)
    xs = x.reshape(*x.shape[:-1], w1.shape[1], w2.shape[1])  # (..., c, d)
    y = jnp.einsum("ac,...ck->...ak", w1, xs @ w2.T)  # (..., a, b)
    return y.reshape(*x.shape[:-1], w1.shape[0] * w2.shape[0]) * jnp.asarray(self.scaling, y.dtype)


def init_module(key, spec: ModuleSpec, config) -> dict:
  shapes = _shapes(spec, config)
  zeros = {True: ("lokr_w1", "lokr_w1_a"), "lycoris": ("lokr_w2", "lokr_w2_b"), False: ()}[config.init_weights]
  keys = jax.random.split(key, len(shapes))
  return {
    n: jnp.zeros(s, jnp.float32) if n in zeros else kaiming_uniform(k, s)
    for k, (n, s) in zip(keys, sorted(shapes.items()), strict=True)
  }


def adapt_module(spec: ModuleSpec, tensors: dict, config, shared, rng) -> dict:
  del shared
  return lycoris.adapt(
    LoKrWeight,
    spec,
    tensors,
    config,
    _shapes(spec, config),
    "LoKr",
    rng,
    rescale_rank_dropout=bool(config.rank_dropout_scale),
  )


LOKR = register(
  Method(
    config_class=LoKrConfig,
    init_module=init_module,
    adapt_module=adapt_module,
    identity_at_init=lambda config: config.init_weights is not False,
  )
)
