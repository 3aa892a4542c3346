"""Bad input, generated: every mutated PEFT config and every mutated adapter folder gives a jpeft error naming the
problem -- never a foreign exception (KeyError, TypeError, safetensors' or json's own error), never a NaN, never
a half-written adapter folder.

Where the inputs come from:

* configs: the ``adapter_config.json`` files PEFT itself writes (``peft.LoraConfig(...).save_pretrained``), the
  suite's ``experiments/lora/*/adapter_config.json`` and PEFT's method-comparison LoRA experiments (``shared/``);
  each is mutated once (a field set to a value of the wrong type or out of range, unknown keys, conflicting or
  empty target lists, an unknown ``peft_type``, a dropped key), then parsed, resolved, initialised on a tiny
  random Llama, saved and loaded back;
* adapter folders: real folders saved by jpeft on that tiny Llama (LoRA, DoRA, embedding LoRA with its saved base
  layer, ``modules_to_save``, bf16 tensors), mutated once (truncated or garbled safetensors, another dtype or
  shape, an extra or missing tensor, NaN/inf, a missing, invalid or mismatching ``adapter_config.json``);
* failed saves: adapters with a bad tensor, and a disk that fails halfway through the write, into a new folder
  and over an existing adapter.

Figures (``pytest -s tests/test_bad_input.py`` prints them; hypothesis is derandomized, so they are fixed): 738
distinct bad inputs tried (278 configs, 150 target lists, 243 adapter folders, 60 failed saves, 7 launcher runs).
The same generators at the same example counts, run against the library as it was before this file (with
ValueError standing in for JpeftError, and counting every failing example instead of stopping at the first),
failed 195 examples, which come down to 14 distinct bugs, each fixed in the library:

 1. a norm in target_modules crashed in init ("not enough values to unpack"): methods declare the module kinds
    they support (LoRA: linear, embedding); a norm target raises UnsupportedTargetError naming module and kind;
 2. wrong field types were accepted silently (``use_dora: {}``, ``inference_mode: 8``, ``qalora_group_size:
    8.5``, ``eva_config: 8``) or crashed (``modules_to_save: false``: TypeError "'bool' object is not
    iterable"): every field is checked against its declared type (ConfigTypeError names field, type, value);
 3. lora_dropout=1.0 was accepted (NaN gradients), and out-of-range dropouts' message did not name the field;
 4. lora_alpha / alpha_pattern NaN, inf or beyond float32 were accepted (NaN DoRA magnitudes, NaN outputs);
 5. invalid regular expressions (target_modules / exclude_modules strings, rank/alpha_pattern keys,
    layers_pattern, modules_to_save) leaked re.error from inside matching: refused at config time;
 6. rank_pattern / alpha_pattern values "4", 2.5, "16" crashed with foreign TypeErrors (jax shapes, '<=' of str
    and int, str / float); a rank of 0 passed when its pattern matched no target: each value is checked;
 7. the task_type error and DoRA's megatron error did not name the field (``task_type``, ``megatron_config``);
 8. a module in both target_modules and modules_to_save (``modules_to_save: ["proj"]``) was adapted, then
    silently replaced by its full copy; PEFT refuses it, and so does jpeft now (ConflictingTargetsError);
 9. integer, unsigned and bool tensors in adapter_model.safetensors were silently cast to float: refused;
10. NaN / inf tensors in adapter_model.safetensors were loaded (every output NaN): refused, naming the tensor;
11. an adapter_config.json that is not UTF-8 leaked UnicodeDecodeError: InvalidConfigError naming the file;
12. no hierarchy: jpeft's own type errors were plain TypeErrors and missing files plain FileNotFoundErrors: one
    root, ``jpeft.config.JpeftError`` (a ValueError); ConfigTypeError is also a TypeError, FileMissingError
    also a FileNotFoundError, so existing ``except`` clauses still work;
13. save_pretrained wrote adapters it cannot load (NaN, integer, bool or list tensors, an empty module) or
    crashed with foreign errors (SafetensorError for a str, AttributeError for a list adapter): checked first;
14. save_pretrained was not atomic: a failure halfway (a full disk) left a half-written adapter and a replaced
    config: both files go to temporary files renamed into place, and a folder the call created is removed.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import hashlib
import io
import json
import logging
import math
import os
import tempfile
from pathlib import Path
from unittest import mock

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import peft  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load as load_safetensors_bytes  # noqa: E402
from safetensors.torch import save as save_safetensors_bytes  # noqa: E402

from backends.tiny import make_tiny_llama  # noqa: E402
from jpeft import registry
from jpeft.methods import lora as lora_lib
from jpeft import checkpoint, core, train  # noqa: E402
from jpeft import config as config_lib  # noqa: E402
from jpeft import targets as targets_lib  # noqa: E402
from jpeft.models import load_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
JPEFT_ERROR = config_lib.JpeftError
WEIGHTS = checkpoint.ADAPTER_WEIGHTS
CONFIG = checkpoint.ADAPTER_CONFIG

# max_examples are sized so that the whole file takes ~40 s on a 2-core CPU; derandomize: the same inputs in CI
SETTINGS = dict(
  deadline=None,
  derandomize=True,
  database=None,
  print_blob=False,
  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

# distinct inputs tried, per family (a digest of each input)
TRIED: dict[str, set[str]] = collections.defaultdict(set)


def _note(family: str, payload) -> None:
  if not isinstance(payload, bytes):
    payload = json.dumps(payload, sort_keys=True, default=repr).encode()
  TRIED[family].add(hashlib.sha256(payload).hexdigest())


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
  yield
  total = sum(len(v) for v in TRIED.values())
  parts = ", ".join(f"{len(v)} {k}" for k, v in sorted(TRIED.items()))
  print(f"\n[test_bad_input] distinct bad inputs tried: {total} ({parts})")


# ------------------------------------------------------------------------------------------------------------
# the tiny model (once per module) and the seed configs
# ------------------------------------------------------------------------------------------------------------


class Tiny(tuple):
  """(folder, LlamaConfig, params) of the tiny model; a short repr for hypothesis' reports."""

  def __repr__(self) -> str:
    return f"Tiny({self[0]!r})"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  folder = make_tiny_llama(str(tmp_path_factory.mktemp("tiny")))
  model_config, params = load_model(folder)
  return Tiny((folder, model_config, params))


