"""The PEFT core: one place for what every method shares.

A *method* is a :class:`Method` -- a handful of pure per-module functions (init a module's tensors, wrap a
module's base weight) registered under PEFT's ``peft_type``. Everything around them lives here, once:

* targeting (PEFT's rules, :mod:`jpeft.targets`) and the ``modules_to_save`` full copies,
* the adapter pytree and its mapping to PEFT's state-dict keys,
* ``init`` / ``apply`` / ``merge`` over the whole model,
* adapter dtype (PEFT's ``autocast_adapter_dtype``) and the trainable split.

The adapter pytree mirrors PEFT's saved state dict one-to-one::

    adapter = {
        "model.layers.0.self_attn.q_proj": {"lora_A.weight": (r, in), "lora_B.weight": (out, r)},
        ...
        "lm_head": {"weight": (V, H)},          # a modules_to_save copy
        SHARED: {"vera_A": ...},                # model-level tensors (VeRA, VB-LoRA), when a method has them
    }

and the PEFT key of a tensor is ``base_model.model.<module>.<tensor>`` (``base_model.<tensor>`` for
:data:`SHARED`). No method writes its own key mapping.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jpeft import config as config_lib
from jpeft import targets as targets_lib
from jpeft.models.llama import LlamaConfig, base_array, module_kinds

Array = jax.Array
Adapter = dict  # {module name: {tensor name: array}}
SHARED = "__shared__"
PEFT_PREFIX = "base_model.model."
SHARED_PREFIX = "base_model."


class AdapterCheckpointError(config_lib.JpeftError):
  """An adapter (a checkpoint file or an adapter pytree) that does not fit its config or the model."""


@dataclasses.dataclass(frozen=True)
class ModuleSpec:
  """What a method sees of one targeted module."""

  name: str  # Hugging Face module path, e.g. "model.layers.0.self_attn.q_proj"
  kind: str  # "linear" | "embedding" | "norm"
  weight: Any  # the base weight array ((out, in) for linear, (V, H) for embedding)
  bias: Any = None  # the base bias or None


@dataclasses.dataclass(frozen=True)
class Method:
  """A PEFT method as pure functions over one module at a time.

  Attributes:
    peft_type: PEFT's ``peft_type`` string.
    init_module: ``(key, spec, config) -> {tensor name: array}`` -- the module's adapter tensors, named as
      in PEFT's state dict (without the module prefix), at PEFT's initialisation.
    adapt_module: ``(spec, tensors, config, shared, rng) -> {param suffix: entry}`` -- the entries that
      replace the module's params in the model (e.g. ``{"weight": LoraWeight(...)}``). ``rng`` is a key for
      dropout or None (eval).
    init_shared: optional ``(key, params, config, targets) -> {name: array}`` for model-level tensors.
    prepare_base: optional ``(spec, tensors, config) -> new base weight`` for methods that rewrite the base
      at init (PiSSA/OLoRA residuals); re-run when a checkpoint is loaded, as PEFT does.
    frozen_tensors: names of adapter tensors that are saved but never trained.
    supported_kinds: the module kinds (``jpeft.models.llama.module_kinds``) the method can adapt; a target of
      another kind is refused by name (PEFT: LoRA adapts ``nn.Linear`` and ``nn.Embedding``, not norms).
  """

  peft_type: str
  init_module: Callable[..., dict]
  adapt_module: Callable[..., dict]
  init_shared: Callable[..., dict] | None = None
  prepare_base: Callable[..., Any] | None = None
  frozen_tensors: tuple[str, ...] = ()
  supported_kinds: tuple[str, ...] = ("linear",)


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
  _METHODS[method.peft_type] = method
  return method


def get_method(peft_type: str) -> Method:
  if peft_type not in _METHODS:
    import jpeft.methods  # noqa: F401  (methods register on import)
  if peft_type not in _METHODS:
    config_lib.get_config_class(peft_type)  # raises the error that lists what is supported
    raise config_lib.UnsupportedConfigError(f"peft_type {peft_type!r} has a config but no implementation")
  return _METHODS[peft_type]


# ----------------------------------------------------------------------------------------------------------
# Targeting


def resolve(config, model_config: LlamaConfig) -> targets_lib.TargetResolution:
  """PEFT's matching rules on this model; logs what matched.

  Needs only the model's config (module names and kinds), never its weights, so it can run before loading.

  Raises:
    targets.NoMatchingTargetsError: nothing matched.
    targets.UnsupportedTargetError: a matched module is of a kind the method cannot adapt (a norm for LoRA).
  """
  method = get_method(config.peft_type)
  return targets_lib.resolve_targets(
    config, module_kinds(model_config), model_config.model_type, supported_kinds=method.supported_kinds
  )


def _module_spec(params, name: str, kind: str, model_config: LlamaConfig) -> ModuleSpec:
  if name == "lm_head" and "lm_head.weight" not in params:  # tied head
    return ModuleSpec(name, kind, base_array(params["model.embed_tokens.weight"]))
  if name + ".weight" not in params:
    raise targets_lib.TargetError(f"target module {name!r} has no weight {name + '.weight'!r} in the model params")
  return ModuleSpec(name, kind, base_array(params[name + ".weight"]), params.get(name + ".bias"))


def _adapter_dtype(spec: ModuleSpec, config):
  """PEFT's ``autocast_adapter_dtype``: adapters created in the base dtype, then fp16/bf16 upcast to fp32."""
  dtype = jnp.dtype(spec.weight.dtype)
  if getattr(config, "autocast_adapter_dtype", True) and dtype in (jnp.bfloat16, jnp.float16):
    return jnp.float32
  return dtype


