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
        SHARED: {"vera_A": ...},                # model-level tensors (VeRA, Lily), when a method has them
    }

and the PEFT key of a tensor is ``base_model.model.<module>.<tensor>`` (``base_model.<tensor>`` for
:data:`SHARED`; a *tied* shared tensor, used by several modules, is saved under each user's key, as PEFT saves a
parameter shared across layers). No method writes its own key mapping.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jpeft import config as config_lib
from jpeft import registry
from jpeft import targets as targets_lib
from jpeft.config import AdapterCheckpointError, UnmergeableError
from jpeft.methods.base import SHARED, Method, ModuleSpec
from jpeft.models.llama import LlamaConfig, base_array, module_kinds

__all__ = [
  "SHARED",
  "AdapterCheckpointError",
  "Method",
  "ModuleSpec",
  "UnmergeableError",
  "apply",
  "from_state_dict",
  "get_method",
  "init",
  "merge",
  "project",
  "regularizer",
  "tied_tensors",
  "to_state_dict",
  "trainable_mask",
  "unmerge",
]

Array = jax.Array
Adapter = dict  # {module name: {tensor name: array}}
PEFT_PREFIX = "base_model.model."
SHARED_PREFIX = "base_model."
get_method = registry.get_method


# ----------------------------------------------------------------------------------------------------------
# What the core needs of a model: module names and kinds, a model type, an order
#
# ``model_config`` is either a :class:`LlamaConfig` (jpeft's own model: ``module_kinds``, the tied ``lm_head``), None
# (a Llama of any depth, where a function allows it) or a *model description*: any hashable object with
# ``module_kinds`` (name -> "linear"/"embedding"/"norm", in model order), ``model_type`` (str or None) and
# ``output_embedding`` (the module "all-linear" leaves out, or None) -- :class:`jpeft.tree.TreeLayout`, built from a
# foreign (Flax nnx / linen / nested dict) parameter tree. Llama-only special cases (the tied head) apply only to the
# first two.


def is_llama(model_config) -> bool:
  """Whether ``model_config`` describes jpeft's own Llama (a :class:`LlamaConfig`, or None: any Llama)."""
  return model_config is None or isinstance(model_config, LlamaConfig)


def _kinds(model_config) -> dict[str, str]:
  if isinstance(model_config, LlamaConfig):
    return module_kinds(model_config)
  return dict(model_config.module_kinds)


def _model_type(model_config):
  return getattr(model_config, "model_type", None)


def _output_embedding(model_config):
  return "lm_head" if is_llama(model_config) else model_config.output_embedding


# ----------------------------------------------------------------------------------------------------------
# Targeting


def resolve(config, model_config) -> targets_lib.TargetResolution:
  """PEFT's matching rules on this model; logs what matched.

  Needs only the model's config (module names and kinds), never its weights, so it can run before loading.
  ``model_config``: a :class:`LlamaConfig` or a model description (see above).

  Raises:
    targets.NoMatchingTargetsError: nothing matched.
    targets.UnsupportedTargetError: a matched module is of a kind the method cannot adapt (a norm for LoRA).
  """
  method = get_method(config.peft_type)
  return targets_lib.resolve_targets(
    config,
    _kinds(model_config),
    _model_type(model_config),
    supported_kinds=method.supported_kinds,
    output_embedding=_output_embedding(model_config),
  )


def _module_spec(params, name: str, kind: str, model_config) -> ModuleSpec:
  if is_llama(model_config) and name == "lm_head" and "lm_head.weight" not in params:  # tied head
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


