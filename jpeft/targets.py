"""Which modules an adapter config targets: PEFT's matching rules, implemented once for all methods.

The model is described by ``module_kinds``: fully-qualified Hugging Face module names, in model order
(``named_modules()`` order), mapped to a kind string.  The kinds jpeft uses are ``"linear"``, ``"embedding"`` and
``"norm"``; any other string (e.g. ``"module"`` for containers) is allowed and is matched by name like the others,
but never selected by ``"all-linear"``.

The rules follow ``peft.tuners.tuners_utils.check_target_module_exists`` (PEFT 0.21.2):

1. ``exclude_modules``: a str is ``re.fullmatch``-ed; a list excludes ``key == e`` or ``key.endswith("." + e)``.
2. A module matching ``re.match(rf"(^|.*\\.){m}($|\\..*)", key)`` for an ``m`` in ``modules_to_save`` (the module
   itself or anything inside it) is never adapted.
3. ``target_modules``: a str is ``re.fullmatch``-ed (``"all-linear"``, case-insensitive, first becomes the list of
   every linear module except the output embedding); a list matches ``key == t`` exactly, or
   ``key.endswith("." + t)``, and only in the latter case ``layers_to_transform`` / ``layers_pattern`` then filter
   on the layer index.  ``None`` takes PEFT's per-method, per-architecture default.
4. ``modules_to_save`` (a full trainable copy) matches with a plain ``key.endswith(m)``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection, Mapping
from typing import Optional, Union

from absl import logging

from jpeft.config import JpeftError

__all__ = [
  "AllTargetsExcludedError",
  "ConflictingTargetsError",
  "INCLUDE_LINEAR_LAYERS_SHORTHAND",
  "KIND_DESCRIPTIONS",
  "MODULE_TARGETING_PEFT_TYPES",
  "NoMatchingTargetsError",
  "TargetError",
  "TargetResolution",
  "UnsupportedTargetError",
  "default_feedforward_modules",
  "default_target_modules",
  "is_excluded",
  "layer_index",
  "matches_target",
  "resolve_modules_to_save",
  "resolve_targets",
  "summarize_modules",
]

INCLUDE_LINEAR_LAYERS_SHORTHAND = "all-linear"

# Heads removed from "all-linear" for SEQ_CLS models without an output embedding (PEFT's SEQ_CLS_HEAD_NAMES).
_SEQ_CLS_HEAD_NAMES = ("score", "classifier")


# What each module kind is in transformers' terms (for error messages).
KIND_DESCRIPTIONS = {
  "linear": "linear (torch.nn.Linear)",
  "embedding": "embedding (torch.nn.Embedding)",
  "norm": "norm (RMSNorm)",
}


class TargetError(JpeftError):
  """The config's targeting does not fit the model (no default target modules for it, no match, a bad kind)."""


class NoMatchingTargetsError(TargetError):
  """The config's target_modules matched no module of the model."""


class AllTargetsExcludedError(NoMatchingTargetsError):
  """Every module matched by target_modules was excluded (by exclude_modules or modules_to_save)."""


class UnsupportedTargetError(TargetError):
  """A module was matched whose kind the method cannot adapt (e.g. a norm for LoRA)."""


class ConflictingTargetsError(TargetError):
  """A module both adapted (target_modules) and fully copied (modules_to_save); PEFT refuses it too."""


def describe_kind(kind: str) -> str:
  return KIND_DESCRIPTIONS.get(kind, kind)


# ---------------------------------------------------------------------------------------------------------------
# PEFT's default target modules (peft.utils.constants), for the architectures jpeft cares about.
# ---------------------------------------------------------------------------------------------------------------

_QV = ("q_proj", "v_proj")
_ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj")
_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")


def _same_for(value: tuple[str, ...], model_types: tuple[str, ...] = _MODEL_TYPES) -> dict[str, tuple[str, ...]]:
  return {m: value for m in model_types}


# Methods whose table is a copy of LoRA's.
_LORA_LIKE = (
    "LORA", "ADAMSS", "BOFT", "LILY", "LOHA", "LOKR", "OFT", "POLY", "FOURIERFT", "GLORA", "HRA", "UNILORA", "MISS",
    "RANDLORA", "ROAD", "HIRA", "C3A", "WAVEFT", "DELORA", "GRALORA", "TINYLORA", "PSOFT", "PEANUT", "SUPERTUNING",
    "DEFT",
    # copies of VeRA's table, identical to LoRA's for these architectures
    "VERA", "FROD", "PVERA", "SHIRA",
)  # fmt: skip

