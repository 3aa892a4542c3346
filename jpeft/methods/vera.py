"""VeRA: vector-based random matrix adaptation (PEFT's ``VeraModel``, ``peft_type="VERA"``).

Linear: ``y = x Wᵀ + b + λ_b ⊙ ((λ_d ⊙ (dropout(x) A_sᵀ)) B_sᵀ)``, ``A_s = vera_A[:, :in]``, ``B_s = vera_B[:out, :]``.
Merge:  ``W += (λ_b ⊙ B_s)(λ_d ⊙ A_s)`` (additive; no scaling factor: λ_b and λ_d are the only scales).

One pair of frozen random projections is shared by every target: ``vera_A (r, max_in)`` and ``vera_B (max_out, r)``,
max over the targeted layers' in/out features, drawn from ``torch.Generator().manual_seed(projection_prng_key)``,
A first, then B, each ``U(±√3·√2/√fan_in)`` with ``fan_in = size(1)`` (PEFT's ``_kaiming_init``), reproduced bit for
bit by :mod:`jpeft.methods.torch_rng`. With ``save_projection=True`` (default) they are saved once, as
``base_model.vera_A`` / ``base_model.vera_B`` (frozen tensors: saved, never trained); with ``False`` they are
derived from the seed whenever the model is built and never saved. Per module, trained: ``vera_lambda_b (out,)``,
``vera_lambda_d (r,)``.

Init: ``λ_d = d_initial``, ``λ_b = 0`` (the identity); ``init_weights=False``: ``λ_b = 1``, ``λ_d ~ N(0, 1)``. Over
a half-precision base PEFT rounds every adapter tensor (the projections included) to the base dtype before upcasting
it to fp32, and so does jpeft.

Decisions (PEFT 0.21.2 quirks): PEFT accepts any ``bias`` ending in ``"_only"`` (so does jpeft); a negative
``vera_dropout`` silently disables PEFT's dropout, jpeft refuses it; a saved projection that is not the one of
``projection_prng_key`` is silently used by PEFT, jpeft refuses it (:func:`check_loaded`): the config would no
longer describe the weights, and a ``save_projection=False`` copy of that config would compute something else.

Reference: Kopiczko et al. 2024 (VeRA). Mirrors ``peft.tuners.vera.layer.Linear`` and ``peft.tuners.vera.model``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import struct

from jpeft import config as config_lib
from jpeft.config import InvalidConfigError, PeftConfig, check_bias, check_int, check_probability
from jpeft.methods import torch_rng
from jpeft.methods.base import SHARED, Method, ModuleSpec, add_in_adapter_dtype, base_matmul, cached
from jpeft.methods.base import check_tensor_names, dropout, merged_plus, register

_TENSORS = (("vera_lambda_b", "vera_lambda_d"),)
_SHARED_NAMES = ("vera_A", "vera_B")
# torch's Generator.manual_seed takes any int64 or uint64
_SEED_RANGE = (-(2**63), 2**64 - 1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class VeraConfig(PeftConfig):
  """PEFT 0.21.2's ``VeraConfig``: every field, with PEFT's defaults (PEFT's class has no ``exclude_modules``).

  Validation follows PEFT's errors, raised there by ``__post_init__``, ``update_layer`` (``r``),
  ``manual_seed`` (``projection_prng_key``) and ``_mark_only_adapters_as_trainable`` (``bias``).
  """

  peft_type: Optional[str] = "VERA"
  r: int = 256
  projection_prng_key: int = 0
  save_projection: bool = True
  vera_dropout: float = 0.0
  d_initial: float = 0.1
  fan_in_fan_out: bool = False
  bias: str = "none"
  init_weights: bool = True

  peft_absent_fields: ClassVar[frozenset[str]] = frozenset({"exclude_modules"})

  def validate(self) -> None:
    check_int("r", self.r, minimum=1, what=" value")
    seed = self.projection_prng_key
    check_int("projection_prng_key", seed)
    if not _SEED_RANGE[0] <= seed <= _SEED_RANGE[1]:
      raise InvalidConfigError(
        f"`projection_prng_key` must fit torch's manual_seed (an int64 or uint64), got {seed} (Overflow when "
        f"unpacking long long)"
      )
    check_probability("vera_dropout", self.vera_dropout)
    config_lib.check_finite_number("d_initial", self.d_initial)
    check_bias(self.bias)
    if self.fan_in_fan_out:  # PEFT resets it for nn.Linear targets (every target jpeft has)
      logging.warning(
        "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting fan_in_fan_out to False."
      )
      self._set("fan_in_fan_out", False)
    if not self.save_projection:
      logging.warning(
        "VeRA save_projection=False: vera_A and vera_B are not saved; they are restored from `projection_prng_key`=%d.",
        seed,
      )


# ---------------------------------------------------------------------------------------------------------------


@struct.dataclass
class VeraWeight:
  """A Linear weight with a VeRA branch, computed in the factored form in the forward."""

  base: jax.Array  # (out, in)
  vera_a: jax.Array  # (r, in): the shared vera_A's first `in` columns
  vera_b: jax.Array  # (out, r): the shared vera_B's first `out` rows
  lambda_b: jax.Array  # (out,)
  lambda_d: jax.Array  # (r,)
  dropout: float = struct.field(pytree_node=False, default=0.0)
  rng: jax.Array | None = None

  def matmul(self, x, dtype=None):
    dtype = dtype or x.dtype
    y = base_matmul(x, self.base, dtype)
    xd = dropout(x, self.dropout, self.rng, "vera_dropout").astype(self.lambda_d.dtype)
    delta = self.lambda_b * ((self.lambda_d * (xd @ self.vera_a.T)) @ self.vera_b.T)
    return add_in_adapter_dtype(y, delta)

  def delta(self):
    return (self.lambda_b[:, None] * self.vera_b) @ (self.lambda_d[:, None] * self.vera_a)

  def materialize(self):
    return merged_plus(self.base, self.delta())


# ---------------------------------------------------------------------------------------------------------------
# The shared projections


def _kaiming_bound(fan_in: int) -> float:
  return math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(fan_in))


@cached
def _projections(r: int, max_in: int, max_out: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """``(vera_A, vera_B)`` in float32, as PEFT's ``_init_vera_A_vera_B`` draws them (bit-exact; read-only arrays)."""
  gen = torch_rng.TorchGenerator(seed)
  a = gen.uniform((r, max_in), -_kaiming_bound(max_in), _kaiming_bound(max_in))
  b = gen.uniform((max_out, r), -_kaiming_bound(r), _kaiming_bound(r))
  for x in (a, b):
    x.flags.writeable = False
  return a, b


def _raw_projections(specs, config) -> tuple[np.ndarray, np.ndarray]:
  """The float32 draws for the targets ``specs``: ``vera_A (r, max_in)``, ``vera_B (max_out, r)``."""
  if not specs:
    raise InvalidConfigError("No layers types compatible with VeRA were found. Please check `target_modules`.")
  max_out = max(int(s.weight.shape[0]) for s in specs.values())
  max_in = max(int(s.weight.shape[1]) for s in specs.values())
  return _projections(config.r, max_in, max_out, config.projection_prng_key)


def projections(specs, config) -> dict[str, np.ndarray]:
  """The shared ``{"vera_A", "vera_B"}`` over the targets ``specs``, as numpy in the adapter's dtype: PEFT casts
  them to the base dtype, then upcasts fp16/bf16 to fp32."""
  base = jnp.dtype(next(iter(specs.values())).weight.dtype) if specs else np.float32
  out = {}
  for name, x in zip(_SHARED_NAMES, _raw_projections(specs, config)):
    rounded = x.astype(base)
    out[name] = rounded.astype(np.float32) if base in (jnp.bfloat16, jnp.float16) else rounded
  return out


def init_shared(key, specs, config) -> dict:
  del key
  if not config.save_projection:
    return {}
  return {n: jnp.asarray(x) for n, x in projections(specs, config).items()}


def derive_shared(specs, config) -> dict:
  return {} if config.save_projection else projections(specs, config)


# a saved projection may be this seed's draw rounded to any of these (PEFT rounds it to a half-precision base dtype)
_ROUNDINGS = (np.float32, jnp.bfloat16, np.float16)


def check_loaded(adapter, config, specs, source: str) -> None:
  """Saved projections must be those of the config's ``projection_prng_key``.

  PEFT loads whatever ``base_model.vera_A``/``vera_B`` a file holds; jpeft refuses projections drawn from another
  seed, because the config (its ``projection_prng_key``) then no longer describes the weights. The draw rounded to
  bf16/fp16 (PEFT rounds it to a half-precision base's dtype) is accepted.

  Raises:
    AdapterCheckpointError: a saved projection is missing or not this seed's; the error names the tensor and seed.
  """
  if not config.save_projection:
    return
  shared = adapter.get(SHARED, {})
  for name, raw in zip(_SHARED_NAMES, _raw_projections(specs, config)):
    if name not in shared:
      raise config_lib.AdapterCheckpointError(f"{source}: the VeRA projection `base_model.{name}` is missing")
    got = np.asarray(shared[name], dtype=np.float32)
    if got.shape == raw.shape and any(np.array_equal(got, raw.astype(dt).astype(np.float32)) for dt in _ROUNDINGS):
      continue
    diff = f"max |saved - expected| = {np.max(np.abs(got - raw)):.3g}" if got.shape == raw.shape else "shape differs"
    raise config_lib.AdapterCheckpointError(
      f"{source}: the saved VeRA projection `base_model.{name}` {tuple(got.shape)} is not the one of "
      f"projection_prng_key={config.projection_prng_key} ({diff}); the checkpoint was made with another seed: set "
      f"`projection_prng_key` in its adapter_config.json to that seed"
    )


# ---------------------------------------------------------------------------------------------------------------
# Per module


def init_module(key, spec: ModuleSpec, config) -> dict:
  out_dim = int(spec.weight.shape[0])
  if config.init_weights:
    lambda_b, lambda_d = jnp.zeros((out_dim,)), jnp.full((config.r,), config.d_initial, jnp.float32)
  else:
    lambda_b, lambda_d = jnp.ones((out_dim,)), jax.random.normal(key, (config.r,))
  base = jnp.dtype(spec.weight.dtype)  # PEFT creates them in fp32 and moves them to the base dtype (then upcasts)
  return {"vera_lambda_b": lambda_b.astype(base), "vera_lambda_d": lambda_d.astype(base)}


def adapt_module(spec: ModuleSpec, tensors: dict, config, shared, rng) -> dict:
  check_tensor_names(spec, tensors, _TENSORS, "VeRA")
  out_dim, in_dim = (int(d) for d in spec.weight.shape)
  adt = tensors["vera_lambda_d"].dtype
  for name in _SHARED_NAMES:
    if name not in shared:
      raise config_lib.AdapterCheckpointError(f"the VeRA adapter of {spec.name!r} has no shared {name!r}")
  a = jnp.asarray(shared["vera_A"], adt)[:, :in_dim]
  b = jnp.asarray(shared["vera_B"], adt)[:out_dim, :]
  if a.shape != (config.r, in_dim) or b.shape != (out_dim, config.r):
    raise config_lib.AdapterCheckpointError(
      f"VeRA's shared vera_A {tuple(shared['vera_A'].shape)} / vera_B {tuple(shared['vera_B'].shape)} do not cover "
      f"{spec.name!r} ({out_dim}x{in_dim}) at r={config.r}"
    )
  return {
    "weight": VeraWeight(
      spec.weight,
      a,
      b,
      tensors["vera_lambda_b"],
      tensors["vera_lambda_d"],
      dropout=float(config.vera_dropout),
      rng=rng,
    )
  }


def _frozen_tensors(config) -> frozenset:
  del config
  return frozenset(_SHARED_NAMES)


def _identity_at_init(config) -> bool:
  return bool(config.init_weights)


def _tensor_axes(tensor: str, kind: str, config):
  """λ_b (out,) follows the base's out axis; λ_d (r,) and the shared projections are replicated."""
  del kind, config
  return {"vera_lambda_b": (0,)}.get(tensor)


VERA = register(
  Method(
    config_class=VeraConfig,
    init_module=init_module,
    adapt_module=adapt_module,
    init_shared=init_shared,
    derive_shared=derive_shared,
    frozen_tensors=_frozen_tensors,
    identity_at_init=_identity_at_init,
    tensor_axes=_tensor_axes,
    check_loaded=check_loaded,
  )
)