def _peft_written_configs() -> list[tuple[str, dict]]:
  """adapter_config.json as PEFT 0.21.2 writes it, for a few typical LoraConfigs."""
  kwargs = {
    "peft-default": dict(),
    "peft-qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    "peft-all-linear": dict(r=8, target_modules="all-linear", lora_dropout=0.1, use_rslora=True),
    "peft-dora-patterns": dict(
      r=4,
      target_modules=["q_proj", "v_proj", "down_proj"],
      rank_pattern={"v_proj": 2},
      alpha_pattern={"q_proj": 16},
      use_dora=True,
    ),
    "peft-layers": dict(
      r=4,
      target_modules=["q_proj", "k_proj"],
      layers_to_transform=[1],
      layers_pattern="layers",
      modules_to_save=["lm_head"],
    ),
    "peft-embedding": dict(
      r=2,
      target_modules=["embed_tokens", "q_proj"],
      init_lora_weights="gaussian",
      exclude_modules=["model.layers.0.self_attn.q_proj"],
    ),
  }
  out = []
  with tempfile.TemporaryDirectory() as d:
    for name, kw in kwargs.items():
      peft.LoraConfig(**kw).save_pretrained(d)
      with open(os.path.join(d, CONFIG)) as f:
        out.append((name, json.load(f)))
  return out


def _experiment_configs() -> list[tuple[str, dict]]:
  roots = [
    REPO / "experiments" / "lora",
    REPO.parent / "shared" / "reference" / "peft-method-comparison" / "experiments" / "lora",
  ]
  out = []
  for root in roots:
    for path in sorted(root.glob("*/adapter_config.json")):
      data = json.loads(path.read_text())
      try:
        registry.config_from_dict(data)
      except config_lib.UnsupportedConfigError:  # kasa, bdlora, mica: refused as a whole, no use as a seed
        continue
      out.append((f"{root.parent.parent.name}:{path.parent.name}", data))
  return out


SEEDS = _peft_written_configs() + _experiment_configs()
FIELDS = sorted(f.name for f in lora_lib.LoraConfig.__dataclass_fields__.values() if f.name != "runtime_config")


def test_seed_configs_load_as_peft_reads_them():
  """The starting points are valid: jpeft and PEFT read each the same way."""
  assert len(SEEDS) >= 12
  for name, data in SEEDS:
    ours = registry.config_from_dict(data)
    theirs = peft.LoraConfig.from_peft_type(**{k: v for k, v in data.items() if k != "runtime_config"})
    for field in ("r", "lora_alpha", "lora_dropout", "use_dora", "use_rslora", "bias", "init_lora_weights"):
      assert getattr(ours, field) == getattr(theirs, field), (name, field)
    got, expected = ours.target_modules, theirs.target_modules
    assert (sorted(got) if isinstance(got, tuple) else got) == (
      sorted(expected) if isinstance(expected, (set, list)) else expected
    ), name


# ------------------------------------------------------------------------------------------------------------
# the type oracle: what JSON PEFT's LoraConfig declares for each field (independent of jpeft's annotations)
# ------------------------------------------------------------------------------------------------------------

