"""Math QA data: loading, prompt formatting, answer scoring, tokenisation and length bucketing.

The prompt formatting, answer parsing and accuracy rule follow the Hugging Face PEFT ``method_comparison/MetaMathQA``
benchmark (``utils.parse_answer``, ``utils.convert_to_decimal``, ``utils.get_accuracy`` and ``data.py``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from decimal import Decimal, DivisionByZero, InvalidOperation
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

__all__ = [
  "DEFAULT_QUERY_TEMPLATE",
  "GSM8K_HUB_ID",
  "METAMATHQA_HUB_ID",
  "CHAR_LIMIT",
  "PEFT_VALID_SIZE",
  "PEFT_BUCKET_FACTOR",
  "IGNORE_INDEX",
  "EMBEDDED_DEFAULT_SIZES",
  "load_math_dataset",
  "peft_valid_indices",
  "format_query",
  "extract_answer",
  "parse_number",
  "is_correct",
  "accuracy",
  "tokenize_example",
  "tokenize_prompt",
  "bucket_batches",
  "choose_padded_length",
  "padded_length_choices",
  "collate",
]

DEFAULT_QUERY_TEMPLATE = "Question: {query} Think step by step.\nAnswer:"
GSM8K_HUB_ID = "openai/gsm8k"
METAMATHQA_HUB_ID = "meta-math/MetaMathQA"
# PEFT drops MetaMathQA rows with len(f"{query} {response}") > CHAR_LIMIT
CHAR_LIMIT = 1300
# PEFT validates on VALID_SIZE GSM8K-train rows picked with np.random.seed(0) + shuffle
PEFT_VALID_SIZE = 50
PEFT_BUCKET_FACTOR = 20
IGNORE_INDEX = -100
EMBEDDED_PREFIX = "embedded"
EMBEDDED_DEFAULT_SIZES = {"train": 5000, "valid": 50, "test": 500}

# accepted (query field, response field) pairs, in order of preference
_FIELD_PAIRS = (("query", "response"), ("question", "answer"))
_GSM8K_IDS = ("openai/gsm8k", "gsm8k")


# --------------------------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------------------------


def _fields_error(where: str, found: Sequence[str]) -> ValueError:
  need = " or ".join(f"({q!r}, {r!r})" for q, r in _FIELD_PAIRS)
  return ValueError(
    f"{where}: cannot find the question/answer fields; found fields {sorted(found)}, "
    f"need {need} (GSM8K uses question/answer, MetaMathQA uses query/response)"
  )


def _pick_fields(columns: Sequence[str], where: str) -> tuple[str, str]:
  cols = set(columns)
  for q, r in _FIELD_PAIRS:
    if q in cols and r in cols:
      return q, r
  raise _fields_error(where, list(columns))


def _first_jsonl_record(path: Path) -> Any:
  with open(path, encoding="utf-8") as fh:
    for lineno, line in enumerate(fh, 1):
      if line.strip():
        try:
          return json.loads(line)
        except json.JSONDecodeError as exc:
          raise ValueError(f"{path}: line {lineno} is not valid JSON ({exc})") from None
  raise ValueError(f"{path}: the file contains no records")


def _peek_columns(path: Path) -> list[str]:
  """Field names of a local data file, read without loading the whole dataset."""
  suffix = path.suffix.lower()
  if suffix == ".parquet":
    import pyarrow.parquet as pq

    return list(pq.read_schema(path).names)

  if suffix == ".jsonl":
    first = _first_jsonl_record(path)
  else:  # .json: a list of records, a dict of columns, a single record, or JSON lines
    text = path.read_text(encoding="utf-8")
    try:
      obj = json.loads(text)
    except json.JSONDecodeError:
      first = _first_jsonl_record(path)
    else:
      if isinstance(obj, list):
        if not obj:
          raise ValueError(f"{path}: the file contains no records")
        first = obj[0]
      else:
        first = obj
  if not isinstance(first, dict):
    raise ValueError(f"{path}: expected JSON objects with named fields, got {type(first).__name__}")
  return list(first.keys())


def _is_local_source(source: str) -> bool:
  if os.path.exists(source):
    return True
  lowered = source.lower()
  if lowered.endswith((".jsonl", ".json", ".parquet")):
    return True
  return source.startswith(("/", "./", "../", "~"))


def peft_valid_indices(num_rows: int, valid_size: int = PEFT_VALID_SIZE) -> list[int]:
  """Indices of the GSM8K train rows PEFT uses as its validation set (``np.random.seed(0)`` then shuffle)."""
  state = np.random.get_state()
  try:
    np.random.seed(0)
    indices = np.arange(num_rows)
    np.random.shuffle(indices)
  finally:
    np.random.set_state(state)
  return [int(i) for i in indices[:valid_size]]


def load_math_dataset(
  source: Union[str, os.PathLike],
  *,
  split: Optional[str] = None,
  limit: Optional[int] = None,
  max_chars: Optional[int] = None,
  hub_config: Optional[str] = None,
  seed: int = 0,
  task_config=None,
):
  """Load a math QA dataset as a ``datasets.Dataset`` with exactly the columns ``query`` and ``response``.

  Args:
      source: one of
          - a local ``.jsonl``/``.json``/``.parquet`` file (GSM8K ``question``/``answer`` or MetaMathQA
            ``query``/``response`` fields); ``split`` is ignored;
          - ``"embedded:<split>"`` (or ``"embedded"`` plus ``split``): the built-in generator of
            ``jpeft.data.math_task``; ``limit`` (default ``EMBEDDED_DEFAULT_SIZES[split]``) sets the size;
          - a Hugging Face hub dataset id such as ``"openai/gsm8k"`` (its ``"main"`` config is used unless
            ``hub_config`` says otherwise) or ``"meta-math/MetaMathQA"``; ``split`` defaults to ``"train"``.
      split: the split to load (embedded or hub sources).
      limit: keep only the first ``limit`` rows (after the ``max_chars`` filter).
      max_chars: drop rows with ``len(f"{query} {response}") > max_chars`` (PEFT uses ``CHAR_LIMIT`` on MetaMathQA).
      hub_config: dataset config name for hub sources.
      seed, task_config: generator seed and ``MathTaskConfig`` for embedded sources.

  Raises:
      FileNotFoundError: a local path that does not exist.
      ValueError: a file without the needed fields (raised before the dataset is loaded), an unknown split, or a
          negative ``limit``.
  """
  import datasets

  if limit is not None and limit < 0:
    raise ValueError(f"limit must be >= 0, got {limit}")
  source_str = os.fspath(source)

  if source_str == EMBEDDED_PREFIX or source_str.startswith(EMBEDDED_PREFIX + ":"):
    from .math_task import SPLITS, make_split

    name = source_str.partition(":")[2] or split or "train"
    if split is not None and split != name:
      raise ValueError(f"split={split!r} conflicts with source {source_str!r}")
    if name not in SPLITS:
      raise ValueError(f"unknown embedded split {name!r}; expected one of {SPLITS}")
    n = limit if limit is not None else EMBEDDED_DEFAULT_SIZES[name]
    records = make_split(name, n, seed=seed, config=task_config)
    ds = datasets.Dataset.from_dict(
      {"query": [r["question"] for r in records], "response": [r["answer"] for r in records]}
    )
    if max_chars is not None:
      ds = _filter_chars(ds, max_chars)
    return ds

  if isinstance(source, os.PathLike) or _is_local_source(source_str):
    path = Path(source_str).expanduser()
    if not path.exists():
      raise FileNotFoundError(f"math dataset file not found: {path}")
    if path.is_dir():
      ds = datasets.load_from_disk(str(path))
      if isinstance(ds, datasets.DatasetDict):
        ds = ds[split or "train"]
      q_col, r_col = _pick_fields(ds.column_names, str(path))
    else:
      suffix = path.suffix.lower()
      if suffix not in (".jsonl", ".json", ".parquet"):
        raise ValueError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json or .parquet")
      q_col, r_col = _pick_fields(_peek_columns(path), str(path))
      builder = "parquet" if suffix == ".parquet" else "json"
      ds = datasets.load_dataset(builder, data_files=str(path), split="train")
      q_col, r_col = _pick_fields(ds.column_names, str(path))
  else:
    config = hub_config
    if config is None and source_str.lower() in _GSM8K_IDS:
      config = "main"
    ds = datasets.load_dataset(source_str, config, split=split or "train")
    q_col, r_col = _pick_fields(ds.column_names, source_str)

  ds = ds.select_columns([q_col, r_col])
  if (q_col, r_col) != ("query", "response"):
    ds = ds.rename_columns({q_col: "query", r_col: "response"})
  if max_chars is not None:
    ds = _filter_chars(ds, max_chars)
  if limit is not None and limit < len(ds):
    ds = ds.select(range(limit))
  return ds


def _filter_chars(ds, max_chars: int):
  keep = [i for i, (q, r) in enumerate(zip(ds["query"], ds["response"])) if len(f"{q} {r}") <= max_chars]
  return ds.select(keep) if len(keep) < len(ds) else ds


# --------------------------------------------------------------------------------------------------------------------
# prompts and answer scoring
# --------------------------------------------------------------------------------------------------------------------


def format_query(query: str, template: str = DEFAULT_QUERY_TEMPLATE) -> str:
  """The prompt for ``query``: ``template.format(query=query)`` as in PEFT's ``data.py``."""
  return template.format(query=query)