# ----------------------------------------------------------------------------------------------------------
# init / apply / merge


def init(key: Array, params, config, model_config: LlamaConfig):
  """A fresh adapter at PEFT's initialisation.

  Returns ``(adapter, params)``; ``params`` is the input unless the method rewrites the base at init
  (PiSSA/OLoRA), in which case it holds the residual weights the adapter was built against.
  """
  method = get_method(config.peft_type)
  resolution = resolve(config, model_config)
  kinds = module_kinds(model_config)
  bias = getattr(config, "bias", "none")
  if bias != "none" and any(k.endswith(".bias") for k in params):
    # On a model without biases (the usual Llama) PEFT's bias="all"/"lora_only" trains and saves nothing.
    raise config_lib.UnsupportedConfigError(
      f"bias={bias!r} on a model with bias tensors is not supported yet (use bias='none')"
    )
  adapter: Adapter = {}
  params = dict(params)
  keys = jax.random.split(key, len(resolution.targets) + 1)
  for k, name in zip(keys[1:], resolution.targets):
    spec = _module_spec(params, name, kinds[name], model_config)
    tensors = method.init_module(k, spec, config)
    dtype = _adapter_dtype(spec, config)
    tensors = {t: v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v for t, v in tensors.items()}
    if method.prepare_base is not None:
      new_base = method.prepare_base(spec, tensors, config)
      if new_base is not None:
        params[name + ".weight"] = new_base.astype(spec.weight.dtype)
    adapter[name] = tensors
  if method.init_shared is not None:
    shared = method.init_shared(keys[0], params, config, resolution.targets)
    if shared:
      adapter[SHARED] = shared
  for name in resolution.modules_to_save:
    spec = _module_spec(params, name, kinds[name], model_config)
    copy = {"weight": jnp.array(spec.weight)}
    if spec.bias is not None:
      copy["bias"] = jnp.array(spec.bias)
    adapter[name] = copy
  logging.info(
    "%s adapter: %d adapted modules, %d full copies, %d trainable parameters",
    config.peft_type,
    len(resolution.targets),
    len(resolution.modules_to_save),
    num_params(adapter),
  )
  return adapter, params


def apply(params, adapter: Adapter, config, *, rng: Array | None = None):
  """Params where every targeted module's entries are adapted (pure, jit-able; ``config`` is static).

  Args:
    params: base params (plain arrays).
    adapter: the adapter pytree.
    config: the method's config.
    rng: a key for dropout (training); None evaluates without dropout.
  """
  method = get_method(config.peft_type)
  out = dict(params)
  shared = adapter.get(SHARED, {})
  save = set(_modules_to_save(adapter, config))
  # one dropout key per module by sorted name, not dict order: jit flattens dicts in sorted key order, so the
  # same rng drops the same units eagerly and under jit
  names = sorted(n for n in adapter if n != SHARED)
  rngs = jax.random.split(rng, len(names)) if rng is not None else [None] * len(names)
  for r, name in zip(rngs, names):
    tensors = adapter[name]
    if name in save:
      for suffix, value in tensors.items():
        out[f"{name}.{suffix}"] = value
      continue
    kind = module_kind(name)
    if kind not in method.supported_kinds:
      raise targets_lib.UnsupportedTargetError(
        f"the adapter adapts {name!r}, a {targets_lib.describe_kind(kind)} layer, which {config.peft_type} does "
        f"not support. Currently, only the following modules are supported: "
        f"{', '.join(targets_lib.describe_kind(k) for k in method.supported_kinds)}."
      )
    tied_head = name == "lm_head" and "lm_head.weight" not in params
    weight_key = "model.embed_tokens.weight" if tied_head else name + ".weight"
    if weight_key not in params:
      raise AdapterCheckpointError(f"the adapter adapts {name!r}, but the model params have no {weight_key!r}")
    spec = ModuleSpec(name, kind, params[weight_key], params.get(name + ".bias"))
    for suffix, entry in method.adapt_module(spec, tensors, config, shared, r).items():
      out[f"{name}.{suffix}"] = entry
  return out