_DICT_OR_NULL = ("dict", "null")
FIELD_TYPES = {
  "task_type": ("str", "null"),
  "base_model_name_or_path": ("str", "null"),
  "revision": ("str", "null"),
  "peft_version": ("str", "null"),
  "megatron_core": ("str", "null"),
  "inference_mode": ("bool",),
  "fan_in_fan_out": ("bool",),
  "use_rslora": ("bool",),
  "use_dora": ("bool",),
  "use_qalora": ("bool",),
  "lora_bias": ("bool",),
  "ensure_weight_tying": ("bool",),
  "r": ("int",),
  "qalora_group_size": ("int",),
  "lora_alpha": ("number",),
  "lora_dropout": ("number",),
  "bias": ("str",),
  "init_lora_weights": ("bool", "str"),
  "target_modules": ("str", "list[str]", "null"),
  "exclude_modules": ("str", "list[str]", "null"),
  "layers_to_transform": ("int", "list[int]", "null"),
  "layers_pattern": ("str", "list[str]", "null"),
  "modules_to_save": ("list[str]", "null"),
  "rank_pattern": _DICT_OR_NULL,
  "alpha_pattern": _DICT_OR_NULL,
  "loftq_config": _DICT_OR_NULL,
  "auto_mapping": _DICT_OR_NULL,
  "megatron_config": _DICT_OR_NULL,
  "eva_config": _DICT_OR_NULL,
  "corda_config": _DICT_OR_NULL,
  "lora_ga_config": _DICT_OR_NULL,
  "velora_config": _DICT_OR_NULL,
  "monteclora_config": _DICT_OR_NULL,
  "use_bdlora": _DICT_OR_NULL,
  "arrow_config": _DICT_OR_NULL,
  "kasa_config": _DICT_OR_NULL,
  "alora_invocation_tokens": ("list[int]", "null"),
  "trainable_token_indices": ("list[int]", "dict", "null"),
  "layer_replication": ("list[pair]", "null"),
  "target_parameters": ("list[str]", "null"),
}


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _fits(value, kinds) -> bool:
  checks = {
    "null": lambda v: v is None,
    "bool": lambda v: isinstance(v, bool),
    "int": _is_int,
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "dict": lambda v: isinstance(v, dict),
    "list[str]": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "list[int]": lambda v: isinstance(v, list) and all(_is_int(x) for x in v),
    "list[pair]": lambda v: (
      isinstance(v, list) and all(isinstance(x, list) and len(x) == 2 and all(map(_is_int, x)) for x in v)
    ),
  }
  return any(checks[k](value) for k in kinds)


VALUE_POOL = [
  "8",
  "",
  "true",
  "none",
  "q_proj",
  8,
  0,
  -1,
  8.5,
  1e-3,
  True,
  False,
  None,
  [],
  ["q_proj"],
  [1, 2],
  ["q_proj", 3],
  [[0, 1]],
  [None],
  {},
  {"q_proj": 1},
  {"a": {"b": []}},
]

# (changes, tokens the error must name, when must it fail): values of the right type but out of range or meaning
OUT_OF_RANGE = [
  (dict(r=0), ["`r`"]),
  (dict(r=-4), ["`r`"]),
  (dict(lora_alpha=math.nan), ["lora_alpha"]),
  (dict(lora_alpha=math.inf), ["lora_alpha"]),
  (dict(lora_alpha=-math.inf), ["lora_alpha"]),
  (dict(lora_alpha=1e39), ["lora_alpha"]),
  (dict(lora_dropout=1.0), ["lora_dropout", "nothing trains"]),
  (dict(lora_dropout=1), ["lora_dropout"]),
  (dict(lora_dropout=1.5), ["lora_dropout"]),
  (dict(lora_dropout=-0.1), ["lora_dropout"]),
  (dict(lora_dropout=math.nan), ["lora_dropout"]),
  (dict(lora_dropout=math.inf), ["lora_dropout"]),
  (dict(rank_pattern={"q_proj": 0}), ["rank_pattern", "q_proj"]),
  (dict(rank_pattern={"q_proj": -3}), ["rank_pattern", "q_proj"]),
  (dict(rank_pattern={"q_proj": 2.5}), ["rank_pattern", "q_proj"]),
  (dict(rank_pattern={"q_proj": "4"}), ["rank_pattern", "q_proj"]),
  (dict(rank_pattern={"(": 4}), ["rank_pattern", "regular expression"]),
  (dict(alpha_pattern={"q_proj": math.nan}), ["alpha_pattern", "q_proj"]),
  (dict(alpha_pattern={"v_proj": "16"}), ["alpha_pattern", "v_proj"]),
  (dict(alpha_pattern={"[": 16}), ["alpha_pattern", "regular expression"]),
  (dict(bias="some"), ["bias"]),
  (dict(bias="ALL"), ["bias"]),
  (dict(init_lora_weights="bogus"), ["init_lora_weights"]),
  (dict(init_lora_weights="PiSSA"), ["init_lora_weights"]),
  (dict(init_lora_weights="eva"), ["init_lora_weights"]),
  (dict(task_type="NOT_A_TASK"), ["task_type"]),
  (dict(task_type="causal_lm"), ["task_type"]),
  (dict(target_modules="("), ["target_modules", "regular expression"]),
  (dict(target_modules="*_proj"), ["target_modules", "regular expression"]),
  (dict(exclude_modules="[mlp"), ["exclude_modules", "regular expression"]),
  (dict(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="(layers"), ["layers_pattern"]),
  (dict(modules_to_save=["lm_head("]), ["modules_to_save", "regular expression"]),
  (dict(modules_to_save=[""]), ["modules_to_save"]),
  (dict(use_qalora=True), ["use_qalora"]),
  (dict(lora_bias=True), ["lora_bias"]),
  (dict(layer_replication=[[0, 1], [1, 2]]), ["layer_replication"]),
  (dict(target_parameters=["mlp.gate_proj.weight"]), ["target_parameters"]),
  (dict(trainable_token_indices=[1, 2]), ["trainable_token_indices"]),
  (dict(use_bdlora={"nblocks": 2}), ["use_bdlora"]),
  (dict(kasa_config={}), ["kasa_config"]),
  (dict(megatron_config={"tensor_model_parallel_size": 2}), ["megatron_config"]),
  (dict(init_lora_weights="pissa", r=64, target_modules=["k_proj"]), ["`r`", "k_proj"]),
]