_DEFAULT_TARGET_MODULES: dict[str, dict[str, tuple[str, ...]]] = {
    **{peft_type: _same_for(_QV) for peft_type in _LORA_LIKE},
    # AdaLoRA and VB-LoRA have their own tables, which lack mistral.
    "ADALORA": _same_for(_QV, tuple(m for m in _MODEL_TYPES if m != "mistral")),
    "VBLORA": _same_for(_QV, tuple(m for m in _MODEL_TYPES if m != "mistral")),
    "BEFT": _same_for(("v_proj",)),
    "OSF": _same_for(_ALL_LINEAR),
    "IA3": {
        "llama": ("k_proj", "v_proj", "down_proj"),
        "mistral": ("k_proj", "v_proj", "down_proj"),
        **_same_for(("q_proj", "v_proj", "down_proj"), ("qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")),
    },
    "LN_TUNING": {
        **_same_for(("input_layernorm", "post_attention_layernorm", "norm"), ("llama", "mistral", "gemma")),
        **_same_for(("post_attention_layernorm",), ("qwen2", "qwen3")),
        **_same_for(
            ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm",
             "norm"),
            ("gemma2", "gemma3_text"),
        ),
    },
}  # fmt: skip

_DEFAULT_IA3_FEEDFORWARD_MODULES: dict[str, tuple[str, ...]] = _same_for(("down_proj",))

# The PEFT methods that adapt modules chosen by ``target_modules`` with exactly these rules (PEFT's BaseTuner
# methods with a default table); prompt-learning methods and ADAPTION_PROMPT use target_modules otherwise.
MODULE_TARGETING_PEFT_TYPES: frozenset[str] = frozenset(_DEFAULT_TARGET_MODULES)


def default_target_modules(
  peft_type: str, model_type: Optional[str], module_kinds: Optional[Mapping[str, str]] = None
) -> Optional[Union[tuple[str, ...], str]]:
  """PEFT's default ``target_modules`` for a method and architecture, or None when PEFT has none.

  ``TRAINABLE_TOKENS`` defaults to the input embedding (found in ``module_kinds``: the first embedding module),
  as a str, which PEFT then matches with ``re.fullmatch``.
  """
  if peft_type == "TRAINABLE_TOKENS":
    if module_kinds is None:
      return None
    return next((name for name, kind in module_kinds.items() if kind == "embedding"), None)
  return _DEFAULT_TARGET_MODULES.get(peft_type, {}).get(model_type or "")


def default_feedforward_modules(model_type: Optional[str]) -> Optional[tuple[str, ...]]:
  """PEFT's default IA³ ``feedforward_modules`` for an architecture, or None."""
  return _DEFAULT_IA3_FEEDFORWARD_MODULES.get(model_type or "")


# ---------------------------------------------------------------------------------------------------------------
# Matching primitives
# ---------------------------------------------------------------------------------------------------------------


def is_excluded(exclude_modules: Optional[Union[str, Collection[str]]], key: str) -> bool:
  """PEFT's ``exclude_modules`` rule."""
  if not exclude_modules:
    return False
  if isinstance(exclude_modules, str):
    return re.fullmatch(exclude_modules, key) is not None
  return key in exclude_modules or any(key.endswith(f".{e}") for e in exclude_modules)


def _in_modules_to_save(modules_to_save: Optional[Collection[str]], key: str) -> bool:
  if not modules_to_save:
    return False
  return any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in modules_to_save)


def layer_index(key: str, layers_pattern: Optional[Union[str, Collection[str]]] = None) -> Optional[int]:
  """The layer index PEFT reads from a module name for ``layers_to_transform``, or None if there is none."""
  match = None
  if layers_pattern is None or len(layers_pattern) == 0:
    match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
  else:
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
    for pattern in patterns:
      match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
      if match is not None:
        break
  if match is None:
    return None
  idx = match.groupdict().get("idx")
  return None if idx is None else int(idx)


