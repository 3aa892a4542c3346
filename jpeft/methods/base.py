"""The method protocol and the one table of methods (a leaf: it imports only :mod:`jpeft.config` and
:mod:`jpeft.targets`, which import no method).

A PEFT method is a :class:`Method`: its config class (PEFT's field names and defaults) and a handful of pure
per-module functions. A method file defines both and calls :func:`register` once, which files the config class and
the functions under the config's ``peft_type`` together, so the two can never disagree. :mod:`jpeft.registry`
imports every method file and answers lookups; :mod:`jpeft.core` runs the functions over a whole model.

**Tensors and their roles.** Every tensor a method uses is one of:

* *trained*: in the adapter pytree, saved, differentiated and updated (LoRA's ``lora_A.weight``);
* *frozen*: in the adapter pytree and saved, never differentiated nor updated (:attr:`Method.frozen_tensors`: VeRA's
  ``vera_A``/``vera_B`` with ``save_projection=True``);
* *derived*: never in the adapter and never saved, recomputed from the config and the base's shapes whenever the
  adapted model is built (FourierFT's frequency indices from ``random_loc_seed``; VeRA's projections with
  ``save_projection=False``, from ``projection_prng_key``). They are numpy constants at trace time
  (:attr:`Method.derive_shared`, or computed inside ``adapt_module``).

A shared tensor may also be *tied*: one array used by several modules under a per-module tensor name
(:attr:`Method.tied_tensors`: Lily's ``lily_B``, shared by every layer of a target). It is one leaf of the adapter
(trained once; its gradient is the sum over the modules that use it), each module's ``adapt_module`` sees it among
its own tensors under the per-module name, and it is saved as PEFT saves a tensor shared across layers: one copy
under every user's key (``base_model.model.<module>.<tensor>``), never as ``base_model.<name>``. On load the copies
must be equal; the first one becomes the array.

Strict loading follows from this: the adapter ``init`` builds holds exactly the tensors PEFT saves, so a file must
hold those keys, no more and no fewer.

**Adapted weights.** ``adapt_module`` returns pytrees that stand in for the module's params in the model. A linear
weight has ``matmul(x, dtype)``, an embedding ``embed(ids)``; ``materialize()`` gives the merged plain weight (a
weight without it cannot be merged, and :func:`jpeft.core.merge` says so), and ``delta()`` the additive ``ΔW`` (a
weight without it cannot be unmerged by subtraction).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Collection, Mapping

import jax
import jax.numpy as jnp

from jpeft import config as config_lib
from jpeft import targets as targets_lib

SHARED = "__shared__"  # the adapter key of model-level tensors (saved as ``base_model.<name>``)


@dataclasses.dataclass(frozen=True)
class ModuleSpec:
  """What a method sees of one targeted module."""

  name: str  # Hugging Face module path, e.g. "model.layers.0.self_attn.q_proj"
  kind: str  # "linear" | "embedding" | "norm" (jpeft.models.llama.module_kinds: the model's own, not a guess)
  weight: Any  # the base weight array ((out, in) for linear, (V, H) for embedding) or an adapted weight
  bias: Any = None  # the base bias or None


def _never(config) -> frozenset:
  del config
  return frozenset()


def _always(config) -> bool:
  del config
  return True


@dataclasses.dataclass(frozen=True)
class Method:
  """A PEFT method as pure functions over one module at a time.

  Attributes:
    config_class: the method's :class:`jpeft.config.PeftConfig` subclass (its ``peft_type`` default names the
      method).
    init_module: ``(key, spec, config) -> {tensor name: array}`` -- the module's saved tensors (trained and frozen),
      named as in PEFT's state dict (without the module prefix), at PEFT's initialisation.
    adapt_module: ``(spec, tensors, config, shared, rng) -> {param suffix: entry}`` -- the entries that replace the
      module's params in the model (e.g. ``{"weight": LoraWeight(...)}``). ``shared`` holds the model-level tensors
      (saved and derived); ``rng`` is a key for dropout or None (eval).
    supported_kinds: the module kinds the method can adapt; a target of another kind is refused by name, with
      PEFT's wording (LoRA adapts ``nn.Linear`` and ``nn.Embedding``, not norms).
    init_shared: ``(key, specs, config) -> {name: array}``, the model-level tensors that are saved (``specs``: the
      :class:`ModuleSpec` of every target, by name).
    derive_shared: ``(specs, config) -> {name: array}``, model-level tensors that are never saved, recomputed
      (as numpy constants) each time the adapted model is built.
    prepare_base: ``(spec, tensors, config) -> new base weight or None`` for methods that rewrite the base at init
      (PiSSA/OLoRA residuals); re-run when a checkpoint is loaded, as PEFT does.
    frozen_tensors: ``config -> names`` of saved tensors that are never trained (module or shared tensor names).
    identity_at_init: ``config -> bool``, whether a fresh adapter leaves the model's outputs unchanged (FourierFT's
      default ``init_weights=False`` does not; IA3's default does).
    tensor_axes: ``(tensor name, module kind, config) -> tuple`` with, for each dimension of the tensor, the axis of
      the module's base weight (0 or 1) whose sharding it follows, or None (replicated). None for the whole tensor
      replicates it. :mod:`jpeft.sharding` reads it; it never guesses from names.
    project: ``(adapter, config) -> adapter``, a constraint PEFT enforces on the parameters themselves (OFT's COFT),
      applied after every optimizer update and at init and merge; ``adapt_module`` must enforce the same one on
      whatever it is given, without a gradient through it (PEFT projects in place under ``no_grad`` in every
      forward).
    batch_coupled: whether a row's output depends on the other rows of the batch (Lily's router averages over
      every token of the batch): the trainer then adds no filler rows to a short batch and gives the head every
      position, so that the batch is the one PEFT sees.
    checkpoint_config: ``(config, state, source) -> config``, the config a saved adapter was really made with, read
      from its tensors (``state``: the file's PEFT keys) before the loader builds its template (BOFT: PEFT without
      its CUDA extension saves one butterfly factor under a config that asks for more).
    tied_tensors: ``(specs, config) -> {shared name: {module: tensor name}}``, the shared tensors that are tied
      (see above): which modules use each one and under which name. Modules are listed in model order; the first
      is the tensor's owner.
    check_loaded: ``(adapter, config, specs, source) -> None``, checks of a loaded adapter beyond keys and shapes
      (VeRA: saved projections that must equal those of ``projection_prng_key``); raises
      :class:`jpeft.config.AdapterCheckpointError` naming ``source``.
    regularizer: ``(adapter, config) -> scalar or None``, a term the training loss adds (AdaLoRA's orthogonality
      penalty; PEFT adds it to ``outputs.loss`` whenever a loss is computed).
    optimizer_transform: ``(inner, config) -> optax.GradientTransformation``, wraps the optimizer after gradient
      clipping (``inner``: the AdamW + schedule transformation) so a method can act on the step's (clipped)
      gradients and the updated parameters, with its state in the optimizer state (AdaLoRA's rank allocator).
    config_after_training: ``(config, opt_state) -> config``, the config to save with a trained adapter, read from
      the optimizer state (AdaLoRA: the allocator's mask becomes ``rank_pattern``).
    export_adapter: ``(adapter, config) -> adapter``, the tensors a checkpoint holds when they are not the live
      adapter's (AdaLoRA: sliced to ``rank_pattern``'s kept ranks); a config that says so must make ``init_module``
      build those shapes, so that loading reads them.
  """

  config_class: type
  init_module: Callable[..., dict]
  adapt_module: Callable[..., dict]
  supported_kinds: tuple[str, ...] = ("linear",)
  init_shared: Callable[..., dict] | None = None
  derive_shared: Callable[..., dict] | None = None
  prepare_base: Callable[..., Any] | None = None
  frozen_tensors: Callable[[Any], Collection[str]] = _never
  identity_at_init: Callable[[Any], bool] = _always
  tensor_axes: Callable[[str, str, Any], tuple | None] | None = None
  project: Callable[..., dict] | None = None
  check_loaded: Callable[..., None] | None = None
  tied_tensors: Callable[..., Mapping[str, Mapping[str, str]]] | None = None
  batch_coupled: bool = False
  checkpoint_config: Callable[..., Any] | None = None
  regularizer: Callable[..., Any] | None = None
  optimizer_transform: Callable[..., Any] | None = None
  config_after_training: Callable[..., Any] | None = None
  export_adapter: Callable[..., Any] | None = None

  @property
  def peft_type(self) -> str:
    return self.config_class.__dataclass_fields__["peft_type"].default


_TABLE: dict[str, Method] = {}


def register(method: Method) -> Method:
  """Files ``method`` and its config class under the config's ``peft_type`` (one table for both)."""
  cls = method.config_class
  if not (isinstance(cls, type) and issubclass(cls, config_lib.PeftConfig)):
    raise TypeError(f"a Method's config_class must be a PeftConfig subclass, got {cls!r}")
  if "__dataclass_fields__" not in cls.__dict__:
    raise TypeError(f"{cls.__name__} must itself be decorated with @dataclasses.dataclass")
  peft_type = cls.__dataclass_fields__["peft_type"].default
  if not isinstance(peft_type, str) or not peft_type:
    raise TypeError(f"{cls.__name__} must give `peft_type` a string default (e.g. peft_type: str = 'LORA')")
  existing = _TABLE.get(peft_type)
  if existing is not None and existing.config_class.__qualname__ != cls.__qualname__:
    raise ValueError(
      f"peft_type {peft_type!r} is already registered by {existing.config_class.__module__}."
      f"{existing.config_class.__name__}"
    )
  _TABLE[peft_type] = method
  return method


def table() -> Mapping[str, Method]:
  """The registered methods by ``peft_type`` (read-only view; :mod:`jpeft.registry` fills it on import)."""
  return dict(_TABLE)


# ----------------------------------------------------------------------------------------------------------
# What several methods share


def unsupported_kind_message(name: str, kind: str, peft_type: str, supported: Collection[str]) -> str:
  """PEFT's wording for a target module of a kind the method cannot adapt."""
  return (
    f"Target module {name!r} is a {targets_lib.describe_kind(kind)} layer, which {peft_type} does not support. "
    f"Currently, only the following modules are supported: "
    f"{', '.join(targets_lib.describe_kind(k) for k in supported)}."
  )


def check_kind(spec: ModuleSpec, supported: Collection[str], peft_type: str) -> None:
  """A target of a kind the method cannot adapt is refused with PEFT's wording (the core checks at targeting time;
  this guards a module handed over directly)."""
  if spec.kind not in supported:
    raise targets_lib.UnsupportedTargetError(unsupported_kind_message(spec.name, spec.kind, peft_type, supported))


def kaiming_uniform(key, shape, fan_in: int | None = None):
  """torch's ``nn.init.kaiming_uniform_(w, a=√5)`` law, ``U(±1/√fan_in)`` in float32 (``fan_in``: ``shape[1]`` of a
  2-D weight unless given)."""
  bound = 1.0 / math.sqrt(shape[1] if fan_in is None else fan_in)
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def check_tensor_names(spec: ModuleSpec, tensors: Any, expected: Collection[Collection[str]], peft_type: str) -> None:
  """An adapter entry must hold exactly one of the ``expected`` sets of tensor names (names the module if not)."""
  if isinstance(tensors, dict) and set(tensors) in [set(e) for e in expected]:
    return
  got = sorted(tensors) if isinstance(tensors, dict) else type(tensors).__name__
  raise config_lib.AdapterCheckpointError(
    f"the {peft_type} adapter of {spec.name!r} (a {spec.kind} module) holds {got}; expected "
    f"{' or '.join(str(sorted(e)) for e in expected)}"
  )


def dropout(x, rate: float, rng, field: str = "dropout"):
  """Inverted dropout on ``x`` (identity without ``rng`` or at rate 0): the mask PEFT's ``nn.Dropout`` would draw
  has the same law; tests inject jpeft's masks into PEFT to compare train-mode outputs."""
  if rng is None or rate == 0.0:
    return x
  if not 0.0 < rate < 1.0:  # the config refuses these; a weight built by hand must not divide by 1 - 1 = 0
    raise config_lib.InvalidConfigError(f"`{field}` has to be in [0, 1), got {rate!r}")
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def base_matmul(x, w, dtype):
  """``x Wᵀ`` for a plain (out, in) weight, in ``dtype``."""
  return jnp.einsum("...i,oi->...o", x.astype(dtype), w.astype(dtype))


def add_in_adapter_dtype(y, delta):
  """``y + delta`` summed in the wider of the two dtypes and returned in ``y``'s (PEFT: an fp32 adapter term over a
  bf16 base is added in fp32, then the sum is cast back)."""
  return (y.astype(jnp.promote_types(y.dtype, delta.dtype)) + delta).astype(y.dtype)


def merged_plus(base, delta):
  """``W + ΔW`` computed in fp32 (float64 where both are: ``jpeft.convert``'s exact ΔW) and returned in the base
  dtype."""
  dtype = jnp.promote_types(jnp.float32, jnp.promote_types(base.dtype, delta.dtype))
  return (base.astype(dtype) + delta.astype(dtype)).astype(base.dtype)


def cached(fn):
  """``functools.lru_cache`` for the numpy constants of derived tensors (keyed by config values and shapes)."""
  return functools.lru_cache(maxsize=256)(fn)