# conflicting, empty or impossible targeting: accepted as a config, refused when matched against the model
CONFLICTS = [
  (dict(target_modules=["q_proj"], exclude_modules=["q_proj"]), ["excluded", "exclude_modules"]),
  (dict(target_modules="all-linear", exclude_modules=".*"), ["excluded"]),
  (dict(target_modules=["lm_head"], modules_to_save=["lm_head"]), ["excluded", "modules_to_save"]),
  (dict(target_modules=["q_proj", "v_proj"], modules_to_save=["proj"]), ["modules_to_save", "target_modules"]),
  (dict(target_modules=["q_proj"], layers_to_transform=[5]), ["layers_to_transform"]),
  (dict(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="blocks"), ["layers_pattern"]),
  (dict(target_modules=".*q_proj", layers_to_transform=[0]), ["layers_to_transform", "target_modules"]),
  (dict(target_modules=["q_proj"], layers_pattern="layers", layers_to_transform=None), ["layers_to_transform"]),
  (dict(target_modules=["model.norm"]), ["model.norm", "norm"]),
  (dict(target_modules=["input_layernorm", "q_proj"]), ["input_layernorm", "norm"]),
  (dict(target_modules=".*norm"), ["norm", "modules_to_save"]),
  (dict(target_modules=["qkv_proj"]), ["qkv_proj", "target_modules"]),
  (dict(target_modules=[]), ["target_modules"]),
  (dict(target_modules=[""]), ["target_modules"]),
  (dict(target_modules=""), ["target_modules"]),
  (dict(target_modules=["Q_PROJ"]), ["Q_PROJ"]),
  (dict(use_dora=True, lora_bias=True), ["DoRA"]),
  (dict(init_lora_weights="pissa", lora_bias=True), ["lora_bias"]),
  (dict(use_dora=True, target_modules=["embed_tokens"]), ["use_dora", "embed_tokens"]),
]

PEFT_TYPES = ["NOT_A_METHOD", "lora", "Lora", "POLY", "XLORA", "", "LORA ", 5, None, True, ["LORA"], {"LORA": 1}]
UNKNOWN_KEY = st.from_regex(r"[a-z][a-z_]{0,14}", fullmatch=True).filter(lambda k: k not in FIELDS)


@st.composite
def mutated_configs(draw):
  """(label, dict, expectation, tokens): expectation "error" (some jpeft error must name every token), "ok" (must
  load and work) or "either" (a right-typed value: it works, or an error names the field)."""
  name, seed = draw(st.sampled_from(SEEDS))
  data = copy.deepcopy(seed)
  kind = draw(st.sampled_from(["set_field", "out_of_range", "unknown_keys", "conflict", "peft_type", "drop_key"]))
  if kind == "set_field":
    field = draw(st.sampled_from(sorted(FIELD_TYPES)))
    value = draw(st.sampled_from(VALUE_POOL))
    data[field] = copy.deepcopy(value)
    return f"{name}: {field}={value!r}", data, ("either" if _fits(value, FIELD_TYPES[field]) else "error"), [field]
  if kind == "out_of_range":
    changes, tokens = draw(st.sampled_from(OUT_OF_RANGE))
    data.update(copy.deepcopy(changes))
    return f"{name}: {changes}", data, "error", tokens
  if kind == "conflict":  # on the seed's other fields, without its own targeting (which would mask the conflict)
    changes, tokens = draw(st.sampled_from(CONFLICTS))
    for key in ("exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save"):
      data.pop(key, None)
    data.update(copy.deepcopy(changes))
    return f"{name}: {changes}", data, "error", tokens
  if kind == "peft_type":
    value = draw(st.sampled_from(PEFT_TYPES))
    data["peft_type"] = value
    return f"{name}: peft_type={value!r}", data, "error", ["peft_type"]
  if kind == "drop_key":
    key = draw(st.sampled_from(sorted(data)))
    del data[key]
    if key == "peft_type":
      return f"{name}: no peft_type", data, "error", ["peft_type"]
    # PEFT's default takes the key's place; dropping layers_to_transform under a layers_pattern is an error
    return f"{name}: without {key}", data, "either", [key if key != "layers_to_transform" else "layers_"]
  keys = draw(st.lists(UNKNOWN_KEY, min_size=1, max_size=3, unique=True))
  for key in keys:
    data[key] = copy.deepcopy(draw(st.sampled_from(VALUE_POOL)))
  return f"{name}: unknown keys {keys}", data, "ok", keys


@contextlib.contextmanager
def _absl_log():
  stream = io.StringIO()
  handler = logging.StreamHandler(stream)
  logger = logging.getLogger("absl")
  logger.addHandler(handler)
  old = logger.level
  logger.setLevel(logging.WARNING)
  try:
    yield stream
  finally:
    logger.removeHandler(handler)
    logger.setLevel(old)


def _leaves_finite(tree) -> bool:
  return all(bool(np.isfinite(np.asarray(x, np.float32)).all()) for x in jax.tree_util.tree_leaves(tree))