def init(key: Array, params, config, model_config):
  """A fresh adapter at PEFT's initialisation.

  ``params``: a flat dict ``{"<module>.weight": (out, in) array, "<module>.bias": ...}``; ``model_config``: its
  :class:`LlamaConfig`, or a model description of the same names (:func:`jpeft.tree.describe` builds both from any
  Flax tree; ``jpeft.init`` takes the tree itself).

  Returns ``(adapter, params)``; ``params`` is the input unless the method rewrites the base at init
  (PiSSA/OLoRA), in which case it holds the residual weights the adapter was built against. The adapter holds the
  tensors PEFT saves (trained and frozen ones), never the derived ones (see :mod:`jpeft.methods.base`).
  """
  method = get_method(config.peft_type)
  resolution = resolve(config, model_config)
  kinds = _kinds(model_config)
  bias = getattr(config, "bias", "none")
  if bias != "none" and any(k.endswith(".bias") for k in params):
    # On a model without biases (the usual Llama) PEFT's bias="all"/"lora_only" trains and saves nothing.
    raise config_lib.UnsupportedConfigError(
      f"bias={bias!r} on a model with bias tensors is not supported yet (use bias='none')"
    )
  adapter: Adapter = {}
  params = dict(params)
  specs = {name: _module_spec(params, name, kinds[name], model_config) for name in resolution.targets}
  keys = jax.random.split(key, len(resolution.targets) + 1)
  for k, name in zip(keys[1:], resolution.targets):
    spec = specs[name]
    tensors = _cast_floats(method.init_module(k, spec, config), _adapter_dtype(spec, config))
    if method.prepare_base is not None:
      new_base = method.prepare_base(spec, tensors, config)
      if new_base is not None:
        params[name + ".weight"] = new_base.astype(spec.weight.dtype)
    adapter[name] = tensors
  if method.init_shared is not None:
    shared = method.init_shared(keys[0], specs, config)
    if shared:
      adapter[SHARED] = shared
  for name in resolution.modules_to_save:
    spec = _module_spec(params, name, kinds[name], model_config)
    copy = {"weight": jnp.array(spec.weight)}
    if spec.bias is not None:
      copy["bias"] = jnp.array(spec.bias)
    adapter[name] = copy
  adapter = project(adapter, config)
  logging.info(
    "%s adapter: %d adapted modules, %d full copies, %d trainable parameters",
    config.peft_type,
    len(resolution.targets),
    len(resolution.modules_to_save),
    num_params(adapter),
  )
  return adapter, params


def _cast_floats(tensors, dtype):
  return {t: v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v for t, v in tensors.items()}


def _adapted_specs(params, adapter: Adapter, config, model_config) -> dict[str, ModuleSpec]:
  """The :class:`ModuleSpec` of every module the adapter adapts (not its full copies), by name in model order (see
  :func:`model_order`), kinds checked."""
  method = get_method(config.peft_type)
  save = set(_modules_to_save(adapter, config))
  specs = {}
  for name in sorted(adapter, key=order_key(model_config)):
    if name == SHARED or name in save:
      continue
    kind = module_kind(name, model_config)
    if kind not in method.supported_kinds:
      raise targets_lib.UnsupportedTargetError(
        f"the adapter adapts {name!r}, a {targets_lib.describe_kind(kind)} layer, which {config.peft_type} does "
        f"not support. Currently, only the following modules are supported: "
        f"{', '.join(targets_lib.describe_kind(k) for k in method.supported_kinds)}."
      )
    tied_head = is_llama(model_config) and name == "lm_head" and "lm_head.weight" not in params
    weight_key = "model.embed_tokens.weight" if tied_head else name + ".weight"
    if weight_key not in params:
      raise AdapterCheckpointError(f"the adapter adapts {name!r}, but the model params have no {weight_key!r}")
    specs[name] = ModuleSpec(name, kind, params[weight_key], params.get(name + ".bias"))
  return specs


def apply(
  params,
  adapter: Adapter,
  config,
  *,
  rng: Array | None = None,
  model_config=None,
  materialize: bool = False,
):
  """Params where every targeted module's entries are adapted (pure, jit-able; ``config`` is static).

  Args:
    params: base params (plain arrays).
    adapter: the adapter pytree.
    config: the method's config.
    rng: a key for dropout (training); None evaluates without dropout.
    model_config: the model's config; module kinds then come from the model itself (``module_kinds``). Without it
      they come from the Llama layer layout (every Llama layer has the same modules), and a name that is no Llama
      module is refused. A model description (:class:`jpeft.tree.TreeLayout`) gives them for any other model.
    materialize: return plain arrays (every adapted entry's merged weight, ``W + ΔW`` etc., differentiable with
      respect to the adapter) instead of adapted-weight pytrees, for a model that takes plain params. Raises
      :class:`UnmergeableError` naming why for a method whose adapted weight has no merged form (Lily's routing
      on the batch, BEFT without a base bias).
  """
  method = get_method(config.peft_type)
  out = dict(params)
  specs = _adapted_specs(params, adapter, config, model_config)
  shared = dict(adapter.get(SHARED, {}))
  if method.derive_shared is not None:
    shared.update(method.derive_shared(specs, config))
  # one dropout key per module by sorted name, not dict order: jit flattens dicts in sorted key order, so the
  # same rng drops the same units eagerly and under jit
  tied = _tied_by_module(config, specs, shared)
  names = sorted(n for n in adapter if n != SHARED)
  rngs = jax.random.split(rng, len(names)) if rng is not None else [None] * len(names)
  for r, name in zip(rngs, names):
    if name not in specs:  # a modules_to_save copy replaces the module's params
      for suffix, value in adapter[name].items():
        out[f"{name}.{suffix}"] = value
      continue
    tensors = {**adapter[name], **tied.get(name, {})}
    for suffix, entry in method.adapt_module(specs[name], tensors, config, shared, r).items():
      out[f"{name}.{suffix}"] = entry
  if materialize:
    return _materialized(out, params, config, model_config)
  return out


