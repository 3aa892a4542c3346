"""LoRA, rsLoRA, DoRA, PiSSA/OLoRA init and embedding LoRA (PEFT's ``LoraModel``, ``peft_type="LORA"``).

Linear:    ``y = x Wᵀ + b + s · (dropout(x) Aᵀ) Bᵀ``,  A: ``lora_A.weight`` (r, in), B: ``lora_B.weight`` (out, r),
           ``s = lora_alpha / r`` (rsLoRA: ``lora_alpha / √r``), after ``rank_pattern``/``alpha_pattern``.
DoRA:      ``y = b + (m / ‖W + sBA‖_row) ⊙ (x (W + sBA)ᵀ)`` with the norm detached (no gradient), m:
           ``lora_magnitude_vector`` (out,); with dropout, PEFT's ``x Wᵀ + (m/n − 1)⊙(x_d Wᵀ) + (m/n)⊙s·x_d AᵀBᵀ``.
Embedding: ``y = W[ids] + s · Aᵀ[ids] Bᵀ``, A: ``lora_embedding_A`` (r, V), B: ``lora_embedding_B`` (H, r).

Init (``init_lora_weights``): True -- A ~ U(±1/√in) (kaiming_uniform(a=√5)), B = 0; "gaussian" -- A ~ N(0, 1/r²);
False -- A and B both at ``nn.Linear``'s default (non-identity); "pissa" / "olora" -- A, B from the SVD / QR of W
and the base replaced by ``W − sBA``. Embedding: A = 0, B ~ N(0, 1) (False: both N(0, 1)).

References: Hu et al. 2021 (LoRA), Kalajdzievski 2023 (rsLoRA), Liu et al. 2024 (DoRA), Meng et al. 2024
(PiSSA), Büyükakyüz 2024 (OLoRA). Mirrors ``peft.tuners.lora.layer.Linear`` / ``Embedding`` and
``peft.tuners.lora.dora.DoraLinearLayer``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

from jpeft import config as config_lib
from jpeft import targets as targets_lib
from jpeft.core import AdapterCheckpointError, Method, ModuleSpec, register_method

# PEFT's LoRA adapts nn.Linear and nn.Embedding (and convolutions, which a Llama has none of); not norms.
SUPPORTED_KINDS = ("linear", "embedding")
_TENSORS = {
  "linear": (("lora_A.weight", "lora_B.weight"), ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")),
  "embedding": (("lora_embedding_A", "lora_embedding_B"),),
}


def _dropout(x, rate: float, rng):
  if rng is None or rate == 0.0:
    return x
  if not 0.0 < rate < 1.0:  # the config refuses these; a weight built by hand must not divide by 1 - 1 = 0
    raise config_lib.InvalidConfigError(f"`lora_dropout` has to be in [0, 1), got {rate!r}")
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def _plain_matmul(x, w, dtype):
  return jnp.einsum("...i,oi->...o", x.astype(dtype), w.astype(dtype))


@struct.dataclass
class LoraWeight:
  """A Linear weight with a LoRA branch; computes the factored form, never ``W + sBA``, in the forward."""

  base: jax.Array  # (out, in)
  lora_a: jax.Array  # (r, in)
  lora_b: jax.Array  # (out, r)
  scaling: float = struct.field(pytree_node=False)
  dropout: float = struct.field(pytree_node=False, default=0.0)
  rng: jax.Array | None = None

  def matmul(self, x, dtype=None):
    dtype = dtype or x.dtype
    y = _plain_matmul(x, self.base, dtype)
    adt = self.lora_a.dtype
    xa = _dropout(x, self.dropout, self.rng).astype(adt)
    delta = (xa @ self.lora_a.T) @ self.lora_b.T * jnp.asarray(self.scaling, adt)
    return (y.astype(jnp.promote_types(y.dtype, adt)) + delta).astype(y.dtype)

  def delta(self):
    return (self.scaling * (self.lora_b @ self.lora_a)).astype(self.lora_a.dtype)

  def materialize(self):
    return (self.base.astype(jnp.float32) + self.delta().astype(jnp.float32)).astype(self.base.dtype)


@struct.dataclass
class DoraWeight:
  """A Linear weight with DoRA's magnitude/direction split (the column norm is detached, as in PEFT)."""

  base: jax.Array
  lora_a: jax.Array
  lora_b: jax.Array
  magnitude: jax.Array  # (out,)
  scaling: float = struct.field(pytree_node=False)
  dropout: float = struct.field(pytree_node=False, default=0.0)
  rng: jax.Array | None = None

  def _factor(self):
    adt = self.lora_a.dtype
    combined = self.base.astype(adt) + self.scaling * (self.lora_b @ self.lora_a)
    norm = jax.lax.stop_gradient(jnp.linalg.norm(combined, axis=1))
    return self.magnitude / norm

  def matmul(self, x, dtype=None):
    dtype = dtype or x.dtype
    adt = self.lora_a.dtype
    y = _plain_matmul(x, self.base, dtype)
    factor = self._factor()
    if self.rng is None or self.dropout == 0.0:
      xd, yd = x.astype(adt), y.astype(adt)
    else:
      xd = _dropout(x, self.dropout, self.rng).astype(adt)
      yd = _plain_matmul(xd, self.base, adt)
    lora = (xd @ self.lora_a.T) @ self.lora_b.T * jnp.asarray(self.scaling, adt)
    out = y.astype(jnp.promote_types(y.dtype, adt)) + (factor - 1) * yd + factor * lora
    return out.astype(y.dtype)

  def materialize(self):
    adt = self.lora_a.dtype
    combined = self.base.astype(adt) + self.scaling * (self.lora_b @ self.lora_a)
    return (self._factor()[:, None] * combined).astype(self.base.dtype)