def _layer_template() -> dict[str, str]:
  one_layer = LlamaConfig(
    vocab_size=1,
    hidden_size=1,
    intermediate_size=1,
    num_hidden_layers=1,
    num_attention_heads=1,
    num_key_value_heads=1,
    head_dim=1,
  )
  return module_kinds(one_layer)


_KINDS_OF_ONE_LAYER = _layer_template()


def module_kind(name: str, model_config: LlamaConfig | None = None) -> str:
  """The real kind of a module (``jpeft.models.llama.module_kinds``): linear, embedding or norm.

  Without ``model_config`` the layer index is not checked against the model's depth (every Llama has the same
  modules in every layer). A name that is no Llama module raises :class:`AdapterCheckpointError`.
  """
  if model_config is not None:
    kinds = module_kinds(model_config)
    if name in kinds:
      return kinds[name]
  else:
    kind = _KINDS_OF_ONE_LAYER.get(re.sub(r"^model\.layers\.\d+\.", "model.layers.0.", name))
    if kind is not None:
      return kind
  raise AdapterCheckpointError(
    f"{name!r} is not a module of the Llama model (modules look like 'model.layers.0.self_attn.q_proj')"
  )


def _modules_to_save(adapter, config):
  names = config.modules_to_save or ()
  return [n for n in adapter if n != SHARED and any(n.endswith(m) for m in names)]


def materialize(params):
  """Every adapted entry replaced by its merged plain array (``W + ΔW`` etc.)."""
  return {k: (v.materialize() if hasattr(v, "materialize") else v) for k, v in params.items()}


def merge(params, adapter: Adapter, config):
  """Plain base-shaped params with the adapter merged in (PEFT's ``merge_and_unload``).

  The input ``params`` are not modified: they remain the un-merged base (that is "disable" and
  "unmerge" in a functional library).
  """
  adapted = apply(params, adapter, config)
  merged = materialize(adapted)
  embedding = adapted.get("model.embed_tokens.weight")
  if "lm_head.weight" not in params and "lm_head.weight" not in merged and hasattr(embedding, "materialize"):
    # a tied head keeps reading the base embedding (unless the adapter gives the head its own weight: a
    # modules_to_save copy or a LoRA on lm_head)
    merged["lm_head.weight"] = base_array(embedding)
  return {k: v.astype(params[k].dtype) if k in params else v for k, v in merged.items()}


def unmerge(merged, adapter: Adapter, config):
  """The base back from merged params, for additive methods (``W − ΔW``).

  Multiplicative methods (DoRA, OFT, ...) and ``modules_to_save`` copies cannot be undone from the merged
  weights alone: keep the base params (``merge`` never modifies them).
  """
  adapted = apply(merged, adapter, config)
  save = set(_modules_to_save(adapter, config))
  out = dict(merged)
  for name in adapter:
    if name == SHARED:
      continue
    entry = adapted.get(name + ".weight")
    if name in save or not hasattr(entry, "delta"):
      raise NotImplementedError(
        f"{config.peft_type} on {name!r} cannot be unmerged from merged weights: keep the base params"
      )
    out[name + ".weight"] = (merged[name + ".weight"] - entry.delta()).astype(merged[name + ".weight"].dtype)
  return out


# ----------------------------------------------------------------------------------------------------------
# Trainable split and counts


def trainable_mask(adapter: Adapter, config) -> Adapter:
  """True for tensors the optimizer updates (everything but the method's ``frozen_tensors``)."""
  frozen = set(get_method(config.peft_type).frozen_tensors)
  return {m: {t: t not in frozen for t in ts} for m, ts in adapter.items()}


def num_params(tree) -> int:
  return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))


# ----------------------------------------------------------------------------------------------------------
# PEFT state-dict keys


def peft_key(module: str, tensor: str) -> str:
  """``base_model.model.<module>.<tensor>``, or ``base_model.<tensor>`` for model-level tensors."""
  return SHARED_PREFIX + tensor if module == SHARED else f"{PEFT_PREFIX}{module}.{tensor}"


EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def embedding_base_layers(adapter: Adapter, params, config) -> dict[str, Array]:
  """The base embedding tables PEFT saves next to an adapter that targets them.

  PEFT's ``save_embedding_layers="auto"`` writes ``<module>.base_layer.weight`` for every adapted
  embedding/head when ``target_modules`` names one (and loads it back into the base on load).
  """
  targets = config.target_modules
  if not targets or not any(n in targets for n in EMBEDDING_LAYER_NAMES):
    return {}
  out = {}
  for module in adapter:
    if module in (SHARED, *_modules_to_save(adapter, config)):
      continue
    if module.split(".")[-1] in EMBEDDING_LAYER_NAMES:
      weight = params.get(module + ".weight")
      if weight is None and module == "lm_head":
        weight = params["model.embed_tokens.weight"]
      out[f"{PEFT_PREFIX}{module}.base_layer.weight"] = base_array(weight)
  return out


def to_state_dict(adapter: Adapter, params=None, config=None) -> dict[str, Array]:
  """PEFT's saved keys for the adapter (plus the embedding base layers PEFT saves, given params+config)."""
  state = {peft_key(m, t): v for m, ts in adapter.items() for t, v in ts.items()}
  if params is not None and config is not None:
    state.update(embedding_base_layers(adapter, params, config))
  return state


def describe_key_mismatch(expected, given, *, limit: int | None = None) -> str | None:
  """``"missing N key(s): [...]; M unexpected key(s): [...]"``, or None when the key sets are equal."""
  missing = sorted(set(expected) - set(given))
  unexpected = sorted(set(given) - set(expected))
  parts = []
  if missing:
    parts.append(f"missing {len(missing)} key(s): {missing[:limit]}")
  if unexpected:
    parts.append(f"{len(unexpected)} unexpected key(s): {unexpected[:limit]}")
  return "; ".join(parts) or None


def from_state_dict(
  state: Mapping[str, Any], like: Adapter, *, source: str = "state dict", extra: Mapping[str, Any] = ()
) -> Adapter:
  """Fill an adapter shaped like ``like`` from PEFT keys; missing, unexpected or mis-shaped keys raise, and so do
  tensors of a non-float dtype or holding NaN/inf (:func:`check_tensor`), each error naming the key.

  ``extra``: further keys the file may hold (the embedding base layers), checked for shape and skipped.
  """
  expected = {peft_key(m, t): (m, t, v) for m, ts in like.items() for t, v in ts.items()}
  for key, ref in dict(extra).items():
    if key in state:
      check_tensor(state[key], key, source)
      if tuple(state[key].shape) != tuple(ref.shape):
        raise AdapterCheckpointError(
          f"{source}: tensor {key!r} has shape {tuple(state[key].shape)}, the model has {tuple(ref.shape)}"
        )
  state = {k: v for k, v in state.items() if k not in dict(extra)}
  mismatch = describe_key_mismatch(expected, state, limit=4)
  if mismatch:
    raise AdapterCheckpointError(f"{source}: does not match the adapter config: {mismatch}")
  out: Adapter = {}
  for key, (m, t, ref) in expected.items():
    value = state[key]
    check_tensor(value, key, source, floating=jnp.issubdtype(ref.dtype, jnp.floating))
    if tuple(value.shape) != tuple(ref.shape):
      raise AdapterCheckpointError(
        f"{source}: tensor {key!r} has shape {tuple(value.shape)}, the config expects {tuple(ref.shape)}"
      )
    out.setdefault(m, {})[t] = jnp.asarray(value, dtype=ref.dtype)
  return out


def check_tensor(value, key: str, source: str, *, floating: bool = True) -> None:
  """An adapter tensor must be a numeric array, floating point unless ``floating=False``, and finite.

  Raises :class:`AdapterCheckpointError` naming the tensor and the source: an integer or boolean tensor where
  the adapter has floats would be silently cast, and a NaN or inf one makes every output of the adapted model NaN.
  """
  if not hasattr(value, "dtype") or not hasattr(value, "shape"):
    raise AdapterCheckpointError(f"{source}: tensor {key!r} is not an array (got {type(value).__name__})")
  try:
    dtype = jnp.dtype(value.dtype)
  except TypeError:
    dtype = np.dtype(object)
  is_float = jnp.issubdtype(dtype, jnp.floating)
  if floating and not is_float:
    raise AdapterCheckpointError(
      f"{source}: tensor {key!r} has dtype {dtype.name}; adapter tensors are floating point "
      f"(float32, bfloat16, float16 or float64)"
    )
  if not (is_float or jnp.issubdtype(dtype, jnp.integer) or dtype == jnp.bool_):
    raise AdapterCheckpointError(f"{source}: tensor {key!r} has dtype {dtype.name}, which is not a numeric dtype")
  if is_float:
    finite = np.isfinite(np.asarray(value).astype(np.float32))
    if not finite.all():
      bad = int(finite.size - finite.sum())
      raise AdapterCheckpointError(f"{source}: tensor {key!r} holds {bad} NaN or infinite value(s) of {finite.size}")