def _materialized(adapted, params, config, model_config):
  """Every adapted entry of ``adapted`` replaced by its merged plain array; a tied Llama head keeps the base
  embedding (as the adapted forward reads it)."""
  for key, entry in adapted.items():
    if (hasattr(entry, "matmul") or hasattr(entry, "embed")) and not hasattr(entry, "materialize"):
      reason = getattr(entry, "unmergeable_reason", None) or "it has no merged weight"
      raise UnmergeableError(
        f"{config.peft_type} cannot be merged: the adapted {key!r} ({type(entry).__name__}) has no merged weight "
        f"({reason}); keep the adapter (core.apply without materialize) instead"
      )
  merged = materialize(adapted)
  embedding = adapted.get("model.embed_tokens.weight")
  if (
    is_llama(model_config)
    and "lm_head.weight" not in params
    and "lm_head.weight" not in merged
    and hasattr(embedding, "materialize")
  ):
    # a tied head keeps reading the base embedding (unless the adapter gives the head its own weight: a
    # modules_to_save copy or a LoRA on lm_head)
    merged["lm_head.weight"] = base_array(embedding)
  return merged


def tied_tensors(config, specs: Mapping[str, ModuleSpec]) -> dict[str, dict[str, str]]:
  """``{shared name: {module: tensor name}}``: the method's tied tensors (``Method.tied_tensors``), or ``{}``."""
  method = get_method(config.peft_type)
  return {} if method.tied_tensors is None else {s: dict(u) for s, u in method.tied_tensors(specs, config).items()}


def _tied_by_module(config, specs, shared) -> dict[str, dict[str, Any]]:
  """``{module: {tensor name: shared array}}`` for the tied tensors each module uses."""
  out: dict[str, dict[str, Any]] = {}
  for name, users in tied_tensors(config, specs).items():
    if name not in shared:
      raise AdapterCheckpointError(f"the {config.peft_type} adapter has no shared tensor {name!r}")
    for module, tensor in users.items():
      out.setdefault(module, {})[tensor] = shared[name]
  return out


def project(adapter: Adapter, config) -> Adapter:
  """The adapter with the method's parameter constraint enforced (OFT's COFT); the identity for most methods.

  The train step applies it before the gradient and after every optimizer update (PEFT overwrites the parameters
  in place at the start of every forward), and ``init`` and ``merge`` apply it. The method's forward enforces the same constraint on whatever it
  is given (without a gradient through it, as PEFT's ``no_grad`` projection), so a loaded or hand-made adapter
  computes what PEFT computes with it.
  """
  method = get_method(config.peft_type)
  return adapter if method.project is None else method.project(adapter, config)


def _layer_template() -> dict[str, str]:
  # every module a layer of any supported family has (Qwen3/Gemma 3's q/k norms, Gemma's sandwich norms), in order
  one_layer = LlamaConfig(
    vocab_size=1,
    hidden_size=1,
    intermediate_size=1,
    num_hidden_layers=1,
    num_attention_heads=1,
    num_key_value_heads=1,
    head_dim=1,
    qk_norm=True,
    sandwich_norms=True,
  )
  return module_kinds(one_layer)


_KINDS_OF_ONE_LAYER = _layer_template()


def order_key(model_config=None):
  """The sort key of module names in ``model_config``'s order: :func:`model_order` for a Llama, the description's
  own order (``module_kinds``) otherwise."""
  if is_llama(model_config):
    return model_order
  order = {name: i for i, name in enumerate(_kinds(model_config))}
  return lambda name: (order.get(name, len(order)), name)


def model_order(name: str) -> tuple:
  """A sort key that puts module names in model order (``named_modules``'s), whatever order a dict came in (a tree
  through ``jit`` comes back with sorted keys, and ``layers.10`` sorts before ``layers.2``)."""
  order = list(_KINDS_OF_ONE_LAYER)
  m = re.match(r"^model\.layers\.(\d+)\.(.*)$", name)
  if m:
    rest = "model.layers.0." + m.group(2)
    return (order.index("model.layers.0.self_attn.q_proj"), int(m.group(1)), order.index(rest) if rest in order else 0)
  return (order.index(name) if name in order else len(order), 0, 0)


