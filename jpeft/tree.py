"""jpeft on any Flax model: PEFT's methods over a foreign parameter tree (nnx ``State``, linen ``{"params": ...}``,
nested or flat dicts), with the adapted weights computed as plain arrays.

A foreign tree is described once by :func:`describe` as a :class:`TreeLayout` (hashable, a jit static argument):
its modules -- the parent path of every weight leaf, joined with ``"."`` (``layers.0.attn.q_proj`` for the leaf
``layers/0/attn/q_proj/kernel``) -- with their kind and the layout of their weight:

* ``"in_out"``: a linear weight stored ``(in, out)`` (Flax ``Dense``/``nnx.Linear`` ``kernel``, the default for a
  2-D leaf named ``kernel``);
* ``"out_in"``: a linear weight stored ``(out, in)`` (PyTorch's, the default for a 2-D leaf named ``weight``);
* ``"embedding"``: a table ``(vocab, dim)`` (the default for a leaf named ``embedding``).

A 1-D ``scale`` (or ``weight``) leaf is a norm (matched by name, adapted by no method but a ``modules_to_save`` copy), a ``bias``
leaf goes with its module's weight. ``layouts`` (PEFT-style patterns: a module name or a ``"."``-suffix of it, or a
regex, as ``rank_pattern`` keys) overrides the default or names a weight leaf of any other name (a bare
``nnx.Param``), which is then a module of its own named by its full path.

The core (:mod:`jpeft.core`) sees the tree as a flat dict of ``"<module>.weight"`` arrays in PEFT's ``(out, in)``
convention (:func:`view`), so targeting is PEFT's rules on the tree's own paths, and the adapter tensors come out in
PEFT's shapes (``lora_A.weight`` ``(r, in)``): exporting needs only new module names, no transpose.
``apply(..., materialize=True)`` writes the merged weights back into a tree of the same structure and type, in the
tree's own layout, differentiable with respect to the adapter::

  graphdef, state = nnx.split(model)
  config = jpeft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"])
  adapter, state = jpeft.init(jax.random.key(0), state, config)
  adapted = jpeft.apply(state, adapter, config, materialize=True)     # an nnx.State like `state`
  logits = nnx.merge(graphdef, adapted)(ids)
  jpeft.save_pretrained("out/", adapter, config, state, name_map=[(r"^layers\\.", "model.layers.")])

Methods whose adapted weight has no plain form (Lily routes on the batch; BEFT without a base bias) are refused by
``materialize=True`` with :class:`jpeft.config.UnmergeableError` naming why.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import jax

from jpeft import checkpoint
from jpeft import config as config_lib
from jpeft import core
from jpeft import targets as targets_lib
from jpeft.methods.base import SHARED
from jpeft.models.llama import LlamaConfig

__all__ = [
  "LAYOUTS",
  "LayoutError",
  "TreeLayout",
  "TreeModule",
  "apply",
  "describe",
  "export",
  "init",
  "is_foreign",
  "merge",
  "rename",
  "save_pretrained",
  "view",
]

LAYOUTS = ("out_in", "in_out", "embedding")
_KIND_OF_LAYOUT = {"out_in": "linear", "in_out": "linear", "embedding": "embedding"}
_DEFAULT_LAYOUT = {"kernel": "in_out", "weight": "out_in", "embedding": "embedding"}
_NORM_LEAVES = ("scale",)
_COLLECTIONS = ("params",)  # a linen variables dict's parameter collection, left out of module names

NameMap = Union[Mapping[str, str], Callable[[str], str], Sequence[tuple[str, str]]]


class LayoutError(config_lib.JpeftError, ValueError):
  """A tree does not fit its layout: a layout that does not fit a leaf's shape, an unknown layout, a leaf missing."""


@dataclasses.dataclass(frozen=True)
class TreeModule:
  """One module of a foreign tree: its name (``"."``-joined path), kind, weight layout and leaf paths."""

  name: str
  kind: str  # "linear" | "embedding" | "norm"
  layout: str | None  # "out_in" | "in_out" | "embedding" (None for a norm)
  weight: str  # the weight leaf's path ("."-joined)
  shape: tuple[int, ...]  # the weight leaf's shape, as stored
  bias: str | None = None  # the bias leaf's path, if the module has one


