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

import dataclasses
import math
from typing import Any, Callable, ClassVar, Mapping, Optional, Union

import jax
import jax.numpy as jnp
from absl import logging
from flax import struct

from jpeft.config import check_bias
from jpeft.config import (
  ConfigTypeError,
  FrozenDict,
  InvalidConfigError,
  PeftConfig,
  UnsupportedConfigError,
  check_probability,
  resolve_pattern,
)
from jpeft.config import check_finite_number as _check_finite_number
from jpeft.config import check_regex as _check_regex
from jpeft.config import is_not_none as _is_not_none
from jpeft.config import is_truthy as _is_truthy
from jpeft.config import show as _show
from jpeft.config import type_name as _type_name
from jpeft.methods.base import check_kind, kaiming_uniform, Method, ModuleSpec, check_tensor_names, register
from jpeft.methods.base import add_in_adapter_dtype, base_matmul, dropout, merged_plus


# ---------------------------------------------------------------------------------------------------------------
# Config


# init_lora_weights values implemented by jpeft (the strings compared as PEFT compares them).
_SUPPORTED_LORA_INITS = ("gaussian", "pissa", "olora")
# init_lora_weights values PEFT knows but jpeft does not implement.
_UNSUPPORTED_LORA_INITS = ("eva", "corda", "loftq", "orthogonal", "mica", "lora_ga")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig(PeftConfig):
  """PEFT 0.21.2's ``LoraConfig``: every field, with PEFT's defaults.

  Implemented: ``r``, ``lora_alpha``, ``lora_dropout``, ``bias``, ``use_rslora``, ``use_dora``,
  ``init_lora_weights`` in (True, False, "gaussian", "pissa", "olora"), ``rank_pattern``, ``alpha_pattern`` and
  the targeting fields.  Any other feature switched on raises :class:`UnsupportedConfigError`.
  """

  peft_type: Optional[str] = "LORA"
  r: int = 8
  lora_alpha: Union[int, float] = 8
  lora_dropout: float = 0.0
  fan_in_fan_out: bool = False
  bias: str = "none"
  use_rslora: bool = False
  init_lora_weights: Union[bool, str] = True
  rank_pattern: Optional[FrozenDict] = FrozenDict()
  alpha_pattern: Optional[FrozenDict] = FrozenDict()
  megatron_config: Optional[FrozenDict] = None
  megatron_core: Optional[str] = "megatron.core"
  trainable_token_indices: Optional[Union[tuple[int, ...], FrozenDict]] = None
  loftq_config: Optional[FrozenDict] = FrozenDict()  # PEFT treats null as {}
  eva_config: Optional[FrozenDict] = None
  corda_config: Optional[FrozenDict] = None
  lora_ga_config: Optional[FrozenDict] = None
  use_dora: bool = False
  velora_config: Optional[FrozenDict] = None
  alora_invocation_tokens: Optional[tuple[int, ...]] = None
  use_qalora: bool = False
  qalora_group_size: int = 16
  monteclora_config: Optional[FrozenDict] = None
  layer_replication: Optional[tuple[tuple[int, int], ...]] = None
  runtime_config: FrozenDict = FrozenDict(ephemeral_gpu_offload=False)
  lora_bias: bool = False
  target_parameters: Optional[tuple[str, ...]] = None
  use_bdlora: Optional[FrozenDict] = None
  arrow_config: Optional[FrozenDict] = None
  kasa_config: Optional[FrozenDict] = None
  ensure_weight_tying: bool = False

  not_serialized_fields: ClassVar[frozenset[str]] = frozenset({"runtime_config"})
  unsupported_fields: ClassVar[Mapping[str, Callable[[Any], bool]]] = {
    # PEFT turns a variant on whenever the sub-config is present (even an empty dict becomes a default
    # sub-config instance, which is truthy).
    "kasa_config": _is_not_none,
    "use_bdlora": _is_not_none,
    "arrow_config": _is_not_none,
    "velora_config": _is_not_none,
    "monteclora_config": _is_not_none,
    "trainable_token_indices": _is_not_none,
    "alora_invocation_tokens": _is_truthy,
    "megatron_config": _is_truthy,
    "layer_replication": _is_truthy,
    "target_parameters": _is_truthy,
    "use_qalora": _is_truthy,
    "lora_bias": _is_truthy,
    "ensure_weight_tying": _is_truthy,
  }

  def validate(self) -> None:
    r = self.r
    if isinstance(r, bool) or not isinstance(r, int):
      raise ConfigTypeError(f"`r` should be an int, got {_show(r)} ({_type_name(r)})")
    if r <= 0:
      raise InvalidConfigError(f"`r` should be a positive integer value but the value passed is {r}")
    _check_finite_number("lora_alpha", self.lora_alpha)
    self._check_dropout()
    check_bias(self.bias, "lora_only")
    for name in ("rank_pattern", "alpha_pattern"):
      value = getattr(self, name)
      if value is None:
        self._set(name, FrozenDict())
      elif not isinstance(value, FrozenDict):
        raise ConfigTypeError(f"`{name}` must be a dict, got {_show(value)}")
      for key, v in getattr(self, name).items():
        if not isinstance(key, str):
          raise ConfigTypeError(f"`{name}` keys must be strings (module name patterns), got {key!r}")
        _check_regex(name, key, rf"(.*\.)?({key})$")  # get_pattern_key's match
        if name == "rank_pattern":
          if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigTypeError(f"`rank_pattern`[{key!r}] must be an integer rank, got {_show(v)} ({_type_name(v)})")
          if v <= 0:
            raise InvalidConfigError(
              f"`rank_pattern`[{key!r}]: `r` should be a positive integer value but the value passed is {v}"
            )
        else:
          _check_finite_number(f"alpha_pattern[{key!r}]", v)
    if isinstance(self.target_parameters, str):
      raise ConfigTypeError("`target_parameters` must be a list of strings or None.")
    if self.use_dora and self.megatron_config:
      raise InvalidConfigError(
        "DoRA does not support megatron_core (`megatron_config` is set), please set `use_dora=False`."
      )
    if self.lora_bias:
      if self.init_lora_weights not in (True, False):
        raise InvalidConfigError(
          f"The argument lora_bias=True is only supported with init_lora_weights=True or False, got "
          f"init_lora_weights={self.init_lora_weights} instead."
        )
      if self.use_dora:
        raise InvalidConfigError("The argument lora_bias=True is not supported for DoRA, please pass use_dora=False")
    if self.fan_in_fan_out:
      # PEFT does the same for nn.Linear targets (every Llama-like target); only GPT-2 style Conv1D layers
      # use fan_in_fan_out=True, and jpeft has none.
      logging.warning(
        "fan_in_fan_out is set to True but the target modules are Linear layers. Setting fan_in_fan_out to False."
      )
      self._set("fan_in_fan_out", False)
    self._check_init_lora_weights()
    self._check_init_sub_configs()

  def _check_dropout(self) -> None:
    check_probability("lora_dropout", self.lora_dropout)

  def _check_init_lora_weights(self) -> None:
    init = self.init_lora_weights
    if isinstance(init, bool):
      return
    if not isinstance(init, str):
      raise ConfigTypeError(
        f"Unknown initialization init_lora_weights={init!r} (`init_lora_weights` is a bool or a str)"
      )
    lowered = init.lower()
    if lowered in ("gaussian", "olora"):
      self._set("init_lora_weights", lowered)
      return
    if init == "pissa":
      return
    # The same comparisons as PEFT's LoraLayer.update_layer: anything else is an unknown initialization there.
    if init in _UNSUPPORTED_LORA_INITS or lowered == "mica" or init.startswith(("pissa", "corda")):
      raise UnsupportedConfigError(
        f"{self.peft_type} config field `init_lora_weights`={init!r} is not supported by jpeft "
        f"(supported: True, False, {', '.join(repr(s) for s in _SUPPORTED_LORA_INITS)})."
      )
    raise InvalidConfigError(
      f"Unknown initialization init_lora_weights={init!r} (`init_lora_weights` must be true, false or one of "
      f"{', '.join(repr(s) for s in _SUPPORTED_LORA_INITS)})"
    )

  def _check_init_sub_configs(self) -> None:
    # The init sub-configs only matter together with their init_lora_weights value, which is refused above;
    # otherwise PEFT ignores them (and resets loftq_config to {}), and so does jpeft.
    if self.loftq_config is None:
      self._set("loftq_config", FrozenDict())
    if self.loftq_config:
      logging.warning("`loftq_config` specified but will be ignored when `init_lora_weights` is not 'loftq'.")
      self._set("loftq_config", FrozenDict())
    for name, init in (("eva_config", "eva"), ("corda_config", "corda"), ("lora_ga_config", "lora_ga")):
      if getattr(self, name) is not None:
        logging.warning(f"`{name}` specified but will be ignored when `init_lora_weights` is not '{init}'.")