def _exercise(config, tiny, folder: str):
  """init on the tiny model, finite tensors, save, load back equal (raises whatever the library raises)."""
  _, model_config, params = tiny
  adapter, base = core.init(jax.random.key(0), params, config, model_config)
  assert _leaves_finite(adapter)
  checkpoint.save_pretrained(folder, adapter, config, params=base)
  try:
    loaded_config, loaded, _ = checkpoint.load_pretrained(folder, params, model_config)
  except Exception as exc:  # noqa: BLE001 - what jpeft saved, jpeft must load
    raise AssertionError(f"a saved adapter does not load back: {type(exc).__name__}: {exc}") from exc
  assert type(loaded_config) is type(config) and loaded_config.r == config.r
  assert loaded_config.target_modules == config.target_modules
  assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(adapter)
  for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(adapter)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _expect_jpeft_error(exc: BaseException, tokens, label: str) -> None:
  assert isinstance(exc, JPEFT_ERROR), f"{label}: foreign exception {type(exc).__name__}: {exc}"
  message = str(exc)
  missing = [t for t in tokens if t not in message]
  assert not missing, f"{label}: {type(exc).__name__} does not name {missing}: {message}"


def _run_config_case(label, data, expect, tokens, tiny):
  with _absl_log() as log, tempfile.TemporaryDirectory() as tmp:
    try:
      config = registry.config_from_dict(data)
      _exercise(config, tiny, os.path.join(tmp, "adapter"))
    except AssertionError:
      raise
    except Exception as exc:  # noqa: BLE001 - the property: only jpeft errors, naming the problem
      assert expect != "ok", f"{label}: refused a valid config: {type(exc).__name__}: {exc}"
      _expect_jpeft_error(exc, tokens, label)
      return
  assert expect != "error", f"{label}: accepted"
  if expect == "ok":  # unknown keys: ignored (as PEFT does), each named in a warning, the config unchanged
    for key in tokens:
      assert key in log.getvalue(), f"{label}: no warning names {key!r}"
    assert config == registry.config_from_dict({k: v for k, v in data.items() if k not in tokens})


@settings(max_examples=300, **SETTINGS)
@given(case=mutated_configs())
def test_mutated_configs(tiny, case):
  label, data, expect, tokens = case
  _note("configs", data)
  _run_config_case(label, data, expect, tokens, tiny)


TARGET_WORDS = [
  "q_proj",
  "v_proj",
  "down_proj",
  "embed_tokens",
  "lm_head",
  "norm",
  "model.norm",
  "input_layernorm",
  "post_attention_layernorm",
  "mlp",
  "self_attn",
  "layers",
  "model",
  "proj",
  "Q_PROJ",
  "q_proj ",
  "model.layers.0.self_attn.q_proj",
  "model.layers.9.self_attn.q_proj",
  "layers.1.mlp.up_proj",
]


@settings(max_examples=150, **SETTINGS)
@given(
  target=st.one_of(
    st.lists(st.sampled_from(TARGET_WORDS), max_size=4), st.sampled_from(["all-linear", ".*proj", ".*", ""])
  ),
  exclude=st.one_of(st.none(), st.lists(st.sampled_from(TARGET_WORDS), max_size=2)),
  save=st.one_of(st.none(), st.lists(st.sampled_from(TARGET_WORDS), min_size=1, max_size=2)),
  layers=st.one_of(st.none(), st.lists(st.integers(-1, 3), max_size=2)),
)
def test_generated_target_lists(tiny, target, exclude, save, layers):
  """Any targeting a user can write: it adapts modules (and works end to end) or a jpeft error says why."""
  data = dict(peft_type="LORA", r=2, target_modules=target, exclude_modules=exclude, modules_to_save=save)
  if layers is not None:
    data["layers_to_transform"] = layers
  _note("target lists", data)
  tokens = []  # which field is named depends on the combination; the property is "a jpeft error, no crash"
  _run_config_case(f"targets {data}", data, "either", tokens, tiny)


# ------------------------------------------------------------------------------------------------------------
# adapter folders saved by jpeft, mutated
# ------------------------------------------------------------------------------------------------------------