@struct.dataclass
class LoraEmbedding:
  """An embedding table with a LoRA branch: ``W[ids] + s · Aᵀ[ids] Bᵀ``."""

  base: jax.Array  # (V, H)
  lora_a: jax.Array  # (r, V)
  lora_b: jax.Array  # (H, r)
  scaling: float = struct.field(pytree_node=False)

  def embed(self, ids):
    y = jnp.take(self.base, ids, axis=0)
    after_a = jnp.take(self.lora_a.T, ids, axis=0)
    delta = (after_a @ self.lora_b.T) * jnp.asarray(self.scaling, self.lora_a.dtype)
    return (y.astype(jnp.promote_types(y.dtype, delta.dtype)) + delta).astype(y.dtype)

  def delta(self):
    return (self.scaling * (self.lora_b @ self.lora_a).T).astype(self.lora_a.dtype)

  def materialize(self):
    return (self.base.astype(jnp.float32) + self.delta().astype(jnp.float32)).astype(self.base.dtype)


# ----------------------------------------------------------------------------------------------------------


def _rank_and_scaling(config, name: str) -> tuple[int, float]:
  r, alpha = config_lib.resolve_rank_alpha(config, name)
  return r, config_lib.lora_scaling(r, alpha, config.use_rslora)


def _uniform(key, shape, fan_in):
  bound = 1.0 / math.sqrt(fan_in)
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def _check_kind(spec: ModuleSpec) -> None:
  if spec.kind not in SUPPORTED_KINDS:
    raise targets_lib.UnsupportedTargetError(
      f"Target module {spec.name!r} is a {targets_lib.describe_kind(spec.kind)} layer, which LoRA does not support. "
      f"Currently, only the following modules are supported: "
      f"{', '.join(targets_lib.describe_kind(k) for k in SUPPORTED_KINDS)}."
    )


