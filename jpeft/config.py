"""PEFT's ``adapter_config.json`` as typed, frozen, hashable dataclasses.

Every config class mirrors the fields (names and defaults) of the matching Hugging Face PEFT config class, so a
folder written by :func:`save_config` loads with ``peft.PeftConfig.from_pretrained`` and a folder written by PEFT
loads with :func:`jpeft.registry.load_config`.  Values are normalised so that configs are hashable and can be used as static
arguments of jitted functions: lists and sets become tuples, dicts become :class:`FrozenDict` (which keeps the
insertion order, because PEFT's ``rank_pattern``/``alpha_pattern`` matching depends on it).

This module holds what every method shares: the error hierarchy, :class:`FrozenDict`, the base
:class:`PeftConfig` (PEFT's base and targeting fields, type and range checks), JSON output and the
``rank_pattern``-style pattern lookup. It imports no method. Each method's config class lives in the method's
own file (``jpeft/methods/<method>.py``) and is registered together with the method
(:func:`jpeft.methods.base.register`); reading a config by its ``peft_type`` (:func:`jpeft.registry.config_from_dict`,
:func:`jpeft.registry.load_config`) goes through that one table.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.metadata
import json
import math
import os
import re
import tempfile
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar, Optional, Union

import numpy as np
from absl import logging

__all__ = [
  "CONFIG_NAME",
  "PEFT_METHOD_TYPES",
  "TASK_TYPES",
  "AdapterCheckpointError",
  "ConfigTypeError",
  "FileMissingError",
  "FrozenDict",
  "InvalidConfigError",
  "JpeftError",
  "PeftConfig",
  "UnsupportedConfigError",
  "build_config",
  "config_json",
  "config_to_dict",
  "get_pattern_key",
  "read_config_file",
  "resolve_pattern",
  "save_config",
]

CONFIG_NAME = "adapter_config.json"

# The version written into saved configs when PEFT itself is not installed.
DEFAULT_PEFT_VERSION = "0.21.2"

# ``peft.utils.PeftType`` values of PEFT 0.21.2.
PEFT_METHOD_TYPES: tuple[str, ...] = (
  "PROMPT_TUNING",
  "MULTITASK_PROMPT_TUNING",
  "P_TUNING",
  "PREFIX_TUNING",
  "LORA",
  "ADALORA",
  "ADAMSS",
  "BOFT",
  "ADAPTION_PROMPT",
  "IA3",
  "BEFT",
  "LILY",
  "LOHA",
  "LOKR",
  "OFT",
  "POLY",
  "LN_TUNING",
  "VERA",
  "FROD",
  "PVERA",
  "FOURIERFT",
  "GLORA",
  "XLORA",
  "HRA",
  "VBLORA",
  "UNILORA",
  "CPT",
  "MISS",
  "RANDLORA",
  "ROAD",
  "TRAINABLE_TOKENS",
  "HIRA",
  "SHIRA",
  "C3A",
  "WAVEFT",
  "OSF",
  "DELORA",
  "GRALORA",
  "CARTRIDGE",
  "TINYLORA",
  "PSOFT",
  "PEANUT",
  "SHADOW",
  "SUPERTUNING",
  "DEFT",
)

# ``peft.utils.TaskType`` values.
TASK_TYPES: tuple[str, ...] = (
  "SEQ_CLS",
  "SEQ_2_SEQ_LM",
  "CAUSAL_LM",
  "TOKEN_CLS",
  "QUESTION_ANS",
  "FEATURE_EXTRACTION",
)


class JpeftError(ValueError):
  """The base of every error jpeft raises for bad input; a ``ValueError``.

  The hierarchy (each message names the field, key, module, tensor or file at fault)::

      JpeftError (ValueError)
      ├── InvalidConfigError            a config PEFT would refuse, or a file that is not an adapter config
      │   └── ConfigTypeError           a config field of the wrong type (also a TypeError)
      ├── UnsupportedConfigError        a valid PEFT config using a feature jpeft does not implement
      ├── FileMissingError              an adapter file that is not there (also a FileNotFoundError)
      ├── jpeft.targets.TargetError     target modules that match nothing, or modules the method cannot adapt
      ├── AdapterCheckpointError        adapter tensors that do not fit the config or the model
      ├── jpeft.models.loading.CheckpointError model weights that do not fit the model config
      ├── UnmergeableError              a merge of a method whose adapted modules have no merged weight
      ├── ConversionError               an adapter that cannot become a LoRA (no fixed weight change), a bad request
      │   └── VllmCompatibilityError    an adapter folder that breaks what vLLM's LoRA loader reads
      └── experiments.common.ExperimentError   an experiment folder, training params or dataset that cannot run
  """


class InvalidConfigError(JpeftError):
  """A config that PEFT would refuse, or a config file / dict that cannot be read as a PEFT adapter config."""


class ConfigTypeError(InvalidConfigError, TypeError):
  """A config field whose value has the wrong type (also a ``TypeError``)."""


class UnsupportedConfigError(JpeftError):
  """A valid PEFT config that uses a feature jpeft does not implement."""


class FileMissingError(JpeftError, FileNotFoundError):
  """A file jpeft needs (an adapter config, adapter weights) that does not exist (also a ``FileNotFoundError``)."""


class AdapterCheckpointError(JpeftError):
  """An adapter (a checkpoint file or an adapter pytree) that does not fit its config or the model."""


class UnmergeableError(JpeftError):
  """``merge`` of a method whose adapted modules have no merged weight (they depend on the input, or add a path
  that is no weight, such as a prompt, or a bias the base model lacks)."""


class ConversionError(JpeftError):
  """An adapter that ``jpeft.convert`` cannot turn into a LoRA (its effect is no fixed weight change, or it changes
  a bias), or a conversion request that makes no sense (rank and energy both or neither, a rank vLLM refuses)."""


class VllmCompatibilityError(ConversionError):
  """An adapter folder that breaks a rule of what vLLM's LoRA loader reads; the message lists every violation."""