FOLDER_CONFIGS = {
  "lora": dict(peft_type="LORA", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
  "dora": dict(peft_type="LORA", r=2, use_dora=True, target_modules=["v_proj", "down_proj"]),
  "embedding": dict(peft_type="LORA", r=2, target_modules=["embed_tokens", "o_proj"]),
  "modules-to-save": dict(peft_type="LORA", r=2, target_modules=["k_proj"], modules_to_save=["lm_head"]),
  "bf16": dict(peft_type="LORA", r=2, target_modules=["up_proj"]),
}


def save_seed_folders(tiny, root: Path) -> dict:
  """name -> (files {name: bytes}, state {key: torch tensor}) of real jpeft-saved adapter folders."""
  _, model_config, params = tiny
  out = {}
  for name, cfg in FOLDER_CONFIGS.items():
    config = registry.config_from_dict(cfg)
    adapter, base = core.init(jax.random.key(1), params, config, model_config)
    adapter = jax.tree_util.tree_map(lambda x: x + 0.01, adapter)  # B != 0, so a changed value shows
    if name == "bf16":
      adapter = train.cast_trainable(adapter, jax.numpy.bfloat16)
    folder = root / name
    checkpoint.save_pretrained(str(folder), adapter, config, params=base)
    files = {n: (folder / n).read_bytes() for n in (CONFIG, WEIGHTS)}
    out[name] = (files, load_safetensors_bytes(files[WEIGHTS]))
  return out


@pytest.fixture(scope="module")
def saved_folders(tiny, tmp_path_factory):
  return save_seed_folders(tiny, tmp_path_factory.mktemp("saved"))


def _header_length(data: bytes) -> int:
  return 8 + int.from_bytes(data[:8], "little")


_INT_DTYPES = {"int8": torch.int8, "int32": torch.int32, "int64": torch.int64, "uint8": torch.uint8, "bool": torch.bool}
_FLOAT_DTYPES = {"float16": torch.float16, "float64": torch.float64, "bfloat16": torch.bfloat16}
_EXTRA_KEYS = [
  "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight",
  "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
  "base_model.model.lm_head.weight",
  "lora_A.weight",
  "",
]


@st.composite
def mutated_folders(draw):
  """(label, seed name, files, expectation, tokens) for one mutation of a saved adapter folder."""
  seed = draw(st.sampled_from(sorted(FOLDER_CONFIGS)))
  kind = draw(
    st.sampled_from(
      [
        "truncate",
        "garble_header",
        "garble_data",
        "dtype",
        "shape",
        "extra",
        "missing",
        "nonfinite",
        "no_config",
        "bad_json",
        "config_mismatch",
        "no_weights",
        "empty_weights",
      ]
    )
  )
  return seed, kind, draw(st.randoms(use_true_random=False))


def _mutate_folder(seed, kind, rnd, saved):
  files, state = saved[seed]
  files = dict(files)
  state = {k: v.clone() for k, v in state.items()}
  keys = sorted(state)
  weights = files[WEIGHTS]
  adapter_keys = [k for k in keys if ".base_layer." not in k]

  def encode(s):
    return save_safetensors_bytes(s, metadata={"format": "pt"})

  if kind == "truncate":
    cut = rnd.randrange(0, len(weights))
    files[WEIGHTS] = weights[:cut]
    return f"truncated at {cut}/{len(weights)}", files, "error", [WEIGHTS]
  if kind == "garble_header":
    n = _header_length(weights)
    pos = rnd.randrange(0, n)
    junk = bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 4)))
    files[WEIGHTS] = weights[:pos] + junk + weights[pos + len(junk) :]
    return f"header bytes {pos}..+{len(junk)} = {junk!r}", files, "either", [WEIGHTS]
  if kind == "garble_data":
    n = _header_length(weights)
    pos = rnd.randrange(n, len(weights))
    junk = bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 4)))
    files[WEIGHTS] = weights[:pos] + junk + weights[pos + len(junk) :]
    return f"data bytes {pos} = {junk!r}", files, "either", [WEIGHTS]
  if kind == "dtype":
    key = rnd.choice(keys)
    name = rnd.choice(sorted(_INT_DTYPES) + sorted(_FLOAT_DTYPES))
    dtype = {**_INT_DTYPES, **_FLOAT_DTYPES}[name]
    state[key] = (state[key] * 100).to(dtype) if name in _INT_DTYPES else state[key].to(dtype)
    files[WEIGHTS] = encode(state)
    if name in _INT_DTYPES:
      return f"{key} as {name}", files, "error", [key, name]
    return f"{key} as {name}", files, "ok", []
  if kind == "shape":
    key = rnd.choice(keys)
    t = state[key]
    how = rnd.choice(["transpose", "add_row", "drop_row", "flatten", "unsqueeze", "scalar"])
    if how == "transpose" and t.ndim == 2 and t.shape[0] != t.shape[1]:
      t = t.T.contiguous()
    elif how == "add_row":
      t = torch.cat([t, t[:1]])
    elif how == "drop_row" and t.shape[0] > 1:
      t = t[:-1].contiguous()
    elif how == "flatten" and t.ndim > 1:
      t = t.reshape(-1).contiguous()
    elif how == "scalar":
      t = t.reshape(-1)[0].clone()
    else:
      t = t.unsqueeze(0).contiguous()
    state[key] = t
    files[WEIGHTS] = encode(state)
    return f"{key} {how} -> {tuple(t.shape)}", files, "error", [key, str(tuple(t.shape))]
  if kind == "extra":
    key = rnd.choice(_EXTRA_KEYS + ["".join(rnd.choice("abc._") for _ in range(rnd.randint(1, 12)))])
    if key in state:
      key = key + ".extra"
    state[key] = torch.zeros(2, 3)
    files[WEIGHTS] = encode(state)
    return f"extra tensor {key!r}", files, "error", [repr(key)]
  if kind == "missing":
    key = rnd.choice(keys)
    del state[key]
    files[WEIGHTS] = encode(state)
    if ".base_layer." in key:  # the saved copy of the base embedding is optional, as in PEFT
      return f"without {key}", files, "ok", []
    return f"without {key}", files, "error", [key]
  if kind == "nonfinite":
    key = rnd.choice(adapter_keys)
    value = rnd.choice([math.nan, math.inf, -math.inf])
    flat = state[key].reshape(-1)
    flat[rnd.randrange(flat.numel())] = value
    files[WEIGHTS] = encode(state)
    return f"{key} holds {value}", files, "error", [key, "NaN or infinite"]
  if kind == "no_config":
    del files[CONFIG]
    return "no adapter_config.json", files, "error", [CONFIG]
  if kind == "bad_json":
    text = files[CONFIG]
    how = rnd.choice(["truncate", "junk", "empty", "array", "string", "null", "bom", "latin1"])
    files[CONFIG] = {
      "truncate": text[: rnd.randrange(0, len(text))],
      "junk": bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 16))),
      "empty": b"",
      "array": b"[1, 2]",
      "string": b'"LORA"',
      "null": b"null",
      "bom": b"\xef\xbb\xbf" + text,
      "latin1": text.replace(b'"none"', b'"n\xf6ne"'),
    }[how]
    return f"adapter_config.json {how}", files, "error", [CONFIG]
  if kind == "config_mismatch":
    cfg = json.loads(files[CONFIG])
    how = rnd.choice(["r", "targets", "dora"])
    if how == "r":
      cfg["r"] = cfg["r"] + rnd.randint(1, 3)
    elif how == "targets":
      cfg["target_modules"] = ["gate_proj"]
    else:
      cfg["use_dora"] = not cfg["use_dora"]
      if "embed_tokens" in cfg["target_modules"]:
        return "dora on an embedding", files | {CONFIG: json.dumps(cfg).encode()}, "error", ["use_dora"]
    files[CONFIG] = json.dumps(cfg).encode()
    return f"config changed: {how}", files, "error", [WEIGHTS]
  if kind == "no_weights":
    del files[WEIGHTS]
    return "no adapter_model.safetensors", files, "error", [WEIGHTS]
  files[WEIGHTS] = b""
  return "empty adapter_model.safetensors", files, "error", [WEIGHTS]


