"""The table of PEFT methods jpeft implements, and reading adapter configs by their ``peft_type``.

Importing this module imports every method file (:mod:`jpeft.methods`); each registers its config class and its
:class:`jpeft.methods.base.Method` at once (:func:`jpeft.methods.base.register`). There is no other registry and no
deferred import: :mod:`jpeft.core`, :mod:`jpeft.checkpoint` and the experiment code import this module at the top.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Union

import jpeft.methods  # noqa: F401  (every method registers itself on import)
from jpeft import config as config_lib
from jpeft.methods import base

__all__ = ["config_from_dict", "get_config_class", "get_method", "load_config", "registered_peft_types"]


def registered_peft_types() -> tuple[str, ...]:
  """The peft_type strings jpeft implements, sorted."""
  return tuple(sorted(base.table()))


def get_method(peft_type: str) -> base.Method:
  """The registered :class:`~jpeft.methods.base.Method`; raises :class:`UnsupportedConfigError` naming what is
  supported when there is none (with PEFT's upper-case hint for ``"lora"``)."""
  methods = base.table()
  if isinstance(peft_type, str) and peft_type in methods:
    return methods[peft_type]
  supported = ", ".join(registered_peft_types()) or "(none)"
  types = config_lib.PEFT_METHOD_TYPES
  if isinstance(peft_type, str) and peft_type != peft_type.upper() and peft_type.upper() in types:
    raise config_lib.UnsupportedConfigError(
      f"Unknown peft_type {peft_type!r}: PEFT's peft_type values are upper case (did you mean "
      f"{peft_type.upper()!r}?). Supported peft_type values: {supported}."
    )
  if peft_type in types:
    raise config_lib.UnsupportedConfigError(
      f"peft_type {peft_type!r} is a PEFT method that is not (yet) implemented in jpeft. "
      f"Supported peft_type values: {supported}."
    )
  raise config_lib.UnsupportedConfigError(
    f"Unknown peft_type {peft_type!r}: it is neither a PEFT method nor registered in jpeft. "
    f"Supported peft_type values: {supported}."
  )


def get_config_class(peft_type: str) -> type[config_lib.PeftConfig]:
  """The config class registered for ``peft_type`` (the same errors as :func:`get_method`)."""
  return get_method(peft_type).config_class


def config_from_dict(d: Mapping[str, Any]) -> config_lib.PeftConfig:
  """The config class named by ``d["peft_type"]`` built from ``d`` (PEFT's ``PeftConfig.from_peft_type``).

  Keys that are not fields of the PEFT config are ignored with a warning (forward compatibility, as in PEFT);
  missing keys take PEFT's defaults.
  """
  peft_type = config_lib.check_config_dict(d)
  return config_lib.build_config(get_config_class(peft_type), d)


def load_config(path: Union[str, os.PathLike]) -> config_lib.PeftConfig:
  """Reads an adapter config from a folder (its ``adapter_config.json``) or from a JSON file path.

  Raises :class:`FileMissingError` (a ``FileNotFoundError``) when there is no config file, and otherwise a
  :class:`JpeftError` whose message starts with the file's path.
  """
  file, data = config_lib.read_config_file(path)
  try:
    return config_from_dict(data)
  except config_lib.JpeftError as e:
    raise type(e)(f"{file}: {e}") from None