# ---------------------------------------------------------------------------------------------------------------
# Hashable containers
# ---------------------------------------------------------------------------------------------------------------


class FrozenDict(Mapping):
  """An immutable, hashable, insertion-ordered mapping.

  Equality is order-sensitive (``FrozenDict(a=1, b=2) != FrozenDict(b=2, a=1)``) because the order of
  ``rank_pattern``/``alpha_pattern`` entries decides which pattern wins.  Comparing with a plain ``dict`` also
  compares the order of its items.
  """

  __slots__ = ("_items", "_index", "_hash")

  def __init__(self, items: Union[Mapping, tuple, list, None] = None, /, **kwargs: Any):
    if items is None:
      pairs: list[tuple[Any, Any]] = []
    elif isinstance(items, Mapping):
      pairs = list(items.items())
    else:
      pairs = [tuple(p) for p in items]
    pairs.extend(kwargs.items())
    index: dict[Any, Any] = {}
    for k, v in pairs:
      index[k] = _freeze(v)
    object.__setattr__(self, "_index", index)
    object.__setattr__(self, "_items", tuple(index.items()))
    object.__setattr__(self, "_hash", None)

  def __setattr__(self, name: str, value: Any) -> None:
    raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")

  def __getitem__(self, key: Any) -> Any:
    return self._index[key]

  def __iter__(self) -> Iterator[Any]:
    return (k for k, _ in self._items)

  def __len__(self) -> int:
    return len(self._items)

  def __contains__(self, key: object) -> bool:
    return key in self._index

  def items(self):  # type: ignore[override]
    return self._items

  def __hash__(self) -> int:
    if self._hash is None:
      object.__setattr__(self, "_hash", hash(self._items))
    return self._hash

  def __eq__(self, other: object) -> bool:
    if isinstance(other, FrozenDict):
      return self._items == other._items
    if isinstance(other, Mapping):
      return self._items == tuple((k, _freeze(v)) for k, v in other.items())
    return NotImplemented

  def __ne__(self, other: object) -> bool:
    result = self.__eq__(other)
    return result if result is NotImplemented else not result

  def __repr__(self) -> str:
    return f"FrozenDict({dict(self._items)!r})"

  def __reduce__(self):
    return (FrozenDict, (self._items,))

  def to_dict(self) -> dict:
    return {k: _thaw(v) for k, v in self._items}