@settings(max_examples=260, **SETTINGS)
@given(case=mutated_folders())
def test_mutated_adapter_folders(tiny, saved_folders, case):
  seed, kind, rnd = case
  label, files, expect, tokens = _mutate_folder(seed, kind, rnd, saved_folders)
  label = f"{seed}: {label}"
  _note("adapter folders", b"".join(k.encode() + b"\0" + v for k, v in sorted(files.items())))
  _, model_config, params = tiny
  with tempfile.TemporaryDirectory() as tmp:
    for name, data in files.items():
      Path(tmp, name).write_bytes(data)
    try:
      config, adapter, _ = checkpoint.load_pretrained(tmp, params, model_config)
    except Exception as exc:  # noqa: BLE001
      assert expect != "ok", f"{label}: refused: {type(exc).__name__}: {exc}"
      _expect_jpeft_error(exc, tokens, label)
      return
  assert expect != "error", f"{label}: accepted"
  assert _leaves_finite(adapter), f"{label}: loaded a NaN"
  if expect == "ok" and kind == "dtype":  # another float dtype: PEFT casts on load, and so does jpeft
    got = core.to_state_dict(adapter)
    for key, ref in saved_folders[seed][1].items():
      if key in got:
        np.testing.assert_allclose(np.asarray(got[key], np.float32), ref.float().numpy(), rtol=1e-2, atol=1e-3)


def test_missing_or_misnamed_folder(tiny, tmp_path):
  _, model_config, params = tiny
  for path in (tmp_path / "no-such-adapter", tmp_path / "file"):
    if path.name == "file":
      path.write_text("x")
    with pytest.raises(config_lib.FileMissingError, match=path.name) as info:
      checkpoint.load_pretrained(str(path), params, model_config)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)
  _note("adapter folders", b"missing folder")
  _note("adapter folders", b"a file as folder")


# ------------------------------------------------------------------------------------------------------------
# failed saves leave nothing half-written
# ------------------------------------------------------------------------------------------------------------


def _good_adapter(tiny):
  _, model_config, params = tiny
  config = registry.config_from_dict(FOLDER_CONFIGS["lora"])
  adapter, _ = core.init(jax.random.key(2), params, config, model_config)
  return config, adapter


def _snapshot(folder: Path):
  if not folder.exists():
    return None
  return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


BAD_TENSORS = ["nan", "inf", "int", "bool", "str", "list", "module-array", "empty-module", "not-a-dict", "int-name"]