# order matters: the first delimiter present in the text is used, and its last occurrence
_ANSWER_DELIMITERS = (
  "The answer is: ",
  "The answer is ",
  "The final answer is: ",
  "The final answer is ",
  "#### ",
)


def extract_answer(text: str) -> Optional[str]:
  """The final-answer string of a solution or a model output, or ``None`` if it has no answer marker.

  Same rule as PEFT's ``method_comparison/MetaMathQA/utils.py::parse_answer``: strip the text and trailing
  ``.!?``; take the first of ``"The answer is: "``, ``"The answer is "``, ``"The final answer is: "``,
  ``"The final answer is "``, ``"#### "`` that occurs; keep what follows its last occurrence up to the next newline;
  strip spaces and ``.!?$%`` from both ends. Commas are kept (``"1,000"`` is then not a number).
  """
  text = text.strip().rstrip(".!?")
  for delimiter in _ANSWER_DELIMITERS:
    if delimiter in text:
      break
  else:
    return None
  answer = text.rpartition(delimiter)[2].strip()
  answer = answer.split("\n", 1)[0]
  return answer.strip(" .!?$%")


def parse_number(s: Optional[str]) -> Optional[Decimal]:
  """``Decimal`` value of a number (``"13"``, ``"-2.5"``) or a fraction (``"20/14"``); ``None`` otherwise.

  Same rule as PEFT's ``utils.py::convert_to_decimal``.
  """
  if s is None:
    return None
  try:
    s = s.strip()
    if "/" in s:
      parts = s.split("/")
      if len(parts) != 2:
        return None
      numerator = Decimal(parts[0].strip())
      denominator = Decimal(parts[1].strip())
      if denominator == 0:
        return None
      return numerator / denominator
    return Decimal(s)
  except (DivisionByZero, InvalidOperation, ValueError):
    return None