def _freeze(value: Any) -> Any:
  """Turns JSON-like values into hashable ones: list/tuple -> tuple, set -> sorted tuple, dict -> FrozenDict."""
  if isinstance(value, enum.Enum):
    return value.value
  if isinstance(value, np.generic):  # numpy scalars (np.int64(8), np.float32(0.1)) as Python numbers
    return value.item()
  if isinstance(value, FrozenDict):
    return value
  if isinstance(value, Mapping):
    return FrozenDict(value)
  if isinstance(value, (list, tuple)):
    return tuple(_freeze(v) for v in value)
  if isinstance(value, (set, frozenset)):
    frozen = [_freeze(v) for v in value]
    try:
      return tuple(sorted(frozen))
    except TypeError:
      return tuple(frozen)
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return FrozenDict({f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
  return value


def _thaw(value: Any) -> Any:
  """The inverse of :func:`_freeze`, producing JSON-serialisable values."""
  if isinstance(value, enum.Enum):
    return value.value
  if isinstance(value, Mapping):
    return {k: _thaw(v) for k, v in value.items()}
  if isinstance(value, (list, tuple, set, frozenset)):
    return [_thaw(v) for v in value]
  return value


def _show(value: Any) -> str:
  return repr(_thaw(value))


# ---------------------------------------------------------------------------------------------------------------
# Base config
# ---------------------------------------------------------------------------------------------------------------


def _is_truthy(value: Any) -> bool:
  return bool(value)


# ---------------------------------------------------------------------------------------------------------------
# Field type checks (from the dataclass annotations)
# ---------------------------------------------------------------------------------------------------------------

_FLOAT32_MAX = float(np.finfo(np.float32).max)
_UNION_TYPES = (Union, types.UnionType)  # Optional[X] and X | None
_TYPE_HINTS: dict[type, Optional[dict[str, Any]]] = {}


def _field_types(cls: type) -> Optional[dict[str, Any]]:
  """The evaluated annotations of a config class (None when they cannot be evaluated: then nothing is checked)."""
  if cls not in _TYPE_HINTS:
    try:
      _TYPE_HINTS[cls] = typing.get_type_hints(cls)
    except Exception:  # an annotation naming something out of scope: skip the type check for this class
      _TYPE_HINTS[cls] = None
  return _TYPE_HINTS[cls]


def _conforms(value: Any, tp: Any) -> bool:
  """Whether a (frozen) value fits an annotation: bool is not an int, an int is a float, a dict is a FrozenDict."""
  if tp is Any:
    return True
  if tp is type(None) or tp is None:
    return value is None
  origin = typing.get_origin(tp)
  if origin in _UNION_TYPES:
    return any(_conforms(value, t) for t in typing.get_args(tp))
  if origin is tuple:
    args = typing.get_args(tp)
    if not isinstance(value, tuple):
      return False
    if len(args) == 2 and args[1] is Ellipsis:
      return all(_conforms(v, args[0]) for v in value)
    return len(value) == len(args) and all(_conforms(v, t) for v, t in zip(value, args))
  # values are frozen: a list arrives as a tuple, a dict as a FrozenDict
  if origin in (list, set, frozenset) or tp in (list, set, frozenset):
    args = typing.get_args(tp)
    return isinstance(value, tuple) and (not args or all(_conforms(v, args[0]) for v in value))
  if origin in (dict, Mapping) or tp in (dict, Mapping):
    return isinstance(value, Mapping)
  if origin is not None:
    return isinstance(value, origin)
  if tp is bool:
    return isinstance(value, bool)
  if tp is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if tp is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if isinstance(tp, type):
    return isinstance(value, tp)
  return True


def _describe_type(tp: Any, plural: bool = False) -> str:
  """An annotation in words, as a JSON user reads it: ``Optional[tuple[str, ...]]`` -> "a list of strings or null"."""
  if tp is Any:
    return "anything"
  if tp is type(None) or tp is None:
    return "null"
  origin = typing.get_origin(tp)
  if origin in _UNION_TYPES:
    args = typing.get_args(tp)
    if int in args and float in args:
      args = (float,) + tuple(t for t in args if t not in (int, float))
    parts = [_describe_type(t, plural) for t in args if t is not type(None)]
    if type(None) in args:
      parts.append("null")
    return " or ".join(dict.fromkeys(parts))
  if origin is tuple:
    args = typing.get_args(tp)
    if len(args) == 2 and args[1] is Ellipsis:
      return ("lists of " if plural else "a list of ") + _describe_type(args[0], plural=True)
    if len(set(args)) == 1:
      return ("lists of " if plural else "a list of ") + f"{len(args)} " + _describe_type(args[0], plural=True)
    return ("lists of " if plural else "a list of ") + f"({', '.join(_describe_type(a) for a in args)})"
  if origin in (list, set, frozenset) and typing.get_args(tp):
    return ("lists of " if plural else "a list of ") + _describe_type(typing.get_args(tp)[0], plural=True)
  if origin in (dict, Mapping) or tp in (dict, Mapping):
    return "dicts" if plural else "a dict"
  singular = {bool: "true or false", int: "an integer", float: "a number", str: "a string", FrozenDict: "a dict"}
  many = {bool: "booleans", int: "integers", float: "numbers", str: "strings", FrozenDict: "dicts"}
  if tp in singular:
    return many[tp] if plural else singular[tp]
  name = getattr(tp, "__name__", str(tp))
  return f"{name} values" if plural else f"a {name}"


def _type_name(value: Any) -> str:
  names = {
    bool: "a boolean",
    int: "an integer",
    float: "a float",
    str: "a string",
    tuple: "a list",
    FrozenDict: "a dict",
    type(None): "null",
  }
  return names.get(type(value), type(value).__name__)


def _check_regex(field: str, pattern: str, regex: Optional[str] = None) -> None:
  """Raise :class:`InvalidConfigError` naming ``field`` if ``regex`` (default: ``pattern``) does not compile."""
  for candidate in (pattern, regex):
    if candidate is None:
      continue
    try:
      re.compile(candidate)
    except re.error as e:
      raise InvalidConfigError(f"`{field}`: {pattern!r} is not a valid regular expression ({e})") from None


def _check_finite_number(field: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ConfigTypeError(f"`{field}` must be a number, got {_show(value)} ({_type_name(value)})")
  if not math.isfinite(value) or abs(value) > _FLOAT32_MAX:
    raise InvalidConfigError(
      f"`{field}` must be a finite number within float32's range (|x| <= {_FLOAT32_MAX:.3g}), got {value!r}: "
      f"the adapter's output would be inf or NaN"
    )


def _is_not_none(value: Any) -> bool:
  return value is not None


@dataclasses.dataclass(frozen=True, kw_only=True)
class PeftConfig:
  """Fields shared by PEFT's adapter configs.

  Subclasses set class-level metadata:

  * ``peft_absent_fields``: fields of this base class that the PEFT config class does not have; they are not
    written by :func:`config_to_dict` and are treated as unknown keys by :func:`build_config`.
  * ``not_serialized_fields``: fields PEFT drops when saving (e.g. LoRA's ``runtime_config``).
  * ``unsupported_fields``: field name -> predicate telling whether the value turns on a feature jpeft does not
    implement; such a value raises :class:`UnsupportedConfigError`.
  """

  peft_type: Optional[str] = None
  task_type: Optional[str] = None
  base_model_name_or_path: Optional[str] = None
  revision: Optional[str] = None
  inference_mode: bool = False
  peft_version: Optional[str] = None
  auto_mapping: Optional[FrozenDict] = None
  target_modules: Optional[Union[tuple[str, ...], str]] = None
  exclude_modules: Optional[Union[tuple[str, ...], str]] = None
  layers_to_transform: Optional[Union[tuple[int, ...], int]] = None
  layers_pattern: Optional[Union[tuple[str, ...], str]] = None
  modules_to_save: Optional[tuple[str, ...]] = None

  peft_absent_fields: ClassVar[frozenset[str]] = frozenset()
  not_serialized_fields: ClassVar[frozenset[str]] = frozenset()
  unsupported_fields: ClassVar[Mapping[str, Callable[[Any], bool]]] = {}

  def __post_init__(self) -> None:
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      frozen = _freeze(value)
      if frozen is not value:
        object.__setattr__(self, f.name, frozen)
    self._check_peft_type()
    self._check_types()
    self._check_common()
    self.validate()
    self._check_unsupported()

  # -- hooks --------------------------------------------------------------------------------------------------

  def validate(self) -> None:
    """Method-specific checks (the errors PEFT itself raises). Runs before the unsupported-feature checks."""

  # -- checks -------------------------------------------------------------------------------------------------

  def _set(self, name: str, value: Any) -> None:
    object.__setattr__(self, name, _freeze(value))

  def _check_peft_type(self) -> None:
    expected = type(self).__dataclass_fields__["peft_type"].default
    if expected is None:
      return
    if self.peft_type is None:
      self._set("peft_type", expected)
    elif self.peft_type != expected:
      raise InvalidConfigError(f"{type(self).__name__} has peft_type {expected!r}, got {_show(self.peft_type)}")

  def _check_types(self) -> None:
    """Every field against its annotation; the error names the field, the expected type and the value."""
    hints = _field_types(type(self))
    if hints is None:
      return
    for f in dataclasses.fields(self):
      tp = hints.get(f.name)
      if tp is None or f.name == "peft_type":
        continue
      value = getattr(self, f.name)
      if not _conforms(value, tp):
        raise ConfigTypeError(
          f"{self.peft_type} config field `{f.name}` must be {_describe_type(tp)}, got {_show(value)} "
          f"({_type_name(value)})"
        )

  def _check_common(self) -> None:
    if self.task_type is not None and self.task_type not in TASK_TYPES:
      raise InvalidConfigError(
        f"Invalid task type: '{self.task_type}' (`task_type`). Must be one of the following task types: "
        f"{', '.join(TASK_TYPES)}."
      )
    for name in ("target_modules", "exclude_modules"):
      value = getattr(self, name)
      if value is not None and not isinstance(value, (str, tuple)):
        raise ConfigTypeError(f"`{name}` must be a str, a list of str or None, got {_show(value)}")
      if isinstance(value, tuple) and not all(isinstance(v, str) for v in value):
        raise ConfigTypeError(f"`{name}` must contain only strings, got {_show(value)}")
      if isinstance(value, str):  # PEFT re.fullmatch-es a str against every module name
        _check_regex(name, value)
    ltt = self.layers_to_transform
    if ltt is not None:
      items = ltt if isinstance(ltt, tuple) else (ltt,)
      if not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
        raise ConfigTypeError(f"`layers_to_transform` must be an int or a list of ints, got {_show(ltt)}")
    if self.layers_pattern is not None:
      patterns = (self.layers_pattern,) if isinstance(self.layers_pattern, str) else self.layers_pattern
      if not isinstance(patterns, tuple) or not all(isinstance(p, str) for p in patterns):
        raise ConfigTypeError(f"`layers_pattern` must be a str or a list of str, got {_show(self.layers_pattern)}")
      for p in patterns:  # PEFT matches rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\."
        _check_regex("layers_pattern", p, rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.")
    if self.modules_to_save is not None:
      if isinstance(self.modules_to_save, str) or not all(isinstance(m, str) for m in self.modules_to_save):
        raise ConfigTypeError(f"`modules_to_save` must be a list of str, got {_show(self.modules_to_save)}")
      if any(not m for m in self.modules_to_save):  # "" would select every module (PEFT then fails on a ModuleList)
        raise InvalidConfigError(
          f"`modules_to_save` entries must be non-empty module names, got {_show(self.modules_to_save)}"
        )
      for m in self.modules_to_save:  # PEFT keeps targets out of modules_to_save with rf"(^|.*\.){m}($|\..*)"
        _check_regex("modules_to_save", m, rf"(^|.*\.){m}($|\..*)")
    if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
      raise InvalidConfigError("`layers_to_transform` cannot be used when `target_modules` is a str.")
    if isinstance(self.target_modules, str) and self.layers_pattern is not None:
      raise InvalidConfigError("`layers_pattern` cannot be used when `target_modules` is a str.")
    if self.layers_pattern and self.layers_to_transform is None:
      raise InvalidConfigError("When `layers_pattern` is specified, `layers_to_transform` must also be specified. ")

  def _check_unsupported(self) -> None:
    for name, is_active in type(self).unsupported_fields.items():
      value = getattr(self, name)
      if is_active(value):
        default = _field_default(type(self), name)
        raise UnsupportedConfigError(
          f"{self.peft_type} config field `{name}`={_show(value)} is not supported by jpeft "
          f"(only the default {_show(default)} is)."
        )

  # -- conveniences -------------------------------------------------------------------------------------------

  def replace(self, **changes: Any) -> "PeftConfig":
    """A copy with some fields changed (validated again)."""
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    return config_to_dict(self)


def _field_default(cls: type, name: str) -> Any:
  f = cls.__dataclass_fields__[name]
  if f.default is not dataclasses.MISSING:
    return f.default
  if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
    return f.default_factory()  # type: ignore[misc]
  return None


# ---------------------------------------------------------------------------------------------------------------
# dict / JSON conversion
# ---------------------------------------------------------------------------------------------------------------


def _serialized_fields(cls: type[PeftConfig]) -> list[str]:
  return [
    f.name
    for f in dataclasses.fields(cls)
    if f.name not in cls.peft_absent_fields and f.name not in cls.not_serialized_fields
  ]


def check_config_dict(d: Any) -> str:
  """The ``peft_type`` of an adapter config dict; raises :class:`InvalidConfigError` when there is none."""
  if not isinstance(d, Mapping):
    raise InvalidConfigError(f"an adapter config must be a JSON object / dict, got {type(d).__name__}")
  if "peft_type" not in d or d["peft_type"] is None:
    raise InvalidConfigError(
      "The adapter config has no `peft_type` key (the one key PEFT requires); cannot tell which method it is."
    )
  peft_type = _freeze(d["peft_type"])
  if not isinstance(peft_type, str):
    raise ConfigTypeError(
      f"`peft_type` must be a string such as 'LORA', got {_show(peft_type)} ({_type_name(peft_type)})"
    )
  return peft_type


def build_config(cls: type[PeftConfig], d: Mapping[str, Any]) -> PeftConfig:
  """``cls`` from an adapter config dict, as PEFT's ``from_peft_type`` builds it.

  Keys that are not fields of the PEFT config are ignored with a warning (forward compatibility, as in PEFT);
  missing keys take PEFT's defaults.
  """
  known = {f.name for f in dataclasses.fields(cls)} - cls.peft_absent_fields
  kwargs = {k: v for k, v in d.items() if k in known}
  unknown = sorted((k for k in d if k not in known), key=str)
  if unknown:
    logging.warning(
      f"Unexpected keys {unknown} for {cls.__name__}; they are ignored. The config was probably written by a "
      f"newer PEFT version."
    )
  return cls(**kwargs)


def config_to_dict(config: PeftConfig) -> dict[str, Any]:
  """The JSON-ready dict PEFT's ``to_dict`` would give: tuples become lists, FrozenDicts become dicts."""
  cls = type(config)
  return {name: _thaw(getattr(config, name)) for name in _serialized_fields(cls)}


def _installed_peft_version() -> str:
  try:
    return importlib.metadata.version("peft")
  except importlib.metadata.PackageNotFoundError:
    return DEFAULT_PEFT_VERSION


def config_json(config: PeftConfig) -> str:
  """The text of ``adapter_config.json`` as ``PeftModel.save_pretrained`` writes it (inference_mode true)."""
  output = config_to_dict(config)
  output["inference_mode"] = True
  if output.get("peft_version") is None:
    output["peft_version"] = _installed_peft_version()
  return json.dumps(output, indent=2, sort_keys=True)


def save_config(config: PeftConfig, folder: Union[str, os.PathLike]) -> str:
  """Writes ``folder/adapter_config.json`` as ``PeftModel.save_pretrained`` does; returns the file path.

  The file is written to a temporary name and renamed, so an existing config is replaced whole or not at all.
  """
  folder = os.fspath(folder)
  if os.path.isfile(folder):
    raise InvalidConfigError(f"Provided path ({folder}) should be a directory, not a file")
  text = config_json(config)
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, CONFIG_NAME)
  write_atomic(path, text.encode())
  return path


def write_atomic(path: str, data: bytes) -> None:
  """Writes ``data`` to a temporary file beside ``path``, then renames it over ``path``: a reader (or a crash)
  sees the old file or the new one, never half of one."""
  tmp = temp_path_for(path)
  try:
    with open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def temp_path_for(path: str) -> str:
  """A fresh, hidden file name in ``path``'s folder (so that ``os.replace`` onto ``path`` is atomic)."""
  folder, name = os.path.split(path)
  fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder or ".")
  os.close(fd)
  return tmp


def read_config_file(path: Union[str, os.PathLike]) -> tuple[str, dict]:
  """``(file, dict)`` of an adapter config in a folder (its ``adapter_config.json``) or at a JSON file path.

  Raises :class:`FileMissingError` (a ``FileNotFoundError``) when there is no config file, and otherwise an
  :class:`InvalidConfigError` whose message starts with the file's path.
  """
  path = os.fspath(path)
  file = os.path.join(path, CONFIG_NAME) if os.path.isdir(path) else path
  if not os.path.isfile(file):
    if os.path.isdir(path):
      raise FileMissingError(f"No {CONFIG_NAME} in folder {path!r} (looked for {file!r})")
    raise FileMissingError(f"Adapter config not found: {file!r}")
  try:
    with open(file, encoding="utf-8") as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise InvalidConfigError(f"{file}: invalid JSON ({e})") from None
  except UnicodeDecodeError as e:
    raise InvalidConfigError(f"{file}: not a UTF-8 JSON text ({e})") from None
  except RecursionError:
    raise InvalidConfigError(f"{file}: invalid JSON (nested too deeply)") from None
  if not isinstance(data, dict):
    raise InvalidConfigError(f"{file}: expected a JSON object, got {type(data).__name__}")
  return file, data


# ---------------------------------------------------------------------------------------------------------------
# Per-module patterns (rank_pattern, alpha_pattern, n_frequency_pattern, ...)
# ---------------------------------------------------------------------------------------------------------------


def get_pattern_key(pattern_keys, key: str) -> Optional[str]:
  """The first pattern (in order) ``p`` with ``re.match(rf"(.*\\.)?({p})$", key)``, else None."""
  for p in pattern_keys:
    if re.match(rf"(.*\.)?({p})$", key):
      return p
  return None


def resolve_pattern(patterns: Optional[Mapping[str, Any]], key: str, default: Any) -> Any:
  """The value of the first matching pattern of ``patterns`` (see :func:`get_pattern_key`), else ``default``."""
  if not patterns:
    return default
  p = get_pattern_key(patterns.keys(), key)
  return default if p is None else patterns[p]


# ---------------------------------------------------------------------------------------------------------------
# Checks the method configs share (each method's config class calls these from its ``validate``)
# ---------------------------------------------------------------------------------------------------------------

show = _show
type_name = _type_name
check_regex = _check_regex
check_finite_number = _check_finite_number
is_truthy = _is_truthy
is_not_none = _is_not_none
field_default = _field_default


def check_int(field: str, value: Any, *, minimum: Optional[int] = None, what: str = "") -> None:
  """``value`` is an int (not a bool) and at least ``minimum``; the error names ``field``."""
  if isinstance(value, bool) or not isinstance(value, int):
    raise ConfigTypeError(f"`{field}` should be an int, got {_show(value)} ({_type_name(value)})")
  if minimum is not None and value < minimum:
    bound = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    raise InvalidConfigError(f"`{field}` should be {bound}{what} but the value passed is {value}")


def check_bias(value, only: Optional[str] = None) -> None:
  """PEFT's ``bias`` rule: ``"none"``, ``"all"``, and ``only`` (e.g. ``"lora_only"``) or, without ``only``, any value
  ending in ``"_only"`` (the tuners that test ``bias.endswith("_only")``)."""
  allowed = value in ("none", "all") or (value == only if only is not None else value.endswith("_only"))
  if not allowed:
    expected = repr(only) if only is not None else "end in '_only'"
    raise InvalidConfigError(
      f"Requested bias: {show(value)}, is not implemented (`bias` must be 'none', 'all' or {expected})."
    )


def check_probability(field: str, p: Any) -> None:
  """A dropout probability in ``[0, 1)``; the error names ``field`` and says why 1 is refused."""
  if isinstance(p, bool) or not isinstance(p, (int, float)):
    raise ConfigTypeError(f"`{field}` must be a number in [0, 1), got {_show(p)} ({_type_name(p)})")
  if not 0.0 <= p < 1.0:  # also refuses NaN
    why = (
      "a dropout of 1 zeroes every input of the adapter, so nothing trains (and the kept inputs' rescaling "
      "1 / (1 - p) divides by zero, giving NaN gradients)"
      if p == 1.0
      else "it is a probability"
    )
    raise InvalidConfigError(
      f"`{field}` (the dropout probability) has to be in [0, 1), i.e. 0 <= {field} < 1, but got {p!r}: {why}."
    )


def check_pattern_dict(field: str, value: Any, check_value: Callable[[str, Any], None]) -> FrozenDict:
  """A ``rank_pattern``-style dict: string keys that compile as PEFT's suffix match, each value checked."""
  if value is None:
    return FrozenDict()
  if not isinstance(value, FrozenDict):
    raise ConfigTypeError(f"`{field}` must be a dict, got {_show(value)}")
  for key, v in value.items():
    if not isinstance(key, str):
      raise ConfigTypeError(f"`{field}` keys must be strings (module name patterns), got {key!r}")
    _check_regex(field, key, rf"(.*\.)?({key})$")  # get_pattern_key's match
    check_value(f"{field}[{key!r}]", v)
  return value