@settings(max_examples=60, **SETTINGS)
@given(
  bad=st.sampled_from(BAD_TENSORS + ["disk-full-weights", "disk-full-config"]),
  existing=st.booleans(),
  where=st.integers(0, 3),
)
def test_failed_save_leaves_no_partial_adapter(tiny, bad, existing, where):
  config, adapter = _good_adapter(tiny)
  adapter = {m: dict(ts) for m, ts in adapter.items()}
  module = sorted(adapter)[where % len(adapter)]
  tensor = sorted(adapter[module])[where % 2]
  key = core.peft_key(module, tensor)
  value = np.asarray(adapter[module][tensor])
  if bad in ("nan", "inf"):
    value = value.copy()
    value.reshape(-1)[where] = math.nan if bad == "nan" else math.inf
    adapter[module][tensor] = value
  elif bad in ("int", "bool"):
    adapter[module][tensor] = value.astype(np.int32 if bad == "int" else np.bool_)
  elif bad == "str":
    adapter[module][tensor] = "not a tensor"
  elif bad == "list":
    adapter[module][tensor] = value.tolist()
  elif bad == "module-array":
    adapter[module] = value
  elif bad == "empty-module":
    adapter[module] = {}
  elif bad == "not-a-dict":
    adapter = list(adapter.items())
  elif bad == "int-name":
    adapter[module][7] = value
  _note("failed saves", dict(bad=bad, existing=existing, where=where))
  with tempfile.TemporaryDirectory() as tmp:
    folder = Path(tmp, "adapter")
    if existing:  # a previous, good adapter must survive the failed save byte for byte
      good_config, good = _good_adapter(tiny)
      checkpoint.save_pretrained(str(folder), good, good_config)
    before = _snapshot(folder)
    if bad.startswith("disk-full"):
      target = "safetensors.numpy.save_file" if bad.endswith("weights") else "builtins.open"
      real = __import__("builtins").open

      def failing_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{half")
        raise OSError(28, "No space left on device")

      def failing_open(file, mode="r", *args, **kwargs):
        if "w" in mode and CONFIG in os.path.basename(str(file)):  # the config file, or a temporary one for it
          handle = real(file, mode, *args, **kwargs)
          handle.write("{" if "b" not in mode else b"{")
          handle.close()
          raise OSError(28, "No space left on device")
        return real(file, mode, *args, **kwargs)

      with mock.patch(target, failing_save_file if bad.endswith("weights") else failing_open):
        with pytest.raises(OSError, match="No space left"):
          checkpoint.save_pretrained(str(folder), adapter, config)
    else:
      with pytest.raises(JPEFT_ERROR) as info:
        checkpoint.save_pretrained(str(folder), adapter, config)
      message = str(info.value)
      if bad in ("nan", "inf", "int", "bool", "str", "list"):
        assert key in message, message
      elif bad in ("module-array", "empty-module"):
        assert module in message, message
    assert _snapshot(folder) == before, f"{bad}: the folder changed"


# ------------------------------------------------------------------------------------------------------------
# the experiment launcher: target modules are resolved from the model's config before any weight loads
# ------------------------------------------------------------------------------------------------------------

LAUNCH_OVERRIDES = dict(max_steps=1, batch_size=1, n_train=2, n_valid=0, n_test=0, max_new_tokens=2)


def _experiment(tmp_path, adapter_config) -> str:
  folder = tmp_path / "experiments" / "lora" / "case"
  folder.mkdir(parents=True)
  (folder / CONFIG).write_text(json.dumps(adapter_config))
  return str(folder)


def _launch(tiny, folder, backend):
  from experiments import run

  stderr = io.StringIO()
  status, outcome = run.launch(
    folder,
    backend,
    overrides=LAUNCH_OVERRIDES,
    model=tiny[0],
    tokenizer=tiny[0],
    progress=False,
    write=False,
    stderr=stderr,
  )
  return status, outcome, stderr.getvalue()


@pytest.mark.parametrize("backend", ["jax", "torch"])
@pytest.mark.parametrize(
  "targets,error,words",
  [
    (["qkv_proj"], "NoMatchingTargetsError", ["qkv_proj", "model.layers.0.self_attn.q_proj"]),
    (["q_proj"], "AllTargetsExcludedError", ["excluded", "exclude_modules"]),
    (["model.norm"], "UnsupportedTargetError", ["'model.norm'", "norm", "only the following modules"]),
  ],
  ids=["no-match", "all-excluded", "norm"],
)
def test_launcher_reports_target_errors_before_loading(tiny, tmp_path, no_loading, backend, targets, error, words):
  config = dict(peft_type="LORA", r=2, target_modules=targets, task_type="CAUSAL_LM")
  if error == "AllTargetsExcludedError":
    config["exclude_modules"] = ["q_proj"]
  folder = _experiment(tmp_path, config)
  status, outcome, err = _launch(tiny, folder, backend)
  assert status == 2 and outcome is None
  lines = err.strip().splitlines()
  assert len(lines) == 1, err
  assert lines[0].startswith(f"error: {error}: "), lines[0]
  for word in words + [os.path.join(folder, CONFIG)]:
    assert word in lines[0], (word, lines[0])
  _note("launcher", dict(config=config, backend=backend))


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_launcher_check_passes_valid_targets(tiny, tmp_path, no_loading, backend):
  from experiments import common

  folder = _experiment(tmp_path, dict(peft_type="LORA", r=2, target_modules=["q_proj", "embed_tokens"]))
  common.check_adapter_targets(common.load_experiment(folder, LAUNCH_OVERRIDES), tiny[0], backend)
  # a PEFT-only method is checked by name on torch, and skipped when PEFT's targeting rules do not apply to it
  randlora = _experiment(tmp_path / "randlora", dict(peft_type="RANDLORA", target_modules=["nope"]))
  with pytest.raises(targets_lib.NoMatchingTargetsError, match="nope"):
    common.check_adapter_targets(common.load_experiment(randlora, LAUNCH_OVERRIDES), tiny[0], "torch")
  prompt = _experiment(tmp_path / "prompt", dict(peft_type="PROMPT_TUNING", num_virtual_tokens=4))
  common.check_adapter_targets(common.load_experiment(prompt, LAUNCH_OVERRIDES), tiny[0], "torch")


def test_launcher_prints_config_errors_as_one_line(tiny, tmp_path, no_loading):
  folder = _experiment(tmp_path, dict(peft_type="LORA", r=2, lora_dropout=1.0, target_modules=["q_proj"]))
  status, _, err = _launch(tiny, folder, "jax")
  assert status == 2 and len(err.strip().splitlines()) == 1
  assert err.startswith("error: InvalidConfigError: ") and "lora_dropout" in err and folder in err
  _note("launcher", dict(dropout=1.0))