def module_kind(name: str, model_config=None) -> str:
  """The real kind of a module (``jpeft.models.llama.module_kinds``): linear, embedding or norm.

  Without ``model_config`` the layer index is not checked against the model's depth (every Llama has the same
  modules in every layer). A name that is no Llama module raises :class:`AdapterCheckpointError`. With a model
  description (:class:`jpeft.tree.TreeLayout`), its own kinds.
  """
  if not is_llama(model_config):
    kinds = _kinds(model_config)
    if name in kinds:
      return kinds[name]
    raise AdapterCheckpointError(
      f"{name!r} is not a module of the model (its modules include: {targets_lib.summarize_modules(list(kinds))})"
    )
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


def merge(params, adapter: Adapter, config, *, model_config=None):
  """Plain base-shaped params with the adapter merged in (PEFT's ``merge_and_unload``).

  The input ``params`` are not modified: they remain the un-merged base (that is "disable" and
  "unmerge" in a functional library).

  Raises:
    UnmergeableError: an adapted module has no merged weight (``materialize``).
  """
  merged = apply(params, project(adapter, config), config, model_config=model_config, materialize=True)
  return {k: v.astype(params[k].dtype) if k in params else v for k, v in merged.items()}


def unmerge(merged, adapter: Adapter, config, *, model_config=None):
  """The base back from merged params, for additive methods (``W − ΔW``).

  Multiplicative methods (DoRA, OFT, IA3, ...) and ``modules_to_save`` copies cannot be undone by subtraction
  (PEFT divides or inverts, which is inexact): keep the base params (``merge`` never modifies them).
  """
  adapted = apply(merged, project(adapter, config), config, model_config=model_config)
  save = set(_modules_to_save(adapter, config))
  out = dict(merged)
  for name in adapter:
    if name == SHARED:
      continue
    entry = adapted.get(name + ".weight")
    if name in save or not hasattr(entry, "delta"):
      raise NotImplementedError(
        f"{config.peft_type} on {name!r} is not additive (W + ΔW), so it cannot be unmerged by subtraction from "
        f"the merged weights: keep the base params (core.merge never modifies them)"
      )
    out[name + ".weight"] = (merged[name + ".weight"] - entry.delta()).astype(merged[name + ".weight"].dtype)
  return out


# ----------------------------------------------------------------------------------------------------------
# Trainable split and counts


def regularizer(adapter: Adapter, config):
  """The method's term of the training loss (``Method.regularizer``: AdaLoRA's orthogonality penalty), or None."""
  method = get_method(config.peft_type)
  return None if method.regularizer is None else method.regularizer(adapter, config)


def optimizer_transform(config):
  """``inner -> GradientTransformation``: the method's wrapper of the optimizer after clipping
  (``Method.optimizer_transform``: AdaLoRA's rank allocator), or None."""
  if config is None:
    return None
  method = get_method(config.peft_type)
  if method.optimizer_transform is None:
    return None
  return lambda inner: method.optimizer_transform(inner, config)


def config_after_training(config, opt_state):
  """The config to save with an adapter trained with ``opt_state`` (``Method.config_after_training``: AdaLoRA's
  ``rank_pattern``); ``config`` itself for most methods."""
  if config is None or opt_state is None:
    return config
  method = get_method(config.peft_type)
  return config if method.config_after_training is None else method.config_after_training(config, opt_state)


def export_adapter(adapter: Adapter, config) -> Adapter:
  """The tensors a checkpoint holds (``Method.export_adapter``: AdaLoRA slices to ``rank_pattern``)."""
  if config is None:
    return adapter
  method = get_method(config.peft_type)
  return adapter if method.export_adapter is None else method.export_adapter(adapter, config)


def batch_coupled(config) -> bool:
  """Whether the method's output for a row depends on the batch's other rows (``Method.batch_coupled``: Lily)."""
  return config is not None and get_method(config.peft_type).batch_coupled


def frozen_tensors(config) -> frozenset[str]:
  """Names of the saved tensors the method never trains (VeRA's saved projections)."""
  return frozenset(get_method(config.peft_type).frozen_tensors(config))