def _comparable(parsed: str) -> Union[float, str]:
  value = parse_number(parsed)
  if value is not None:
    try:
      return float(value)
    except ValueError:  # signalling NaN
      return parsed
  return parsed


def is_correct(prediction_text: str, reference_answer_text: str) -> bool:
  """Whether a model output gets the reference solution's final answer right (PEFT's ``get_accuracy`` rule).

  Both final answers are extracted with ``extract_answer``; numbers (and fractions) are compared as floats, and
  answers that are not numbers are compared as strings (a number never equals a non-number). A prediction without
  an answer marker is wrong.

  Raises:
      ValueError: the reference has no answer marker (PEFT raises as well).
  """
  reference = extract_answer(reference_answer_text)
  if reference is None:
    raise ValueError(f"Error encountered while trying to parse response: {reference_answer_text}")
  prediction = extract_answer(prediction_text)
  if prediction is None:
    return False
  return _comparable(prediction) == _comparable(reference)


def accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
  """Fraction of ``predictions`` that ``is_correct`` judges right against ``references``."""
  if len(predictions) != len(references):
    raise ValueError(f"Prediction length mismatch: {len(predictions)} != {len(references)}")
  if not predictions:
    raise ValueError("accuracy of an empty list of predictions is undefined")
  correct = [is_correct(p, r) for p, r in zip(predictions, references)]
  return sum(correct) / len(correct)


# --------------------------------------------------------------------------------------------------------------------
# tokenisation
# --------------------------------------------------------------------------------------------------------------------