def matches_target(
  target_modules: Union[str, Collection[str]],
  key: str,
  layers_to_transform: Optional[Union[int, Collection[int]]] = None,
  layers_pattern: Optional[Union[str, Collection[str]]] = None,
) -> bool:
  """Whether ``key`` is matched by an (already expanded) ``target_modules`` spec, PEFT's rules 3 and 5-6."""
  if isinstance(target_modules, str):
    return re.fullmatch(target_modules, key) is not None
  if key in target_modules:
    return True
  if not any(key.endswith(f".{t}") for t in target_modules):
    return False
  using_layer_indexes = layers_to_transform is not None and (
    isinstance(layers_to_transform, int) or len(layers_to_transform) != 0
  )
  if not using_layer_indexes:
    return True
  idx = layer_index(key, layers_pattern)
  if idx is None:
    return False
  if isinstance(layers_to_transform, int):
    return idx == layers_to_transform
  return idx in layers_to_transform


# ---------------------------------------------------------------------------------------------------------------
# Resolution
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TargetResolution:
  """The outcome of :func:`resolve_targets`.

  Attributes:
      targets: the adapted modules, in model order.
      modules_to_save: the modules that get a full trainable copy, in model order.
      excluded: modules matched by ``target_modules`` but excluded by ``exclude_modules`` or ``modules_to_save``.
      target_modules: the effective ``target_modules`` after the default table / "all-linear" expansion.
  """

  targets: tuple[str, ...]
  modules_to_save: tuple[str, ...] = ()
  excluded: tuple[str, ...] = ()
  target_modules: Union[str, tuple[str, ...], None] = None


def _effective_target_modules(
  config,
  module_kinds: Mapping[str, str],
  model_type: Optional[str],
  default_targets,
  output_embedding: Optional[str],
) -> Union[str, tuple[str, ...]]:
  spec = config.target_modules
  if spec is None:
    spec = default_targets
    if spec is None:
      spec = default_target_modules(config.peft_type, model_type, module_kinds)
    if spec is None:
      raise TargetError(
        f"Please specify `target_modules` in the config: jpeft has no default target modules for "
        f"peft_type {config.peft_type!r} and model_type {model_type!r}."
      )
    if not isinstance(spec, str):
      spec = tuple(spec)
  if isinstance(spec, str) and spec.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND:
    heads = set()
    if output_embedding is not None:
      heads.add(output_embedding)
    elif getattr(config, "task_type", None) == "SEQ_CLS":
      for name in _SEQ_CLS_HEAD_NAMES:
        if name in module_kinds:
          heads.add(name)
          break
    spec = tuple(name for name, kind in module_kinds.items() if kind == "linear" and name not in heads)
  return spec


def resolve_modules_to_save(
  modules_to_save: Optional[Collection[str]], module_kinds: Mapping[str, str]
) -> tuple[str, ...]:
  """PEFT's ``modules_to_save`` rule (plain ``key.endswith(m)``), skipping modules inside an already selected one."""
  if not modules_to_save:
    return ()
  selected: list[str] = []
  for key in module_kinds:
    if any(key.startswith(s + ".") for s in selected):
      continue
    if any(key.endswith(m) for m in modules_to_save):
      selected.append(key)
  return tuple(selected)


def summarize_modules(names: Collection[str], limit: int = 12) -> str:
  """A compact description of module names: layer indices folded into ``*`` with a count per pattern."""
  counts: dict[str, int] = {}
  for name in names:
    folded = re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)
    counts[folded] = counts.get(folded, 0) + 1
  parts = [f"{p} (x{n})" if n > 1 else p for p, n in counts.items()]
  if len(parts) > limit:
    parts = parts[:limit] + [f"... {len(parts) - limit} more"]
  return ", ".join(parts)


def _show_spec(spec) -> str:
  return repr(spec) if isinstance(spec, str) or spec is None else repr(list(spec))