def trainable_mask(adapter: Adapter, config) -> Adapter:
  """True for tensors the optimizer updates (everything but the method's frozen tensors)."""
  frozen = frozen_tensors(config)
  return {m: {t: t not in frozen for t in ts} for m, ts in adapter.items()}


def split_trainable(adapter: Adapter, config) -> tuple[Adapter, Adapter]:
  """``(trained, frozen)``: two adapters of the same modules whose union is ``adapter`` (see :func:`join`)."""
  frozen = frozen_tensors(config)
  trained = {m: {t: v for t, v in ts.items() if t not in frozen} for m, ts in adapter.items()}
  rest = {m: {t: v for t, v in ts.items() if t in frozen} for m, ts in adapter.items()}
  return {m: ts for m, ts in trained.items() if ts}, {m: ts for m, ts in rest.items() if ts}


def join(*adapters: Adapter) -> Adapter:
  """The union of adapters split by :func:`split_trainable`."""
  out: Adapter = {}
  for a in adapters:
    for m, ts in a.items():
      out.setdefault(m, {}).update(ts)
  return out


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


def _tied_keys(adapter: Adapter, params, config) -> dict[str, list[str]]:
  """``{shared name: [PEFT key of each copy]}`` for the method's tied tensors (model order; the owner first)."""
  if config is None or get_method(config.peft_type).tied_tensors is None:
    return {}
  if params is None:
    raise ValueError(f"{config.peft_type} ties tensors across modules: its PEFT keys need the model params too")
  specs = _adapted_specs(params, adapter, config, None)
  return {s: [peft_key(m, t) for m, t in users.items()] for s, users in tied_tensors(config, specs).items()}


def to_state_dict(adapter: Adapter, params=None, config=None, *, embedding_layers: bool = True) -> dict[str, Array]:
  """PEFT's saved keys for the adapter: a tied tensor under each of its users' keys (PEFT's one copy per layer),
  plus the embedding base layers PEFT saves (given params and config, unless ``embedding_layers=False``).

  A tree shaped like the adapter (gradients, optimizer moments) maps the same way. Methods with tied tensors
  (Lily) need ``params`` and ``config``.
  """
  tied = _tied_keys(adapter, params, config)
  state = {}
  for m, ts in adapter.items():
    for t, v in ts.items():
      for key in tied.get(t, [peft_key(m, t)]) if m == SHARED else [peft_key(m, t)]:
        state[key] = v
  if params is not None and config is not None and embedding_layers:
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
  state: Mapping[str, Any],
  like: Adapter,
  *,
  source: str = "state dict",
  extra: Mapping[str, Any] = (),
  config=None,
  params=None,
) -> Adapter:
  """Fill an adapter shaped like ``like`` from PEFT keys; missing, unexpected or mis-shaped keys raise, and so do
  tensors of a non-float dtype or holding NaN/inf (:func:`check_tensor`), each error naming the key.

  ``extra``: further keys the file may hold (the embedding base layers), checked for shape and skipped.
  With ``config`` and ``params``, the method's own checks of a loaded adapter run too (``Method.check_loaded``:
  VeRA's saved projections must be those of its ``projection_prng_key``).
  """
  tied = _tied_keys(like, params, config)
  expected = {}
  for m, ts in like.items():
    for t, v in ts.items():
      for key in tied.get(t, [peft_key(m, t)]) if m == SHARED else [peft_key(m, t)]:
        expected[key] = (m, t, v)
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
  for name, keys in tied.items():
    _check_copies_equal(state, keys, name, config, source)
    out[SHARED][name] = jnp.asarray(state[keys[0]], dtype=like[SHARED][name].dtype)
  if config is not None and params is not None:
    method = get_method(config.peft_type)
    if method.check_loaded is not None:
      method.check_loaded(out, config, _adapted_specs(params, out, config, None), source)
  return out


def _check_copies_equal(state, keys: list[str], name: str, config, source: str) -> None:
  """The saved copies of one tied tensor must be equal (PEFT saves one clone per layer of the same parameter)."""
  first = np.asarray(state[keys[0]])
  for key in keys[1:]:
    copy = np.asarray(state[key])
    if not np.array_equal(copy, first):
      diff = float(np.max(np.abs(copy.astype(np.float64) - first.astype(np.float64))))
      raise AdapterCheckpointError(
        f"{source}: {key!r} differs from {keys[0]!r} (max |difference| {diff:.3g}), but {config.peft_type} shares "
        f"this tensor across {len(keys)} layers, so every saved copy must be equal: the checkpoint was edited or "
        f"is corrupt"
      )


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