@dataclasses.dataclass(frozen=True)
class TreeLayout:
  """What :mod:`jpeft.core` needs of a foreign tree (a model description: ``module_kinds``, ``model_type``,
  ``output_embedding``), plus where each module's leaves live. Hashable: a jit static argument."""

  modules: tuple[TreeModule, ...]
  model_type: str | None = None
  output_embedding: str | None = None

  @functools.cached_property
  def by_name(self) -> dict[str, TreeModule]:
    return {m.name: m for m in self.modules}

  @property
  def module_kinds(self) -> dict[str, str]:
    return {m.name: m.kind for m in self.modules}

  def __repr__(self) -> str:
    return (
      f"TreeLayout({len(self.modules)} modules: {targets_lib.summarize_modules([m.name for m in self.modules])}; "
      f"model_type={self.model_type!r})"
    )


# ----------------------------------------------------------------------------------------------------------
# Paths


def _key_str(entry) -> str | None:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _leaves(tree, sep: str) -> tuple[list[str], list[Any], Any]:
  """``(paths, leaves, treedef)``: every leaf's path (components joined with ``"."``; ``sep`` also splits keys of a
  flat dict), an nnx ``Variable``'s trailing ``value`` and a linen ``params`` collection left out."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  variables = _is_variables_dict(tree, sep)
  paths, leaves = [], []
  for path, leaf in flat:
    entries = list(path)
    if entries and isinstance(entries[-1], jax.tree_util.GetAttrKey) and entries[-1].name in ("value", "raw_value"):
      entries = entries[:-1]
    parts = []
    for e in entries:
      parts.extend(p for p in _key_str(e).split(sep) if p != "")
    if len(parts) > 1 and parts[0] in _COLLECTIONS and variables:
      parts = parts[1:]
    paths.append(".".join(parts))
    leaves.append(leaf)
  return paths, leaves, treedef


def _is_variables_dict(tree, sep: str) -> bool:
  """A linen variables dict (``{"params": ...}``, nested or flattened with ``sep``)."""
  if not isinstance(tree, Mapping):
    return False
  if isinstance(tree.get("params"), Mapping):
    return True
  return any(isinstance(k, str) and k.startswith("params" + sep) for k in tree)


def _matches(pattern: str, name: str) -> bool:
  """``rank_pattern``'s rule (PEFT's ``get_pattern_key``): the name, or a ``"."``-suffix of it, fully matches."""
  return config_lib.get_pattern_key((pattern,), name) is not None


# ----------------------------------------------------------------------------------------------------------
# describe


def describe(
  tree,
  *,
  sep: str = ".",
  layouts: Mapping[str, str] | None = None,
  model_type: str | None = None,
  output_embedding: str | None = "lm_head",
) -> TreeLayout:
  """The :class:`TreeLayout` of a foreign parameter tree (only paths and shapes are read: works on tracers).

  Args:
    tree: an ``nnx.State`` (``nnx.split``'s), a linen ``{"params": ...}`` dict or FrozenDict, a nested dict, or a
      flat dict whose keys join path parts with ``sep``.
    sep: how the parts of one key are joined in a flat dict (``"."`` or ``"/"``, as ``flax.traverse_util``'s
      ``flatten_dict(sep=...)``); module names always join parts with ``"."``, PEFT's convention, which targeting
      rules (``target_modules``, ``layers_to_transform``, ``rank_pattern``) and the exported keys read.
    layouts: ``{pattern: layout}`` overriding the default layout of the weight leaves whose module name (or, for a
      leaf of another name than ``kernel``/``weight``/``embedding``, whose own path) matches ``pattern`` (PEFT's
      pattern rule: the name or a ``"."``-suffix fully matches). Layouts: ``"in_out"``, ``"out_in"``,
      ``"embedding"``.
    model_type: the Hugging Face ``model_type`` the tree is (``"llama"``): PEFT's default ``target_modules`` for
      ``target_modules=None`` then apply.
    output_embedding: the output embedding's module name, left out of ``"all-linear"`` (as PEFT leaves out the
      model's output embedding), if the tree has it.

  Raises:
    LayoutError: an unknown layout, a layout on a leaf that is not 2-D, a pattern of ``layouts`` that matches no
      leaf.
  """
  layouts = dict(layouts or {})
  for pattern, layout in layouts.items():
    if layout not in LAYOUTS:
      raise LayoutError(f"layouts[{pattern!r}] = {layout!r} is not a layout; use one of {', '.join(LAYOUTS)}")
  paths, leaves, _ = _leaves(tree, sep)
  shapes = {p: tuple(getattr(leaf, "shape", ())) for p, leaf in zip(paths, leaves)}
  used = set()
  modules: list[TreeModule] = []

  def chosen(name: str):
    for pattern, layout in layouts.items():
      if _matches(pattern, name):
        used.add(pattern)
        return layout
    return None

  for path in paths:
    parent, _, leaf = path.rpartition(".")
    shape = shapes[path]
    if not parent or leaf == "bias":
      continue
    if leaf not in _DEFAULT_LAYOUT and leaf not in _NORM_LEAVES:
      own = chosen(path)
      if own is None:
        continue
      name, layout, bias = path, own, None  # a bare weight leaf named in `layouts`: a module of its own
    else:
      override = chosen(parent) if leaf in _DEFAULT_LAYOUT else None
      if override is None and len(shape) == 1 and leaf in ("scale", "weight"):  # a Flax / torch-style norm
        modules.append(TreeModule(parent, "norm", None, path, shape, None))
        continue
      if override is None and (leaf not in _DEFAULT_LAYOUT or len(shape) != 2):
        continue  # a conv or einsum kernel: not a module jpeft adapts unless `layouts` says so
      name, layout = parent, override or _DEFAULT_LAYOUT[leaf]
      bias = parent + ".bias" if parent + ".bias" in shapes else None
    if len(shape) != 2:
      raise LayoutError(
        f"the layout {layout!r} of {name!r} needs a 2-D weight, but its leaf {path!r} has shape {shape}"
      )
    if bias is not None:
      out_dim = shape[1] if layout == "in_out" else shape[0]
      if layout == "embedding" or shapes[bias] != (out_dim,):
        raise LayoutError(
          f"the layout {layout!r} of {name!r} does not fit its leaves: weight {path!r} {shape} gives "
          f"{out_dim} outputs, bias {bias!r} has shape {shapes[bias]}"
        )
    modules.append(TreeModule(name, _KIND_OF_LAYOUT[layout], layout, path, shape, bias))
  unused = [p for p in layouts if p not in used]
  if unused:
    raise LayoutError(
      f"layouts pattern(s) {unused} match no weight leaf of the tree; its paths include: "
      f"{targets_lib.summarize_modules(paths)}"
    )
  names = [m.name for m in modules]
  if len(set(names)) != len(names):
    dup = sorted({n for n in names if names.count(n) > 1})
    raise LayoutError(f"several weight leaves under one module {dup[:4]}: name the weight leaf in `layouts`")
  head = output_embedding if output_embedding in names else None
  return TreeLayout(tuple(modules), model_type=model_type, output_embedding=head)


# ----------------------------------------------------------------------------------------------------------
# The core's view of a tree, and back


def _to_out_in(w, layout: str):
  return w.T if layout == "in_out" else w


def view(tree, layout: TreeLayout, *, sep: str = ".") -> dict[str, Any]:
  """The flat dict the core works on: ``"<module>.weight"`` in PEFT's convention (linear ``(out, in)``, embedding
  ``(vocab, dim)``, a norm's scale) and ``"<module>.bias"``, for every module of ``layout``.

  Raises:
    LayoutError: a module's leaf is missing from ``tree`` or has another shape than ``layout`` says.
  """
  paths, leaves, _ = _leaves(tree, sep)
  by_path = dict(zip(paths, leaves))
  out = {}
  for m in layout.modules:
    w = by_path.get(m.weight)
    if w is None or tuple(w.shape) != m.shape:
      got = "is missing" if w is None else f"has shape {tuple(w.shape)}"
      raise LayoutError(
        f"the tree does not fit its layout: the weight {m.weight!r} of {m.name!r} {got} (the layout has {m.shape}); "
        f"describe this tree (jpeft.tree.describe) or pass the layout it was initialised with"
      )
    out[m.name + ".weight"] = _to_out_in(w, m.layout) if m.layout else w
    if m.bias is not None:
      out[m.name + ".bias"] = by_path[m.bias]
  return out


def _write_back(tree, layout: TreeLayout, original: Mapping[str, Any], new: Mapping[str, Any], sep: str):
  """``tree`` with every entry of ``new`` that is not ``original``'s written back into its leaf, in the leaf's own
  layout and dtype; the same structure and type as ``tree``."""
  paths, leaves, treedef = _leaves(tree, sep)
  index = {p: i for i, p in enumerate(paths)}
  leaves = list(leaves)
  for key, value in new.items():
    if key in original and value is original[key]:
      continue
    name, _, suffix = key.rpartition(".")
    module = layout.by_name.get(name)
    if module is None or suffix not in ("weight", "bias") or (suffix == "bias" and module.bias is None):
      raise LayoutError(
        f"the adapted model has an entry {key!r} that has no leaf in the tree (a {name!r} "
        f"{'bias' if suffix == 'bias' else suffix}); the method adds a tensor the model does not have"
      )
    path = module.weight if suffix == "weight" else module.bias
    old = leaves[index[path]]
    if suffix == "weight" and module.layout == "in_out":
      value = value.T
    if tuple(value.shape) != tuple(old.shape):
      raise LayoutError(f"{key!r}: the adapted value has shape {tuple(value.shape)}, the leaf {path!r} {old.shape}")
    leaves[index[path]] = value.astype(old.dtype)
  return jax.tree_util.tree_unflatten(treedef, leaves)


# ----------------------------------------------------------------------------------------------------------
# init / apply / merge on any tree


def is_foreign(params, model_config=None, sep: str = ".") -> bool:
  """Whether ``params`` is a foreign tree: anything but jpeft's flat dict of ``"<module>.weight"``/``.bias"``
  arrays (an nnx ``State``, a FrozenDict, a nested dict, a flat dict of other keys), or given with a
  :class:`TreeLayout`."""
  if isinstance(model_config, TreeLayout):
    return True
  if isinstance(model_config, LlamaConfig):
    return False
  if type(params) is not dict or sep != ".":  # nnx.State, FrozenDict, ...; keys joined with "/"
    return True
  return any(isinstance(v, Mapping) or not str(k).endswith((".weight", ".bias")) for k, v in params.items())


def _layout_of(tree, model_config, layouts, sep) -> TreeLayout:
  if isinstance(model_config, TreeLayout):
    if layouts:
      raise ValueError("pass either a TreeLayout or `layouts`, not both")
    return model_config
  if model_config is not None:
    raise TypeError(
      f"model_config for a foreign tree is a jpeft.tree.TreeLayout (jpeft.tree.describe), got "
      f"{type(model_config).__name__}"
    )
  return describe(tree, sep=sep, layouts=layouts)


def init(key, params, config, model_config=None, *, layouts: Mapping[str, str] | None = None, sep: str = "."):
  """:func:`jpeft.core.init` on jpeft's own params (``model_config`` a :class:`LlamaConfig`) or on any tree.

  On a foreign tree (``model_config`` None or its :class:`TreeLayout`; ``layouts`` as :func:`describe`'s), returns
  ``(adapter, tree)``: the adapter in PEFT's shapes and names (the tree's modules, ``"."``-joined), and the tree
  itself, or a tree of the same structure with the residual weights where the method rewrites the base at init
  (PiSSA/OLoRA).
  """
  if not is_foreign(params, model_config, sep) and model_config is not None:
    return core.init(key, params, config, model_config)
  layout = _layout_of(params, model_config, layouts, sep)
  flat = view(params, layout, sep=sep)
  adapter, new = core.init(key, flat, config, layout)
  return adapter, _write_back(params, layout, flat, new, sep)


def apply(
  params,
  adapter,
  config,
  *,
  rng=None,
  model_config=None,
  materialize: bool = False,
  layouts: Mapping[str, str] | None = None,
  sep: str = ".",
):
  """:func:`jpeft.core.apply` on jpeft's own params, or on any tree with ``materialize=True``.

  On a foreign tree (anything but a flat dict of arrays, or with ``model_config`` a :class:`TreeLayout`), returns a
  tree of the same structure and type whose targeted weights are the adapted ones as plain arrays, in the tree's
  own layout and dtype (pure, jit-able, differentiable with respect to the adapter). Without a layout, the tree is
  described again (:func:`describe` with ``layouts``): pass the same ``layouts`` (or layout) as to :func:`init`.

  Raises:
    ValueError: a foreign tree without ``materialize=True`` (its model calls its own layers on arrays).
    jpeft.config.UnmergeableError: the method's adapted weight has no plain form (Lily, BEFT without a bias).
  """
  if not is_foreign(params, model_config, sep):
    return core.apply(params, adapter, config, rng=rng, model_config=model_config, materialize=materialize)
  if not materialize:
    raise ValueError(
      "a foreign tree's model runs its own layers on plain arrays: pass materialize=True (the adapted weights are "
      "then computed as arrays, differentiable with respect to the adapter)"
    )
  layout = _layout_of(params, model_config, layouts, sep)
  flat = view(params, layout, sep=sep)
  adapted = core.apply(flat, adapter, config, rng=rng, model_config=layout, materialize=True)
  return _write_back(params, layout, flat, adapted, sep)


def merge(params, adapter, config, *, model_config=None, layouts: Mapping[str, str] | None = None, sep: str = "."):
  """:func:`jpeft.core.merge` on jpeft's own params, or on any tree (a tree of the same structure, merged)."""
  if not is_foreign(params, model_config, sep):
    return core.merge(params, adapter, config, model_config=model_config)
  return apply(
    params,
    core.project(adapter, config),
    config,
    model_config=model_config,
    materialize=True,
    layouts=layouts,
    sep=sep,
  )


# ----------------------------------------------------------------------------------------------------------
# Export: the adapter under the Hugging Face module names


def _mapper(name_map: NameMap) -> Callable[[str], str]:
  if callable(name_map):
    return name_map
  if isinstance(name_map, Mapping):
    table = dict(name_map)

    def from_table(name: str) -> str:
      if name not in table:
        raise KeyError(name)
      return table[name]

    return from_table
  rules = [(re.compile(p), r) for p, r in name_map]

  def by_rules(name: str) -> str:
    for pattern, repl in rules:
      name = pattern.sub(repl, name)
    return name

  return by_rules


def rename(adapter, name_map: NameMap) -> tuple[dict, dict[str, str]]:
  """``(renamed adapter, {tree name: new name})``: every module of ``adapter`` under ``name_map``'s name (a dict, a
  callable, or an ordered list of ``(regex, replacement)`` applied in turn with ``re.sub``).

  Raises:
    ValueError: a module the map does not name, a name that is not a string, two modules under one name.
  """
  fn = _mapper(name_map)
  names: dict[str, str] = {}
  missing = []
  for m in adapter:
    if m == SHARED:
      continue
    try:
      new = fn(m)
    except KeyError:
      missing.append(m)
      continue
    if not isinstance(new, str) or not new:
      raise ValueError(f"name_map gives {new!r} for the module {m!r}; module names are non-empty strings")
    names[m] = new
  if missing:
    raise ValueError(f"name_map has no name for {len(missing)} adapted module(s): {missing[:6]}")
  seen: dict[str, str] = {}
  for m, new in names.items():
    if new in seen:
      raise ValueError(f"name_map gives {seen[new]!r} and {m!r} the same name {new!r}")
    seen[new] = m
  out = {names.get(m, m): ts for m, ts in adapter.items()}
  return out, names


def _short_form(chosen: Sequence[str], everything: Sequence[str] | None) -> tuple[str, ...]:
  """The module names' last parts when, on ``everything`` (every module of the model under its new name), PEFT's
  list rule (``key == t`` or ``key.endswith("." + t)``) selects exactly ``chosen``; else the full names."""
  full = tuple(chosen)
  if everything is None:
    return full
  short = tuple(sorted({n.rsplit(".", 1)[-1] for n in chosen}))
  selected = [n for n in everything if targets_lib.matches_target(short, n)]
  return short if sorted(selected) == sorted(full) else full


def export_config(config, adapter, names: Mapping[str, str], everything: Sequence[str] | None = None):
  """``config`` with every field that names modules rewritten in the new names (``names``: tree name -> new name
  of every adapted module; ``everything``: the new names of all the model's modules, if known): ``target_modules``
  (the last parts when they select exactly the adapted modules among ``everything``, else the full names),
  ``modules_to_save``, ``rank_pattern``-style dicts and IA3's ``feedforward_modules`` (full names);
  ``exclude_modules``, ``layers_to_transform`` and ``layers_pattern`` are then spent (cleared)."""
  saved = set(core._modules_to_save(adapter, config))
  targets = [m for m in adapter if m != SHARED and m not in saved]
  changes: dict[str, Any] = {}
  fields = {f.name for f in dataclasses.fields(config)}
  if "target_modules" in fields:
    changes["target_modules"] = _short_form([names[m] for m in targets], everything)
  if saved and "modules_to_save" in fields:
    changes["modules_to_save"] = _short_form([names[m] for m in saved], everything)
  for field in ("exclude_modules", "layers_to_transform", "layers_pattern"):
    if field in fields and getattr(config, field) is not None:
      changes[field] = None
  for field in sorted(fields):
    value = getattr(config, field)
    if field.endswith("_pattern") and isinstance(value, Mapping) and value:
      table = {}
      for m in targets:
        v = config_lib.resolve_pattern(value, m, None)
        if v is not None:
          table[names[m]] = v
      changes[field] = config_lib.FrozenDict(table)
  if "feedforward_modules" in fields and config.feedforward_modules is not None:
    from jpeft.methods import ia3

    changes["feedforward_modules"] = tuple(names[m] for m in targets if ia3.is_feedforward(config, m))
  return config.replace(**changes)


def export(
  adapter, config, name_map: NameMap, params=None, *, layout: TreeLayout | None = None, sep: str = "."
) -> tuple[dict, Any, dict | None]:
  """``(adapter, config, params)`` under the new module names: what :func:`jpeft.checkpoint.save_pretrained` writes
  in PEFT's format. ``params`` (the tree, or jpeft's flat params) gives the embedding base layers PEFT saves and the
  model's other module names (to keep ``target_modules`` short); the returned params are the core's flat view of
  the adapted modules, renamed (None without ``params``)."""
  if core.get_method(config.peft_type).tied_tensors is not None:
    raise config_lib.UnsupportedConfigError(
      f"{config.peft_type} names its shared tensors after the modules that own them; exporting it under other "
      f"module names is not supported"
    )
  renamed, names = rename(adapter, name_map)
  if params is None:
    return renamed, export_config(config, adapter, names), None
  if is_foreign(params, layout, sep):
    layout = layout if layout is not None else describe(params, sep=sep)
    flat = view(params, layout, sep=sep)
    modules = [m.name for m in layout.modules]
  else:
    flat = dict(params)
    modules = list(dict.fromkeys(k.rpartition(".")[0] for k in flat))
  fn = _mapper(name_map)
  try:
    everything = [names[m] if m in names else fn(m) for m in modules]
  except (KeyError, re.error):
    everything = None  # a dict map that names only the adapted modules: full names in target_modules
  out = {}
  for key, value in flat.items():
    module, _, suffix = key.rpartition(".")
    if module in names:
      out[f"{names[module]}.{suffix}"] = value
  return renamed, export_config(config, adapter, names, everything), out


def save_pretrained(
  folder,
  adapter,
  config,
  params=None,
  *,
  opt_state=None,
  name_map: NameMap | None = None,
  layout: TreeLayout | None = None,
  sep: str = ".",
) -> str:
  """:func:`jpeft.checkpoint.save_pretrained`; with ``name_map``, the adapter saved under the Hugging Face module
  names (``name_map``: a dict, a callable, or an ordered list of ``(regex, replacement)``; see :func:`export`), so
  ``peft.PeftModel.from_pretrained`` loads the adapter of a foreign tree on the matching transformers model.

  ``params``: the tree (or jpeft's params): for the embedding base layers PEFT saves, and to shorten
  ``target_modules`` to PEFT's usual last parts when that selects the same modules on the renamed model.
  """
  if name_map is None:
    if params is not None and is_foreign(params, layout, sep):
      raise ValueError(
        "the adapter of a foreign tree is saved under the Hugging Face module names: pass name_map (tree module "
        "name -> Hugging Face module name)"
      )
    return checkpoint.save_pretrained(folder, adapter, config, params, opt_state=opt_state)
  config = core.config_after_training(config, opt_state)  # before renaming: AdaLoRA's rank_pattern gets renamed too
  renamed, new_config, flat = export(adapter, config, name_map, params, layout=layout, sep=sep)
  return checkpoint.save_pretrained(folder, renamed, new_config, flat)