def resolve_targets(
  config,
  module_kinds: Mapping[str, str],
  model_type: Optional[str] = None,
  *,
  default_targets: Optional[Union[str, Collection[str]]] = None,
  supported_kinds: Optional[Collection[str]] = None,
  output_embedding: Optional[str] = "lm_head",
) -> TargetResolution:
  """Resolves which modules ``config`` adapts, as PEFT would on the same model.

  Args:
      config: a :class:`jpeft.config.PeftConfig` (any method with ``target_modules``).
      module_kinds: module name -> kind, in model order (see the module docstring).
      model_type: the Hugging Face ``model_type`` (e.g. ``"llama"``), used when ``target_modules`` is None.
      default_targets: used instead of the built-in table when ``target_modules`` is None.
      supported_kinds: when given, a matched module of another kind raises :class:`UnsupportedTargetError`
          (PEFT raises for module types a method cannot adapt).
      output_embedding: the output embedding's module name, left out of ``"all-linear"``.

  Raises:
      NoMatchingTargetsError: no module matched (:class:`AllTargetsExcludedError` if all matches were excluded).
      UnsupportedTargetError: a matched module's kind is not in ``supported_kinds``.
      ConflictingTargetsError: a module is both a target and a ``modules_to_save`` copy (PEFT refuses it too).
      TargetError: ``target_modules`` is None and there is no default for this method and model type.
  """
  spec = _effective_target_modules(config, module_kinds, model_type, default_targets, output_embedding)
  exclude = getattr(config, "exclude_modules", None)
  modules_to_save = getattr(config, "modules_to_save", None)
  layers_to_transform = getattr(config, "layers_to_transform", None)
  layers_pattern = getattr(config, "layers_pattern", None)

  targets: list[str] = []
  excluded: list[str] = []
  for key in module_kinds:
    if not key:
      continue
    matched = matches_target(spec, key, layers_to_transform, layers_pattern)
    if is_excluded(exclude, key) or _in_modules_to_save(modules_to_save, key):
      if matched:
        excluded.append(key)
      continue
    if matched:
      targets.append(key)

  if not targets:
    available = [k for k in module_kinds if k]
    shown = ", ".join(available[:10]) + (f", ... ({len(available)} modules)" if len(available) > 10 else "")
    details = ""
    if layers_to_transform is not None:
      details += f" layers_to_transform={layers_to_transform!r}."
    if layers_pattern is not None:
      details += f" layers_pattern={layers_pattern!r}."
    if excluded:
      raise AllTargetsExcludedError(
        f"All {len(excluded)} modules matched by target_modules={_show_spec(spec)} were excluded "
        f"(exclude_modules={exclude!r}, modules_to_save={modules_to_save!r}): "
        f"{summarize_modules(excluded)}.{details}"
      )
    raise NoMatchingTargetsError(
      f"Target modules {_show_spec(spec)} (config target_modules={_show_spec(config.target_modules)}) not "
      f"found in the model.{details} Available modules include: {shown}"
    )

  if supported_kinds is not None:
    bad = [k for k in targets if module_kinds[k] not in supported_kinds]
    if bad:
      kinds = sorted({module_kinds[k] for k in bad})
      raise UnsupportedTargetError(
        f"Target module {bad[0]!r} is a {describe_kind(module_kinds[bad[0]])} layer, which {config.peft_type} "
        f"does not support. Currently, only the following modules are supported: "
        f"{', '.join(describe_kind(k) for k in supported_kinds)}. target_modules={_show_spec(config.target_modules)} "
        f"matched {len(bad)} module(s) of kind {', '.join(repr(k) for k in kinds)}: {summarize_modules(bad)}."
        + (" To train a norm in full, list it in `modules_to_save` instead." if "norm" in kinds else "")
      )

  saved = resolve_modules_to_save(modules_to_save, module_kinds)
  both = [k for k in saved if k in targets]
  if both:
    # PEFT: "modules_to_save cannot be applied to modules of type <class 'peft.tuners.lora.layer.Linear'>"
    raise ConflictingTargetsError(
      f"modules_to_save={list(modules_to_save)!r} selects {len(both)} module(s) that target_modules="
      f"{_show_spec(config.target_modules)} also adapts, e.g. {both[0]!r} (modules_to_save matches any name that "
      f"ends with an entry; target_modules skips a module only when an entry is a whole dotted part of its "
      f"name): {summarize_modules(both)}. A module is either adapted or fully trained, not both."
    )
  if modules_to_save and not saved:
    logging.warning(f"modules_to_save={list(modules_to_save)!r} matched no module of the model.")
  if exclude and not any(is_excluded(exclude, k) for k in module_kinds):
    logging.warning(f"exclude_modules={exclude!r} was passed but no modules were excluded.")

  logging.info(
    f"{config.peft_type}: {len(targets)} target modules: {summarize_modules(targets)}"
    + (f"; modules_to_save: {', '.join(saved)}" if saved else "")
  )
  return TargetResolution(
    targets=tuple(targets),
    modules_to_save=saved,
    excluded=tuple(excluded),
    target_modules=spec,
  )