def resolve_rank_alpha(config: PeftConfig, module_name: str) -> tuple[int, Union[int, float]]:
  """``(r, alpha)`` of one adapted module after PEFT's ``rank_pattern`` / ``alpha_pattern`` resolution."""
  base_alpha = getattr(config, "lora_alpha", None)
  if base_alpha is None:
    base_alpha = getattr(config, "alpha", None)
  r = resolve_pattern(getattr(config, "rank_pattern", None), module_name, config.r)  # type: ignore[attr-defined]
  alpha = resolve_pattern(getattr(config, "alpha_pattern", None), module_name, base_alpha)
  if r <= 0:
    raise InvalidConfigError(
      f"{module_name}: `r` should be a positive integer value but the value passed is {r} (after rank_pattern)"
    )
  return r, alpha


def lora_scaling(r: int, alpha: Union[int, float], use_rslora: bool = False) -> float:
  """LoRA's scaling: ``alpha / sqrt(r)`` with rsLoRA, else ``alpha / r``."""
  if r <= 0:
    raise InvalidConfigError(f"`r` should be a positive integer value but the value passed is {r}")
  return alpha / math.sqrt(r) if use_rslora else alpha / r


# ---------------------------------------------------------------------------------------------------------------
# Method

# PEFT's LoRA adapts nn.Linear and nn.Embedding (and convolutions, which a Llama has none of); not norms.
SUPPORTED_KINDS = ("linear", "embedding")
_TENSORS = {
  "linear": (("lora_A.weight", "lora_B.weight"), ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")),
  "embedding": (("lora_embedding_A", "lora_embedding_B"),),
}


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
    y = base_matmul(x, self.base, dtype)
    adt = self.lora_a.dtype
    xa = dropout(x, self.dropout, self.rng, "lora_dropout").astype(adt)
    delta = (xa @ self.lora_a.T) @ self.lora_b.T * jnp.asarray(self.scaling, adt)
    return add_in_adapter_dtype(y, delta)

  def delta(self):
    return (self.scaling * (self.lora_b @ self.lora_a)).astype(self.lora_a.dtype)

  def materialize(self):
    return merged_plus(self.base, self.delta())


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
    y = base_matmul(x, self.base, dtype)
    factor = self._factor()
    if self.rng is None or self.dropout == 0.0:
      xd, yd = x.astype(adt), y.astype(adt)
    else:
      xd = dropout(x, self.dropout, self.rng, "lora_dropout").astype(adt)
      yd = base_matmul(xd, self.base, adt)
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
    return add_in_adapter_dtype(y, delta)

  def delta(self):
    return (self.scaling * (self.lora_b @ self.lora_a).T).astype(self.lora_a.dtype)

  def materialize(self):
    return merged_plus(self.base, self.delta())


# ----------------------------------------------------------------------------------------------------------


def _rank_and_scaling(config, name: str) -> tuple[int, float]:
  r, alpha = resolve_rank_alpha(config, name)
  return r, lora_scaling(r, alpha, config.use_rslora)


def init_module(key, spec: ModuleSpec, config) -> dict:
  check_kind(spec, SUPPORTED_KINDS, "LoRA")
  r, scaling = _rank_and_scaling(config, spec.name)
  init = config.init_lora_weights
  ka, kb = jax.random.split(key)
  if spec.kind == "embedding":
    if config.use_dora:
      raise UnsupportedConfigError(f"use_dora on the embedding {spec.name!r} is not supported yet")
    vocab, hidden = spec.weight.shape
    if init is False:
      a = jax.random.normal(ka, (r, vocab))
    else:
      a = jnp.zeros((r, vocab))
    return {"lora_embedding_A": a, "lora_embedding_B": jax.random.normal(kb, (hidden, r))}

  out_dim, in_dim = spec.weight.shape
  if r > min(out_dim, in_dim) and init in ("pissa", "olora"):
    raise InvalidConfigError(
      f"{spec.name}: `r`={r} (after rank_pattern) exceeds min(out, in)={min(out_dim, in_dim)} of this "
      f"{out_dim}x{in_dim} weight, which init_lora_weights={init!r} needs (it takes r singular/QR directions of W)"
    )
  if init is True:
    a, b = kaiming_uniform(ka, (r, in_dim), in_dim), jnp.zeros((out_dim, r))
  elif init is False:
    a, b = kaiming_uniform(ka, (r, in_dim), in_dim), kaiming_uniform(kb, (out_dim, r), r)
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
    raise UnsupportedConfigError(f"init_lora_weights={init!r} is not supported")
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
  check_kind(spec, SUPPORTED_KINDS, "LoRA")
  check_tensor_names(spec, tensors, _TENSORS[spec.kind], "LoRA")
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


def _identity_at_init(config) -> bool:
  return config.init_lora_weights is not False


def _tensor_axes(tensor: str, kind: str, config):
  """Which base axis each dimension follows: A (r, in) its in-axis, B (out, r) its out-axis; an embedding table
  (V, H) has ``lora_embedding_A`` (r, V) and ``lora_embedding_B`` (H, r)."""
  del config
  if kind == "embedding":
    return {"lora_embedding_A": (None, 0), "lora_embedding_B": (1, None)}.get(tensor)
  return {"lora_A.weight": (None, 1), "lora_B.weight": (0, None), "lora_magnitude_vector": (0,)}.get(tensor)


LORA = register(
  Method(
    config_class=LoraConfig,
    init_module=init_module,
    adapt_module=adapt_module,
    prepare_base=prepare_base,
    supported_kinds=SUPPORTED_KINDS,
    identity_at_init=_identity_at_init,
    tensor_axes=_tensor_axes,
  )
)