def init_module(key, spec: ModuleSpec, config) -> dict:
  _check_kind(spec)
  r, scaling = _rank_and_scaling(config, spec.name)
  init = config.init_lora_weights
  ka, kb = jax.random.split(key)
  if spec.kind == "embedding":
    if config.use_dora:
      raise config_lib.UnsupportedConfigError(f"use_dora on the embedding {spec.name!r} is not supported yet")
    vocab, hidden = spec.weight.shape
    if init is False:
      a = jax.random.normal(ka, (r, vocab))
    else:
      a = jnp.zeros((r, vocab))
    return {"lora_embedding_A": a, "lora_embedding_B": jax.random.normal(kb, (hidden, r))}

  out_dim, in_dim = spec.weight.shape
  if r > min(out_dim, in_dim) and init in ("pissa", "olora"):
    raise config_lib.InvalidConfigError(
      f"{spec.name}: `r`={r} (after rank_pattern) exceeds min(out, in)={min(out_dim, in_dim)} of this "
      f"{out_dim}x{in_dim} weight, which init_lora_weights={init!r} needs (it takes r singular/QR directions of W)"
    )
  if init is True:
    a, b = _uniform(ka, (r, in_dim), in_dim), jnp.zeros((out_dim, r))
  elif init is False:
    a, b = _uniform(ka, (r, in_dim), in_dim), _uniform(kb, (out_dim, r), r)
  elif init == "gaussian":
    a, b = jax.random.normal(ka, (r, in_dim)) / r, jnp.zeros((out_dim, r))
  elif init == "pissa":
    w = spec.weight.astype(jnp.float32)
    u, s, vh = jnp.linalg.svd(w, full_matrices=False)
    sr = s[:r] / scaling
    a = jnp.sqrt(sr)[:, None] * vh[:r]
    b = u[:, :r] * jnp.sqrt(sr)[None, :]
  elif init == "olora":
    q, rr = jnp.linalg.qr(spec.weight.astype(jnp.float32))
    a, b = rr[:r], q[:, :r]
  else:
    raise config_lib.UnsupportedConfigError(f"init_lora_weights={init!r} is not supported")
  tensors = {"lora_A.weight": a, "lora_B.weight": b}
  if config.use_dora:
    combined = spec.weight.astype(jnp.float32) + scaling * (b @ a)
    tensors["lora_magnitude_vector"] = jnp.linalg.norm(combined, axis=1)
  return tensors


def prepare_base(spec: ModuleSpec, tensors: dict, config):
  """PiSSA/OLoRA: the base becomes the residual ``W − sBA`` (recomputed at load, as PEFT does)."""
  if config.init_lora_weights not in ("pissa", "olora") or spec.kind != "linear":
    return None
  _, scaling = _rank_and_scaling(config, spec.name)
  delta = scaling * (tensors["lora_B.weight"].astype(jnp.float32) @ tensors["lora_A.weight"].astype(jnp.float32))
  return spec.weight.astype(jnp.float32) - delta


def adapt_module(spec: ModuleSpec, tensors: dict, config, shared, rng) -> dict:
  del shared
  _check_kind(spec)
  if not isinstance(tensors, dict) or tuple(sorted(tensors)) not in {tuple(sorted(t)) for t in _TENSORS[spec.kind]}:
    got = sorted(tensors) if isinstance(tensors, dict) else type(tensors).__name__
    raise AdapterCheckpointError(
      f"the LoRA adapter of {spec.name!r} (a {spec.kind} module) holds {got}; expected "
      f"{' or '.join(str(list(t)) for t in _TENSORS[spec.kind])}"
    )
  _, scaling = _rank_and_scaling(config, spec.name)
  if spec.kind == "embedding":
    return {"weight": LoraEmbedding(spec.weight, tensors["lora_embedding_A"], tensors["lora_embedding_B"], scaling)}
  common = dict(scaling=scaling, dropout=float(config.lora_dropout), rng=rng)
  if "lora_magnitude_vector" in tensors:
    return {
      "weight": DoraWeight(
        spec.weight, tensors["lora_A.weight"], tensors["lora_B.weight"], tensors["lora_magnitude_vector"], **common
      )
    }
  return {"weight": LoraWeight(spec.weight, tensors["lora_A.weight"], tensors["lora_B.weight"], **common)}


LORA = register_method(
  Method(
    peft_type="LORA",
    init_module=init_module,
    adapt_module=adapt_module,
    prepare_base=prepare_base,
    supported_kinds=SUPPORTED_KINDS,
  )
)
