"""LoHa: low-rank Hadamard product (PEFT's ``LoHaModel``, ``peft_type="LOHA"``, FedPara / LyCORIS).

Linear: ``y = x Wᵀ + b + x ΔWᵀ``,  ``ΔW = s · (w1_a w1_b) ⊙ (w2_a w2_b)``,  ``s = alpha / r`` after
``rank_pattern`` / ``alpha_pattern``; w1_a, w2_a: ``hada_w1_a``, ``hada_w2_a`` (out, r); w1_b, w2_b: ``hada_w1_b``,
``hada_w2_b`` (r, in). ΔW has rank up to r², so it is formed (out × in, in the adapter's dtype) and applied as a
matmul, as in PEFT. Merge: ``W += ΔW`` (additive; unmerge subtracts it).

Training: ``module_dropout`` and ``rank_dropout`` as in :mod:`jpeft.methods.lycoris`; LoHa always divides the row
mask by its mean (PEFT's LoHa has no ``rank_dropout_scale``).

Init: w1_a, w1_b, w2_a ``kaiming_uniform(a=√5)`` (``U(±1/√fan_in)``, fan_in = dim 1), **w2_b = 0** (the identity);
``init_weights=False``: w2_b kaiming too (not the identity). PEFT tests ``init_weights`` for truthiness; jpeft takes
a bool only (its annotation).

Reference: Hyeon-Woo et al. 2022 (FedPara); Yeh et al. 2024 (LyCORIS). Mirrors ``peft.tuners.loha.layer.Linear``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct

from jpeft.methods import lycoris
from jpeft.methods.base import kaiming_uniform, Method, ModuleSpec, register

_NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoHaConfig(lycoris.LycorisConfig):
  """PEFT 0.21.2's ``LoHaConfig``: every field, with PEFT's defaults; all implemented (checks: ``LycorisConfig``)."""

  peft_type: Optional[str] = "LOHA"
  init_weights: bool = True


@struct.dataclass
class LoHaWeight(lycoris.LycorisWeight):
  """A Linear weight plus ``x ΔWᵀ`` with ``ΔW = s (w1_a w1_b) ⊙ (w2_a w2_b)``."""

  def delta(self):
    f = self.factors
    return (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"]) * self.scaling


def _shapes(spec: ModuleSpec, config) -> dict:
  out_dim, in_dim = spec.weight.shape
  r, _ = lycoris.rank_and_scaling(config, spec.name)
  return dict(zip(_NAMES, ((out_dim, r), (r, in_dim), (out_dim, r), (r, in_dim)), strict=True))


def init_module(key, spec: ModuleSpec, config) -> dict:
  shapes = _shapes(spec, config)
  keys = dict(zip(_NAMES, jax.random.split(key, len(_NAMES)), strict=True))
  tensors = {n: kaiming_uniform(keys[n], s) for n, s in shapes.items()}
  if config.init_weights:
    tensors["hada_w2_b"] = jnp.zeros(shapes["hada_w2_b"], jnp.float32)
  return tensors


def adapt_module(spec: ModuleSpec, tensors: dict, config, shared, rng) -> dict:
  del shared
  return lycoris.adapt(LoHaWeight, spec, tensors, config, _shapes(spec, config), "LoHa", rng, rescale_rank_dropout=True)


def _tensor_axes(tensor: str, kind: str, config):
  """``*_a`` (out, r) follow the base's out axis, ``*_b`` (r, in) its in axis."""
  del kind, config
  return {"hada_w1_a": (0, None), "hada_w2_a": (0, None), "hada_w1_b": (None, 1), "hada_w2_b": (None, 1)}.get(tensor)


LOHA = register(
  Method(
    config_class=LoHaConfig,
    init_module=init_module,
    adapt_module=adapt_module,
    identity_at_init=lambda config: bool(config.init_weights),
    tensor_axes=_tensor_axes,
  )
)
