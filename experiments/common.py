"""What both backends share: the experiment folder, the training params, the data, the batches, the metrics.

Nothing here imports torch; jax comes in only through ``jpeft.trainer`` (for ``TrainConfig`` and
``batch_schedule``, which both backends use so that they see the same batches in the same order).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import platform
import resource
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from jpeft.config import JpeftError

EXPERIMENTS_DIR = Path(__file__).resolve().parent
DEFAULT_TRAINING_PARAMS_PATH = EXPERIMENTS_DIR / "default_training_params.json"
DEFAULT_RESULTS_DIR = EXPERIMENTS_DIR / "results"
ADAPTER_CONFIG_NAME = "adapter_config.json"
TRAINING_PARAMS_NAME = "training_params.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
# The method folder whose experiments may omit adapter_config.json (PEFT's layout for full fine-tuning).
FULL_FINETUNING_METHOD = "full-finetuning"
FULL_FINETUNING_MARKER = "FULL"
BACKENDS = ("jax", "torch")
# PEFT's run.py: a cosine schedule warms up linearly over this fraction of max_steps.
PEFT_WARMUP_STEP_RATIO = 0.1
# PEFT's run.py computes the forgetting loss on at most this many tokens per text.
PEFT_FORGETTING_MAX_LENGTH = 768

# Keys of the training params that this runner adds to PEFT's (the data and the extra measurements).
RUNNER_KEYS: dict[str, str] = {
  "train_data": "math QA source for training: a .jsonl/.json/.parquet file, 'embedded:train', or a hub id "
  "(optionally 'hub/id:split')",
  "valid_data": "math QA source for validation during training (same forms; null: no validation)",
  "test_data": "math QA source for the final test (same forms; null: no test)",
  "forgetting_data": "general-text file for the forgetting loss (.jsonl/.json with 'text', or plain text); "
  "null: jpeft's built-in GENERAL_TEXT",
  "n_train": "rows of train_data to use (null: all)",
  "n_valid": "rows of valid_data to use (null: all)",
  "n_test": "rows of test_data to use (null: all)",
  "n_forgetting": "paragraphs of the forgetting text to use (null: all)",
  "forgetting_max_length": "tokens per forgetting paragraph (PEFT: 768)",
  "embedded_preset": "difficulty of the embedded math task: one of jpeft.data.PRESETS",
  "n_inference": "prompts (from the test set) in the generation-speed measurement",
  "inference_max_new_tokens": "tokens generated per prompt in the generation-speed measurement (no early stop)",
}
# PEFT's switches of how a run computes: fields of jpeft's TrainConfig, each honoured or refused by a backend
# (the values each backend runs: the runners' check_config; types and method needs: check_switches below).
_TORCH_ONLY_KEYS = (
  "compile",
  "use_gc",
  "use_amp",
  "autocast_adapter_dtype",
  "attn_implementation",
  "init_kv_cache_prefix",
)
_DTYPES = ("float32", "bfloat16", "float16")


class ExperimentError(JpeftError):
  """An experiment folder, its training params or its data that cannot be run (raised before any training)."""


# ------------------------------------------------------------------------------------------------------------
# the experiment folder


@dataclasses.dataclass
class Experiment:
  """One experiment folder, its adapter config and its merged training params.

  Attributes:
    path: the folder.
    method: the method folder's name (``lora``, ``full-finetuning``, ...).
    name: the experiment folder's name (``smollm2-rank32``).
    peft_config: the content of ``adapter_config.json``; None for full fine-tuning.
    params: the training params: defaults, updated by the experiment's ``training_params.json``, updated by the
      command-line overrides (each a shallow ``dict.update``).
    sources: for every key of ``params``, the file (or ``"command line"``) it came from.
  """

  path: str
  method: str
  name: str
  peft_config: dict | None
  params: dict
  sources: dict

  @property
  def experiment_name(self) -> str:
    return f"{self.method}/{self.name}"

  @property
  def is_full_finetuning(self) -> bool:
    return self.peft_config is None

  @property
  def peft_type(self) -> str:
    return FULL_FINETUNING_MARKER if self.peft_config is None else str(self.peft_config.get("peft_type"))

  def result_filename(self, backend: str) -> str:
    return f"{self.method}--{self.name}--{backend}.json"


def _read_json(path: Path, what: str) -> Any:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as exc:
    raise ExperimentError(f"{path}: {what} is not valid JSON ({exc})") from None


def list_experiments(root: str | os.PathLike = EXPERIMENTS_DIR) -> list[str]:
  """``<method>/<name>`` of every experiment folder under ``root``."""
  root = Path(root)
  out = []
  for method in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
    if method.name == "results":
      continue
    for exp in sorted(p for p in method.iterdir() if p.is_dir()):
      if (exp / ADAPTER_CONFIG_NAME).exists() or (exp / TRAINING_PARAMS_NAME).exists():
        out.append(f"{method.name}/{exp.name}")
  return out


def valid_param_keys() -> list[str]:
  """Every key a training-params file may hold."""
  from jpeft.trainer import TrainConfig

  fields = {f.name for f in dataclasses.fields(TrainConfig)}
  peft_keys = {"model_id", "dtype", "generation_kwargs", "warmup", *_TORCH_ONLY_KEYS}
  return sorted(fields | peft_keys | set(RUNNER_KEYS))


def check_param_keys(params: Mapping[str, Any], sources: Mapping[str, str]) -> None:
  """Raise :class:`ExperimentError` naming every unknown key, where it came from, and the valid keys."""
  valid = set(valid_param_keys())
  unknown = sorted(k for k in params if k not in valid)
  if unknown:
    import difflib

    parts = []
    for key in unknown:
      close = difflib.get_close_matches(key, sorted(valid), n=1)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      parts.append(f"{key!r} in {sources.get(key, '?')}{hint}")
    raise ExperimentError(f"invalid training params key(s): {', '.join(parts)}; valid keys: {sorted(valid)}")


def load_experiment(
  path: str | os.PathLike, overrides: Mapping[str, Any] | None = None, *, defaults_path: str | os.PathLike | None = None
) -> Experiment:
  """Read an experiment folder and merge its training params as PEFT does.

  ``overrides`` (command-line values) are applied last; ``max_new_tokens`` there replaces
  ``generation_kwargs["max_new_tokens"]``. Raises :class:`ExperimentError` (or ``FileNotFoundError``) for a
  missing folder, unreadable JSON, unknown keys or invalid values.
  """
  folder = Path(path).expanduser()
  if not folder.is_dir() and not folder.is_absolute():
    # also relative to the repository (experiments/lora/x) or to experiments/ (lora/x)
    for base in (EXPERIMENTS_DIR.parent, EXPERIMENTS_DIR):
      if (base / folder).is_dir():
        folder = base / folder
        break
  if not folder.is_dir():
    known = ", ".join(list_experiments()) or "none"
    what = "is not a folder" if folder.exists() else "does not exist"
    raise FileNotFoundError(
      f"experiment folder {str(path)!r} {what}; expected experiments/<method>/<name>/ "
      f"holding {ADAPTER_CONFIG_NAME} (+ optional {TRAINING_PARAMS_NAME}); "
      f"known experiments: {known}"
    )
  folder = folder.resolve()
  method, name = folder.parent.name, folder.name

  config_path = folder / ADAPTER_CONFIG_NAME
  peft_config: dict | None
  if config_path.exists():
    peft_config = _read_json(config_path, ADAPTER_CONFIG_NAME)
    if not isinstance(peft_config, dict):
      raise ExperimentError(f"{config_path}: expected a JSON object, got {type(peft_config).__name__}")
    peft_type = peft_config.get("peft_type")
    if peft_type is None:
      raise ExperimentError(
        f'{config_path}: no \'peft_type\' (use {{"peft_type": "{FULL_FINETUNING_MARKER}"}} for full fine-tuning)'
      )
    if str(peft_type).upper() == FULL_FINETUNING_MARKER:
      peft_config = None
  elif method == FULL_FINETUNING_METHOD:
    peft_config = None
  else:
    raise FileNotFoundError(
      f"{folder}: no {ADAPTER_CONFIG_NAME}; only experiments under "
      f"{FULL_FINETUNING_METHOD}/ may omit it (full fine-tuning)"
    )

  defaults_path = Path(defaults_path) if defaults_path is not None else DEFAULT_TRAINING_PARAMS_PATH
  if not defaults_path.exists():
    raise FileNotFoundError(f"default training params not found: {defaults_path}")
  params = _read_json(defaults_path, "the default training params")
  sources = {k: str(defaults_path) for k in params}
  params_path = folder / TRAINING_PARAMS_NAME
  if params_path.exists():
    given = _read_json(params_path, TRAINING_PARAMS_NAME)
    if not isinstance(given, dict):
      raise ExperimentError(f"{params_path}: expected a JSON object, got {type(given).__name__}")
    params.update(given)  # shallow, as PEFT: a given optimizer_kwargs replaces the default dict whole
    sources.update({k: str(params_path) for k in given})
  for key, value in (overrides or {}).items():
    if value is None:
      continue
    if key == "max_new_tokens":
      params["generation_kwargs"] = dict(params.get("generation_kwargs") or {}, max_new_tokens=int(value))
      sources["generation_kwargs"] = "command line"
      continue
    params[key] = value
    sources[key] = "command line"
  check_param_keys(params, sources)
  exp = Experiment(path=str(folder), method=method, name=name, peft_config=peft_config, params=params, sources=sources)
  make_train_config(exp)  # every value check, before anything is loaded
  return exp


def check_adapter_targets(exp: Experiment, model_source: str | None, backend: str = "jax") -> None:
  """Resolve the adapter's target modules against the module names the model's config implies, before any weight
  is loaded (``jpeft.models.loading.load_model_config`` reads ``config.json`` / the GGUF metadata only).

  jax: the full jpeft resolution (``jpeft.core.resolve``): target modules that match nothing, all excluded, or of a
  kind the method cannot adapt (a norm for LoRA) raise. torch: for the PEFT methods that target modules by PEFT's
  common rules, target modules that match no module raise (PEFT would raise the same after loading); anything
  else is left to PEFT. The error is re-raised with the adapter config's path in front. Nothing is checked for
  full fine-tuning, or when the model's config cannot be had without downloading the model.
  """
  if exp.peft_config is None or not model_source:
    return
  from jpeft import config as config_lib
  from jpeft import registry
  from jpeft import targets as targets_lib
  from jpeft.models import loading
  from jpeft.models.llama import module_kinds

  where = os.path.join(exp.path, ADAPTER_CONFIG_NAME)
  if backend == "jax":
    try:
      config = registry.config_from_dict(exp.peft_config)
    except config_lib.JpeftError as exc:
      raise type(exc)(f"{where}: {exc}") from None
    supported = registry.get_method(config.peft_type).supported_kinds
    reported: tuple[type[BaseException], ...] = (targets_lib.TargetError,)
  else:
    config = _targeting_fields(exp.peft_config)
    if config is None:
      return
    # PEFT adapts the same module kinds as jpeft for the methods jpeft implements; for PEFT-only methods only the
    # names are checked
    implemented = config.peft_type in registry.registered_peft_types()
    supported = registry.get_method(config.peft_type).supported_kinds if implemented else None
    # a missing default is PEFT's to report (its table may know the method)
    reported = (
      targets_lib.NoMatchingTargetsError,
      targets_lib.UnsupportedTargetError,
      targets_lib.ConflictingTargetsError,
    )
  model_config = loading.load_model_config(model_source)
  if model_config is None:
    return
  try:
    targets_lib.resolve_targets(config, module_kinds(model_config), model_config.model_type, supported_kinds=supported)
  except reported as exc:
    raise type(exc)(f"{where}: {exc} (resolved against the modules of {model_source!r})") from None
  except targets_lib.TargetError:
    pass


def _targeting_fields(peft_config: Mapping[str, Any]):
  """A jpeft ``PeftConfig`` holding only the targeting fields of a PEFT-only method's config, or None when PEFT's
  common targeting rules do not apply to it (prompt learning, ``target_parameters``) or its fields do not parse
  (PEFT's own check then reports them)."""
  from jpeft import config as config_lib
  from jpeft import targets as targets_lib

  peft_type = peft_config.get("peft_type")
  if peft_type not in targets_lib.MODULE_TARGETING_PEFT_TYPES or peft_config.get("target_parameters"):
    return None
  fields = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save")
  try:
    return config_lib.PeftConfig(peft_type=peft_type, **{k: peft_config.get(k) for k in fields})
  except config_lib.JpeftError:
    return None


# ------------------------------------------------------------------------------------------------------------
# training params -> jpeft's TrainConfig (used by both backends)


def model_dtype(params: Mapping[str, Any]) -> str:
  dtype = str(params.get("dtype") or "float32").lower()
  if dtype not in _DTYPES:
    raise ExperimentError(f"dtype {dtype!r} is not supported here; use one of {list(_DTYPES)}")
  return dtype


def make_train_config(exp: Experiment, **fixed):
  """The :class:`jpeft.trainer.TrainConfig` of an experiment; ``fixed`` sets non-PEFT fields (progress, ...).

  PEFT's rules: ``lr_scheduler: null`` is a constant rate; a cosine schedule warms up over
  ``int(0.1 * max_steps)`` steps unless the params give ``warmup``/``warmup_steps``.
  """
  from backends.base import normalize_optimizer_type
  from jpeft import trainer as trainer_lib

  params = {k: v for k, v in exp.params.items() if k not in RUNNER_KEYS}
  model_dtype(params)
  if params.get("lr_scheduler") is None:
    params["lr_scheduler"] = "constant"
  params["lr_scheduler"] = str(params["lr_scheduler"]).lower()
  if params["lr_scheduler"] not in ("constant", "linear", "cosine"):
    raise ExperimentError(f"lr_scheduler {params['lr_scheduler']!r}: use null/'constant', 'linear' or 'cosine'")
  if "warmup" not in params and "warmup_steps" not in params and params["lr_scheduler"] == "cosine":
    params["warmup_steps"] = int(
      PEFT_WARMUP_STEP_RATIO * int(params.get("max_steps", trainer_lib.TrainConfig.max_steps))
    )
  try:
    normalize_optimizer_type(str(params.get("optimizer_type", "AdamW")))
    config = trainer_lib.TrainConfig.from_dict(params, **fixed)
    trainer_lib.optimizer_kwargs(config)
  except ValueError as exc:
    raise ExperimentError(f"{exp.experiment_name}: {exc}") from None
  for key in ("batch_size", "batch_size_eval", "max_seq_length", "max_new_tokens"):
    if not isinstance(getattr(config, key), int) or getattr(config, key) < 1:
      raise ExperimentError(f"{exp.experiment_name}: {key} must be a positive integer, got {getattr(config, key)!r}")
  # 0 steps evaluates the untrained model (the reference row experiments/base/)
  if not isinstance(config.max_steps, int) or config.max_steps < 0:
    raise ExperimentError(f"{exp.experiment_name}: max_steps must be a non-negative integer, got {config.max_steps!r}")
  if config.eval_steps is not None and (not isinstance(config.eval_steps, int) or config.eval_steps < 0):
    raise ExperimentError(f"{exp.experiment_name}: eval_steps must be a non-negative integer or null")
  if "{query}" not in config.query_template:
    raise ExperimentError(f"{exp.experiment_name}: query_template must contain '{{query}}'")
  check_switches(exp, config)
  if exp.is_full_finetuning and normalize_optimizer_type(config.optimizer_type) != "AdamW":
    raise ExperimentError(f"{exp.experiment_name}: optimizer_type {config.optimizer_type!r} needs a LoRA adapter")
  for key in (
    "n_train",
    "n_valid",
    "n_test",
    "n_forgetting",
    "n_inference",
    "inference_max_new_tokens",
    "forgetting_max_length",
  ):
    value = exp.params.get(key)
    if value is not None and (not isinstance(value, int) or value < 0):
      raise ExperimentError(f"{exp.experiment_name}: {key} must be a non-negative integer or null, got {value!r}")
  return config


# PEFT's init_kv_cache_prefix fills the KV prefix of these adapters (peft.initialize_kv_prefix_from_text).
KV_PREFIX_PEFT_TYPES = ("PREFIX_TUNING", "CARTRIDGE")


def check_switches(exp: Experiment, config) -> None:
  """The value checks of PEFT's switches that hold on every backend (what a backend runs: its check_config)."""

  def where(key):
    return f"{exp.experiment_name}: {key} (from {exp.sources.get(key, 'the defaults')})"

  for key in ("compile", "use_gc", "use_amp", "autocast_adapter_dtype"):
    value = getattr(config, key)
    if not isinstance(value, bool):
      raise ExperimentError(f"{where(key)} must be true or false, got {value!r}")
  for key in ("attn_implementation", "init_kv_cache_prefix"):
    value = getattr(config, key)
    if value is not None and not isinstance(value, str):
      raise ExperimentError(f"{where(key)} must be null or a string, got {value!r}")
  prefix = config.init_kv_cache_prefix
  if prefix is not None:
    if not prefix.strip():
      raise ExperimentError(f"{where('init_kv_cache_prefix')} is an empty text; use null for no initialisation")
    if exp.peft_type.upper() not in KV_PREFIX_PEFT_TYPES or (exp.peft_config or {}).get("prefix_projection"):
      raise ExperimentError(
        f"{where('init_kv_cache_prefix')} is set, but it initialises the KV prefix of a "
        f"{' or '.join(KV_PREFIX_PEFT_TYPES)} adapter without prefix_projection, and this experiment's "
        f"peft_type is {exp.peft_type!r}; use null"
      )


def optimizer_settings(config) -> dict:
  """The optimizer of the training params as keyword arguments of ``Backend.configure_optimizer``."""
  from jpeft import trainer as trainer_lib

  kwargs = trainer_lib.optimizer_kwargs(config)
  out = {
    k: kwargs[k]
    for k in ("lr", "weight_decay", "grad_norm_clip", "optimizer_type", "warmup_steps", "total_steps", "lr_scheduler")
    if k in kwargs
  }
  for key in ("betas", "eps", "loraplus_lr_ratio"):
    if key in kwargs:
      out[key] = kwargs[key]
  return out


# ------------------------------------------------------------------------------------------------------------
# data


@dataclasses.dataclass
class ExperimentData:
  """The datasets of a run: ``train``/``valid``/``test`` as (query, response) records, the forgetting texts."""

  train: list[tuple[str, str]]
  valid: list[tuple[str, str]]
  test: list[tuple[str, str]]
  forgetting: list[str]
  info: dict


def _split_source(source: str, default_split: str) -> tuple[str, str | None]:
  """``'hub/id:split'`` -> (hub id, split); local paths and ``embedded:<split>`` are kept whole."""
  from jpeft.data.loaders import _is_local_source

  if source == "embedded" or source.startswith("embedded:"):
    return source, None
  if _is_local_source(source):
    return source, None
  if ":" in source:
    hub_id, _, split = source.rpartition(":")
    return hub_id, split
  return source, default_split


def _load_dataset(role: str, source, loader, *args, **kwargs):
  """``loader(*args, **kwargs)``, its input errors (missing file, bad JSON, missing fields) as ExperimentError."""
  try:
    return loader(*args, **kwargs)
  except (ValueError, FileNotFoundError) as exc:
    raise ExperimentError(f"{role}_data {source!r}: {exc}") from None


def load_data(params: Mapping[str, Any]) -> ExperimentData:
  """Load every dataset the params name; the loaders' errors (missing file, missing fields) surface here."""
  from jpeft.data import CHAR_LIMIT, PRESETS, load_general_text, load_math_dataset

  preset = params.get("embedded_preset") or "default"
  if preset not in PRESETS:
    raise ExperimentError(f"embedded_preset {preset!r}: use one of {sorted(PRESETS)}")
  records, info = {}, {}
  for role, default_split in (("train", "train"), ("valid", "train"), ("test", "test")):
    source = params.get(f"{role}_data")
    limit = params.get(f"n_{role}")
    if source is None or limit == 0:
      if role == "train":
        raise ExperimentError("train_data is required")
      records[role], info[role] = [], {"source": source, "rows": 0}
      continue
    src, split = _split_source(str(source), default_split)
    ds = _load_dataset(
      role,
      source,
      load_math_dataset,
      src,
      split=split,
      limit=limit,
      task_config=PRESETS[preset],
      max_chars=CHAR_LIMIT if role == "train" else None,
    )
    records[role] = list(zip(ds["query"], ds["response"]))
    info[role] = {"source": str(source), "split": split, "rows": len(records[role])}
    if src.startswith("embedded"):
      info[role]["embedded_preset"] = preset
  if not records["train"]:
    raise ExperimentError(f"train_data {params.get('train_data')!r} has no rows")
  texts = _load_dataset(
    "forgetting",
    params.get("forgetting_data"),
    load_general_text,
    params.get("forgetting_data"),
    limit=params.get("n_forgetting"),
  )
  info["forgetting"] = {"source": params.get("forgetting_data") or "jpeft.data.GENERAL_TEXT", "rows": len(texts)}
  return ExperimentData(records["train"], records["valid"], records["test"], texts, info)


def pad_token_id(tokenizer) -> int:
  pad = getattr(tokenizer, "pad_token_id", None)
  return int(pad) if pad is not None else int(tokenizer.eos_token_id)


def tokenize_train(tokenizer, records: Sequence[tuple[str, str]], config) -> list[dict]:
  """The train examples exactly as ``jpeft.trainer.Trainer`` tokenises them."""
  from jpeft.data import tokenize_example

  return [
    tokenize_example(
      tokenizer, q, r, config.query_template, max_length=config.max_seq_length, mask_prompt=config.mask_prompt
    )
    for q, r in records
  ]


def drop_unlabelled(tokenizer, data: ExperimentData, config) -> ExperimentData:
  """``data`` without the train examples that keep no answer token after the ``max_seq_length`` cut.

  Such an example carries no loss; a batch made only of them would have an undefined (0/0) loss in torch.
  Both backends get the same filtered set, so their schedules stay identical.
  """
  examples = tokenize_train(tokenizer, data.train, config)
  keep = [rec for rec, ex in zip(data.train, examples) if any(label != -100 for label in ex["labels"])]
  if len(keep) == len(data.train):
    return data
  if not keep:
    raise ExperimentError(f"no train example keeps an answer token within max_seq_length={config.max_seq_length}")
  info = dict(
    data.info, train=dict(data.info["train"], rows=len(keep), dropped_without_answer_tokens=len(data.train) - len(keep))
  )
  return dataclasses.replace(data, train=keep, info=info)


def train_schedule(examples: Sequence[dict], config) -> list[list[int]]:
  """Example indices of every step, exactly ``jpeft.trainer.Trainer.schedule()``."""
  from jpeft.trainer import batch_schedule

  lengths = [len(ex["input_ids"]) for ex in examples]
  return batch_schedule(
    lengths,
    config.batch_size,
    config.max_steps,
    seed=config.seed,
    bucket_factor=config.bucket_factor,
    pad_to_multiple=None if config.pad_powers_of_two else config.pad_multiple,
  )


def schedule_digest(schedule: Sequence[Sequence[int]]) -> str:
  """A short hash of a batch schedule, recorded so that runs can be checked to have seen the same batches."""
  return hashlib.sha256(json.dumps([list(map(int, b)) for b in schedule]).encode()).hexdigest()[:16]


def train_batch(examples: Sequence[dict], indices: Sequence[int], config, pad_id: int) -> tuple[dict, int]:
  """Right-padded (rows, padded length) arrays of one step, as the jax trainer pads them (without filler rows),
  and the number of non-pad tokens."""
  from jpeft.data import choose_padded_length, collate

  chosen = [examples[i] for i in indices]
  length = choose_padded_length(
    max(len(ex["input_ids"]) for ex in chosen),
    multiple=config.pad_multiple,
    max_length=config.max_seq_length,
    powers_of_two=config.pad_powers_of_two,
  )
  batch = collate(chosen, pad_token_id=pad_id, length=length)
  return batch, int(batch["attention_mask"].sum())


def prompt_batches(tokenizer, queries: Sequence[str], config, pad_id: int, rows: int | None = None):
  """Left-padded prompt batches for generation, as ``Trainer.generate_texts`` builds them (no filler rows).

  Yields (input_ids, attention_mask) of at most ``rows`` (default ``batch_size_eval``) prompts each.
  """
  from jpeft.data import choose_padded_length, tokenize_prompt

  prompts = [tokenize_prompt(tokenizer, q, config.query_template, max_length=config.max_seq_length) for q in queries]
  rows = max(1, min(rows or config.batch_size_eval, len(prompts) or 1))
  for start in range(0, len(prompts), rows):
    chunk = prompts[start : start + rows]
    length = choose_padded_length(
      max(len(p) for p in chunk), multiple=config.pad_multiple, powers_of_two=config.pad_powers_of_two
    )
    ids = np.full((len(chunk), length), pad_id, np.int32)
    mask = np.zeros((len(chunk), length), np.int32)
    for i, p in enumerate(chunk):
      ids[i, length - len(p) :] = p
      mask[i, length - len(p) :] = 1
    yield ids, mask


def decode_new_tokens(tokenizer, new_tokens: np.ndarray, eos_id: int) -> list[str]:
  """Text of each row of generated tokens, cut at the first EOS."""
  texts = []
  for row in np.asarray(new_tokens):
    row = [int(t) for t in row]
    if eos_id in row:
      row = row[: row.index(eos_id)]
    texts.append(tokenizer.decode(row, skip_special_tokens=True))
  return texts


def forgetting_batches(
  tokenizer, texts: Sequence[str], *, batch_size: int, max_length: int, pad_id: int, multiple: int = 64
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Left-padded (input_ids, attention_mask, labels) batches of the forgetting texts, all of one padded length.

  The labels select what PEFT's ``calculate_mean_per_token_loss`` scores: every real token after the first
  of its row (pad positions and the first real token are -100), so the causal loss's total over a batch is
  the sum of PEFT's per-token losses.
  """
  from jpeft.data import choose_padded_length

  ids_list = []
  for text in texts:
    out = tokenizer(text, add_special_tokens=True)
    ids = [int(i) for i in (out["input_ids"] if hasattr(out, "keys") else out)][:max_length]
    if len(ids) >= 2:
      ids_list.append(ids)
  if not ids_list:
    return []
  length = choose_padded_length(max(len(i) for i in ids_list), multiple=multiple, max_length=max_length)
  batches = []
  for start in range(0, len(ids_list), batch_size):
    chunk = ids_list[start : start + batch_size]
    ids = np.full((len(chunk), length), pad_id, np.int32)
    mask = np.zeros((len(chunk), length), np.int32)
    labels = np.full((len(chunk), length), -100, np.int32)
    for i, row in enumerate(chunk):
      ids[i, length - len(row) :] = row
      mask[i, length - len(row) :] = 1
      labels[i, length - len(row) + 1 :] = row[1:]
    batches.append((ids, mask, labels))
  return batches


def inference_prompts(data: ExperimentData, n: int) -> list[str]:
  """The fixed prompt set of the generation-speed measurement: the first ``n`` test (else valid, train) queries."""
  for records in (data.test, data.valid, data.train):
    if records:
      return [q for q, _ in records[:n]]
  return []


# ------------------------------------------------------------------------------------------------------------
# measurements


def current_rss_bytes() -> int | None:
  """The process's resident set size now (Linux), else None."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except (OSError, ValueError, IndexError):
    return None


def peak_rss_bytes() -> int:
  """The process's peak resident set size so far."""
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(rss if sys.platform == "darwin" else rss * 1024)


def mean_or_none(values: Sequence[float]) -> float | None:
  return float(np.mean(values)) if len(values) else None


# ------------------------------------------------------------------------------------------------------------
# the result file


def package_info() -> dict:
  import importlib.metadata

  out = {}
  for pkg in (
    "jpeft",
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "transformers",
    "peft",
    "torch",
    "datasets",
    "safetensors",
    "tokenizers",
  ):
    try:
      out[f"{pkg}-version"] = importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
      out[f"{pkg}-version"] = None
  return out


def system_info(accelerator: str) -> dict:
  return {
    "system": platform.system(),
    "release": platform.release(),
    "version": platform.version(),
    "machine": platform.machine(),
    "processor": platform.processor(),
    "accelerator": accelerator,
    "cpu_count": os.cpu_count(),
    "python": platform.python_version(),
  }


def now_iso() -> str:
  return dt.datetime.now(tz=dt.timezone.utc).replace(microsecond=0).isoformat()


def jsonable(value):
  """JSON-ready copy: tuples -> lists, numpy scalars -> Python, sets -> sorted lists, other objects -> str."""
  if isinstance(value, Mapping):
    return {str(k): jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [jsonable(v) for v in value]
  if isinstance(value, (set, frozenset)):
    return sorted(jsonable(v) for v in value)
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, float) and not np.isfinite(value):
    return None
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  if hasattr(value, "value") and isinstance(value.value, str):  # enums
    return value.value
  return str(value)


def write_result(result: dict, results_dir: str | os.PathLike, filename: str) -> str:
  os.makedirs(results_dir, exist_ok=True)
  path = os.path.join(results_dir, filename)
  tmp = path + f".tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(jsonable(result), f, indent=2)
    f.write("\n")
  os.replace(tmp, path)
  return path