def _ids(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
  out = tokenizer(text, add_special_tokens=add_special_tokens)
  ids = out["input_ids"] if hasattr(out, "keys") else out
  return [int(i) for i in ids]


def tokenize_prompt(
  tokenizer,
  query: str,
  template: str = DEFAULT_QUERY_TEMPLATE,
  max_length: Optional[int] = None,
  *,
  add_special_tokens: bool = True,
) -> list[int]:
  """Token ids of the prompt alone, for generation (PEFT's ``tokenize_wo_answer``; keeps the first ``max_length``)."""
  ids = _ids(tokenizer, format_query(query, template), add_special_tokens)
  return ids[:max_length] if max_length is not None else ids


def tokenize_example(
  tokenizer,
  query: str,
  response: str,
  template: str = DEFAULT_QUERY_TEMPLATE,
  max_length: int = 768,
  *,
  mask_prompt: bool = True,
  add_eos: bool = True,
  add_special_tokens: bool = True,
) -> dict[str, Any]:
  """Tokenise one training example: prompt (``format_query``) immediately followed by ``response``.

  The text is ``template.format(query=query) + response`` (no separator), tokenised in one piece as PEFT's
  ``tokenize_with_answer`` does. The prompt length is the longest common prefix of the token ids of the prompt
  alone and of the full text, so a token that straddles the prompt/answer boundary counts as an answer token.

  Returns a dict with ``input_ids``, ``labels`` (copy of ``input_ids`` with ``IGNORE_INDEX`` on prompt tokens when
  ``mask_prompt``), ``attention_mask`` and ``prompt_length``. With ``add_eos`` the EOS id is appended (and
  labelled) unless the tokenizer already ended the sequence with it. The result never exceeds ``max_length``
  tokens: the text is cut first, EOS is kept.

  PEFT itself trains on the full sequence (prompt included) and labels one EOS via right padding with
  ``pad_token = eos_token``; ``mask_prompt=False`` reproduces that loss.
  """
  if max_length < 1:
    raise ValueError(f"max_length must be >= 1, got {max_length}")
  prompt = format_query(query, template)
  prompt_ids = _ids(tokenizer, prompt, add_special_tokens)
  ids = _ids(tokenizer, prompt + response, add_special_tokens)

  prompt_length = 0
  for a, b in zip(prompt_ids, ids):
    if a != b:
      break
    prompt_length += 1

  if add_eos:
    eos = tokenizer.eos_token_id
    if eos is None:
      raise ValueError("add_eos=True but the tokenizer has no eos_token_id")
    if ids and ids[-1] == eos:
      ids = ids[:-1]
    ids = ids[: max_length - 1] + [int(eos)]
  else:
    ids = ids[:max_length]

  labels = list(ids)
  if mask_prompt:
    for i in range(min(prompt_length, len(labels))):
      labels[i] = IGNORE_INDEX
  return {
    "input_ids": ids,
    "labels": labels,
    "attention_mask": [1] * len(ids),
    "prompt_length": min(prompt_length, len(ids)),
  }


# --------------------------------------------------------------------------------------------------------------------
# batching
# --------------------------------------------------------------------------------------------------------------------


def bucket_batches(
  lengths: Sequence[int],
  batch_size: int,
  *,
  seed: int,
  bucket_factor: int = PEFT_BUCKET_FACTOR,
  pad_to_multiple: Optional[int] = None,
  shuffle: bool = True,
  drop_last: bool = False,
) -> Iterator[list[int]]:
  """Yield batches of indices into ``lengths`` such that each batch holds examples of similar length.

  The indices are shuffled with ``seed`` (unless ``shuffle=False``), cut into buckets of
  ``batch_size * bucket_factor`` consecutive indices, each bucket is sorted by length from long to short and cut
  into batches (the PEFT ``BucketIterator`` scheme). With ``pad_to_multiple`` lengths are first rounded up to that
  multiple, so examples that pad to the same length keep their shuffled order. Every index is yielded exactly once
  per call; with ``drop_last`` a final batch smaller than ``batch_size`` is dropped instead. Use a different seed
  (e.g. ``seed + epoch``) for each epoch.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if bucket_factor < 1:
    raise ValueError(f"bucket_factor must be >= 1, got {bucket_factor}")
  if pad_to_multiple is not None and pad_to_multiple < 1:
    raise ValueError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
  lens = np.asarray(lengths, dtype=np.int64)
  if lens.ndim != 1:
    raise ValueError("lengths must be a 1-D sequence")
  n = len(lens)
  order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
  keys = lens if pad_to_multiple is None else -(-lens // pad_to_multiple) * pad_to_multiple
  bucket_size = batch_size * bucket_factor
  for start in range(0, n, bucket_size):
    bucket = order[start : start + bucket_size]
    bucket = bucket[np.argsort(-keys[bucket], kind="stable")]
    for j in range(0, len(bucket), batch_size):
      batch = bucket[j : j + batch_size]
      if drop_last and len(batch) < batch_size:
        continue
      yield [int(i) for i in batch]


def padded_length_choices(max_length: int, *, multiple: int = 64, powers_of_two: bool = False) -> list[int]:
  """All lengths ``choose_padded_length`` can return for inputs up to ``max_length``."""
  if max_length < 1 or multiple < 1:
    raise ValueError("max_length and multiple must be >= 1")
  out: list[int] = []
  if powers_of_two:
    p = multiple
    while p < max_length:
      out.append(p)
      p *= 2
  else:
    out = list(range(multiple, max_length, multiple))
  out.append(max_length)
  return out


def choose_padded_length(
  length: int, *, multiple: int = 64, max_length: Optional[int] = None, powers_of_two: bool = False
) -> int:
  """Padded sequence length for a batch whose longest example has ``length`` tokens.

  Rounds up to a multiple of ``multiple`` (or to ``multiple * 2**k`` with ``powers_of_two``), capped at
  ``max_length``, so a jitted step sees a small fixed set of shapes (see ``padded_length_choices``).
  """
  if multiple < 1:
    raise ValueError(f"multiple must be >= 1, got {multiple}")
  if length < 0:
    raise ValueError(f"length must be >= 0, got {length}")
  if max_length is not None and length > max_length:
    raise ValueError(f"length {length} exceeds max_length {max_length}")
  length = max(length, 1)
  if powers_of_two:
    padded = multiple
    while padded < length:
      padded *= 2
  else:
    padded = -(-length // multiple) * multiple
  if max_length is not None:
    padded = min(padded, max_length)
  return padded


def collate(
  examples: Sequence[Mapping[str, Sequence[int]]],
  *,
  pad_token_id: int,
  length: Optional[int] = None,
  multiple: int = 64,
  max_length: Optional[int] = None,
  powers_of_two: bool = False,
  padding_side: str = "right",
  batch_size: Optional[int] = None,
) -> dict[str, np.ndarray]:
  """Pad tokenised examples into int32 arrays ``input_ids``, ``attention_mask`` and (if present) ``labels``.

  The padded length is ``length`` or ``choose_padded_length`` of the longest example. Pad positions get
  ``pad_token_id``, attention 0 and label ``IGNORE_INDEX``. ``batch_size`` adds empty rows (all padding) so the
  batch dimension is fixed too. Examples longer than the padded length are an error.
  """
  if padding_side not in ("right", "left"):
    raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
  if not examples:
    raise ValueError("cannot collate an empty batch")
  longest = max(len(ex["input_ids"]) for ex in examples)
  if length is None:
    length = choose_padded_length(longest, multiple=multiple, max_length=max_length, powers_of_two=powers_of_two)
  if longest > length:
    raise ValueError(f"example of {longest} tokens does not fit the padded length {length}")
  rows = len(examples) if batch_size is None else batch_size
  if rows < len(examples):
    raise ValueError(f"batch_size {batch_size} is smaller than the number of examples {len(examples)}")
  has_labels = all("labels" in ex for ex in examples)

  input_ids = np.full((rows, length), pad_token_id, dtype=np.int32)
  attention = np.zeros((rows, length), dtype=np.int32)
  labels = np.full((rows, length), IGNORE_INDEX, dtype=np.int32)
  for i, ex in enumerate(examples):
    n = len(ex["input_ids"])
    sl = slice(0, n) if padding_side == "right" else slice(length - n, length)
    input_ids[i, sl] = ex["input_ids"]
    attention[i, sl] = ex.get("attention_mask", [1] * n)
    if has_labels:
      labels[i, sl] = ex["labels"]
  out = {"input_ids": input_ids, "attention_mask": attention}
  if has_labels:
    out["labels"] = labels
  return out
