import ast
import json
import operator
import re
from decimal import Decimal

import numpy as np
import pytest

from jpeft.data import (
  DEFAULT_QUERY_TEMPLATE,
  GENERAL_TEXT,
  IGNORE_INDEX,
  PRESETS,
  TEMPLATE_NAMES,
  MathTaskConfig,
  accuracy,
  as_dataset,
  bucket_batches,
  choose_padded_length,
  collate,
  extract_answer,
  format_query,
  is_correct,
  load_general_text,
  load_math_dataset,
  make_problems,
  make_split,
  padded_length_choices,
  parse_number,
  peft_valid_indices,
  tokenize_example,
  tokenize_prompt,
)
from paths import GSM8K_TRAIN


# ---------------------------------------------------------------------------------------------------------------------
# embedded math task
# ---------------------------------------------------------------------------------------------------------------------

_ANNOTATION = re.compile(r"<<([^<>=]+)=([^<>]+)>>(\d+)")
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_OP_SYMBOL = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


def _eval_binop(expr: str):
  node = ast.parse(expr, mode="eval").body
  assert isinstance(node, ast.BinOp) and type(node.op) in _BINOPS, expr
  assert isinstance(node.left, ast.Constant) and isinstance(node.right, ast.Constant), expr
  return _BINOPS[type(node.op)](node.left.value, node.right.value), _OP_SYMBOL[type(node.op)]


def _check_solution(answer: str, config: MathTaskConfig) -> int:
  """Every annotation evaluates to its value, one step per line, and #### N is the last value."""
  lines = answer.split("\n")
  assert re.fullmatch(r"#### \d+", lines[-1]), lines[-1]
  values = []
  for line in lines[:-1]:
    found = _ANNOTATION.findall(line)
    assert len(found) == 1, line
    expr, value, shown = found[0]
    result, op = _eval_binop(expr)
    assert op in config.ops, line
    assert result == int(value) == int(shown), line
    assert 0 <= int(value) <= config.max_result
    # the text before the annotation repeats the expression, GSM8K-style: "a+b = <<a+b=c>>c"
    assert f"{expr} = " in line, line
    values.append(int(value))
  assert config.min_steps <= len(values) <= config.max_steps
  assert int(lines[-1][5:]) == values[-1]
  return values[-1]


def test_generator_is_deterministic_and_seeded():
  a = make_split("train", 60, seed=0)
  assert a == make_split("train", 60, seed=0)
  assert a != make_split("train", 60, seed=1)
  assert all(set(r) == {"question", "answer"} for r in a)


def test_splits_are_disjoint_and_unique():
  splits = {name: make_problems(name, 300, seed=0) for name in ("train", "valid", "test")}
  questions = {name: {p.question for p in probs} for name, probs in splits.items()}
  keys = {name: {p.key for p in probs} for name, probs in splits.items()}
  for name in splits:
    assert len(questions[name]) == 300 and len(keys[name]) == 300
  for x, y in (("train", "valid"), ("train", "test"), ("valid", "test")):
    assert not questions[x] & questions[y]
    assert not keys[x] & keys[y]
  # split membership comes from the problem itself, so it holds across seeds too
  other_seed_test = {p.key for p in make_problems("test", 200, seed=7)}
  assert not other_seed_test & keys["train"]


def test_prefix_stability():
  for name in ("train", "test"):
    long = make_split(name, 150, seed=3)
    assert make_split(name, 40, seed=3) == long[:40]
  assert make_split("valid", 0) == []


@pytest.mark.parametrize("config_name", ["default", "easy", "medium", "hard"])
def test_solutions_are_correct_gsm8k_style(config_name):
  config = PRESETS[config_name]
  problems = make_problems("train", 300, seed=0, config=config) + make_problems("test", 100, seed=0, config=config)
  for p in problems:
    final = _check_solution(p.answer, config)
    assert final == p.final_value
    assert extract_answer(p.answer) == str(final)
    assert p.question.endswith("?") and "####" not in p.question
  if config_name == "default":
    assert PRESETS["default"] == PRESETS["easy"]
    assert {p.num_steps for p in problems} == {1, 2}
    assert not any(p.has_distractor for p in problems)
  if config_name == "medium":
    assert PRESETS["medium"] == MathTaskConfig()
    assert {p.template for p in problems} == set(TEMPLATE_NAMES)
    assert len(TEMPLATE_NAMES) >= 6
    assert {p.num_steps for p in problems} == {2, 3, 4}
    ops_seen = {op for p in problems for op in re.findall(r"<<\d+([-+*/])\d+=", p.answer)}
    assert ops_seen == {"+", "-", "*"}
  if config_name == "hard":
    assert any("/" in p.answer for p in problems)


def _sentences(text: str) -> list[str]:
  return re.split(r"(?<=[.?!]) ", text)


def test_distractor_rate_and_placement():
  for prob in (0.2, 0.5):
    problems = make_problems("train", 600, seed=1, config=MathTaskConfig(distractor_prob=prob))
    rate = sum(p.has_distractor for p in problems) / len(problems)
    assert abs(rate - prob) < 0.07, (prob, rate)

  clean = make_problems("train", 200, seed=2, config=MathTaskConfig(distractor_prob=0.0))
  noisy = make_problems("train", 200, seed=2, config=MathTaskConfig(distractor_prob=1.0))
  assert not any(p.has_distractor for p in clean) and all(p.has_distractor for p in noisy)
  for c, n in zip(clean, noisy):
    # same problem and solution, plus exactly one extra sentence somewhere after the first one
    assert c.key == n.key and c.answer == n.answer
    cs, ns = _sentences(c.question), _sentences(n.question)
    assert len(ns) == len(cs) + 1 and ns[0] == cs[0] and ns[-1] == cs[-1]
    extra = [s for s in ns if s not in cs]
    assert len(extra) == 1 and re.search(r"\d", extra[0])
    # without distractors, every number in the question is used in the solution
    used = set(re.findall(r"\d+", " ".join(m[0] for m in _ANNOTATION.findall(c.answer))))
    assert set(re.findall(r"\d+", c.question)) <= used


def test_config_validation_and_dataset():
  with pytest.raises(ValueError):
    MathTaskConfig(ops=("^",))
  with pytest.raises(ValueError):
    MathTaskConfig(min_steps=3, max_steps=2)
  with pytest.raises(ValueError):
    MathTaskConfig(templates=("no_such_story",))
  with pytest.raises(ValueError):
    make_split("dev", 3)
  cfg = MathTaskConfig(max_steps=3, templates=("farm", "baking"))
  assert MathTaskConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
  assert {p.template for p in make_problems("valid", 40, config=cfg)} <= {"farm", "baking"}
  ds = as_dataset("valid", 12, seed=0)
  assert ds.column_names == ["question", "answer"] and len(ds) == 12
  assert ds[0] == make_split("valid", 1)[0]


# ---------------------------------------------------------------------------------------------------------------------
# answer extraction and accuracy
#
# Expected values below were derived by reading huggingface/peft method_comparison/MetaMathQA/utils.py:
# parse_answer (first matching delimiter of "The answer is: ", "The answer is ", "The final answer is: ",
# "The final answer is ", "#### "; text after its last occurrence, first line, stripped of " .!?$%"),
# convert_to_decimal (Decimal of a number or a two-part fraction) and get_accuracy (floats when both parse, else
# string equality, None -> wrong). That script is not importable from the peft package.
# ---------------------------------------------------------------------------------------------------------------------

EXTRACTION_CASES = [
  ("Natalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72", "72", Decimal(72)),
  ("The answer is: 16", "16", Decimal(16)),
  ("vector v with itself is $4^2 = \\boxed{16}$.The answer is: 16", "16", Decimal(16)),
  ("So she has $1,000 left. The answer is $1,000.", "1,000", None),  # commas are not removed
  ("#### -5", "-5", Decimal(-5)),
  ("The final answer is 3.50!", "3.50", Decimal("3.5")),
  ("The answer is 50%", "50", Decimal(50)),
  ("I think the result is 72", None, None),
  ("#### 72\nQuestion: another one", "72", Decimal(72)),
  ("The answer is 5. #### 6", "5. #### 6", None),  # the first delimiter in the list wins
  ("The answer is: 16\n\nThe answer is: 17", "17", Decimal(17)),  # its last occurrence is used
  ("The answer is: 20/35", "20/35", Decimal(20) / Decimal(35)),
  ("#### 1/0", "1/0", None),
  ("#### 3/4/5", "3/4/5", None),
  ("The answer is:  42 dollars", "42 dollars", None),
  ("#### $ 12 $", "12", Decimal(12)),
  ("#### .5", "5", Decimal(5)),  # leading "." is stripped too
  ("The answer is: 7?!.", "7", Decimal(7)),
  ("   \n#### 7  \n", "7", Decimal(7)),
  ("The answer is: ", None, None),
  ("The Answer is 5", None, None),  # case-sensitive
  ("#### 5e2", "5e2", Decimal(500)),
]


@pytest.mark.parametrize("text,answer,number", EXTRACTION_CASES)
def test_extract_answer_matches_peft(text, answer, number):
  assert extract_answer(text) == answer
  assert parse_number(answer) == number


def test_is_correct_and_accuracy_match_peft():
  assert is_correct("... The answer is: 18.0", "#### 18")
  assert is_correct("The answer is $18.00.", "blah\n#### 18")
  assert is_correct("#### -5", "#### -5.0")
  assert is_correct("The answer is: 0.5714285714285714", "#### 20/35")  # fractions compare as floats
  assert is_correct("The answer is: five", "#### five")  # non-numbers compare as strings
  assert is_correct("#### 1,000", "#### 1,000")
  assert not is_correct("The answer is 1000", "#### 1,000")  # number vs non-number
  assert not is_correct("It is 72", "#### 72")  # no delimiter in the prediction
  assert not is_correct("#### 71", "#### 72")
  with pytest.raises(ValueError):
    is_correct("#### 72", "seventy-two")
  preds = ["Answer: 3+2=5\n#### 5", "The answer is 2", "nothing", "The final answer is 4"]
  refs = ["#### 5", "#### 3", "#### 4", "#### 4"]
  assert accuracy(preds, refs) == 0.5
  with pytest.raises(ValueError):
    accuracy(preds, refs[:2])


def test_format_query_uses_peft_template():
  assert DEFAULT_QUERY_TEMPLATE == "Question: {query} Think step by step.\nAnswer:"
  assert format_query("What is 1+{1}?") == "Question: What is 1+{1}? Think step by step.\nAnswer:"
  assert format_query("x", "Q: {query}\nA:") == "Q: x\nA:"


# ---------------------------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------------------------


def test_load_gsm8k_file_normalises_columns():
  ds = load_math_dataset(str(GSM8K_TRAIN), limit=20)
  assert ds.column_names == ["query", "response"] and len(ds) == 20
  assert ds[0]["query"].startswith("Natalia sold clips")
  assert ds[0]["response"].endswith("#### 72")
  assert all(extract_answer(r) is not None for r in ds["response"])


def test_load_small_files(tmp_path):
  meta = tmp_path / "meta.jsonl"
  rows = [{"query": f"What is {i}+1?", "response": f"The answer is: {i + 1}", "type": "GSM_AnsAug"} for i in range(5)]
  meta.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  ds = load_math_dataset(meta, limit=3)
  assert ds.column_names == ["query", "response"] and len(ds) == 3
  assert ds[2] == {"query": "What is 2+1?", "response": "The answer is: 3"}

  gsm = tmp_path / "gsm.json"
  gsm.write_text(json.dumps([{"question": "Q1?", "answer": "x\n#### 1"}, {"question": "Q2?", "answer": "#### 2"}]))
  ds = load_math_dataset(str(gsm))
  assert ds["query"] == ["Q1?", "Q2?"] and ds["response"] == ["x\n#### 1", "#### 2"]

  import pyarrow as pa
  import pyarrow.parquet as pq

  pq.write_table(pa.table({"question": ["A?"] * 4, "answer": ["#### 1"] * 4}), tmp_path / "gsm.parquet")
  assert len(load_math_dataset(tmp_path / "gsm.parquet", limit=2)) == 2

  long_row = {"query": "q" * 2000, "response": "#### 1"}
  (tmp_path / "long.jsonl").write_text(json.dumps(long_row) + "\n" + json.dumps(rows[0]) + "\n")
  assert len(load_math_dataset(tmp_path / "long.jsonl", max_chars=1300)) == 1


def test_load_errors(tmp_path, monkeypatch):
  import datasets

  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n")

  def _no_load(*args, **kwargs):
    raise AssertionError("the dataset must not be loaded before the fields are checked")

  monkeypatch.setattr(datasets, "load_dataset", _no_load)
  with pytest.raises(ValueError) as err:
    load_math_dataset(bad)
  message = str(err.value)
  assert str(bad) in message and "prompt" in message and "question" in message and "query" in message

  missing = tmp_path / "nope.jsonl"
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    load_math_dataset(str(missing))
  with pytest.raises(ValueError):
    load_math_dataset("embedded:dev")


def test_load_embedded():
  ds = load_math_dataset("embedded:valid", limit=7)
  assert ds.column_names == ["query", "response"] and len(ds) == 7
  expected = make_split("valid", 7)
  assert ds["query"] == [r["question"] for r in expected]
  assert ds["response"] == [r["answer"] for r in expected]
  ds = load_math_dataset("embedded", split="test", limit=3)
  assert ds["query"] == [r["question"] for r in make_split("test", 3)]


def test_peft_valid_indices():
  state = np.random.get_state()[1].copy()
  idx = peft_valid_indices(7473)
  assert len(idx) == 50 and len(set(idx)) == 50 and idx == peft_valid_indices(7473)
  # np.random.seed(0); np.random.shuffle(np.arange(7473)) as in PEFT's get_train_valid_test_datasets
  assert idx[:5] == [6447, 6827, 39, 4229, 5594]
  assert (np.random.get_state()[1] == state).all()


# ---------------------------------------------------------------------------------------------------------------------
# tokenisation
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_tokenizer():
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=400,
    special_tokens=["<eos>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  corpus = [format_query(r["question"]) + r["answer"] for r in make_split("train", 20)]
  tok.train_from_iterator(corpus, trainer)
  return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def test_tokenize_example_masks_prompt(tiny_tokenizer):
  tok = tiny_tokenizer
  query, response = "Tom has 3 apples and buys 2 more. How many?", "3+2 = <<3+2=5>>5\n#### 5"
  ex = tokenize_example(tok, query, response, DEFAULT_QUERY_TEMPLATE, max_length=256)
  prompt_ids = tok(format_query(query))["input_ids"]
  p = ex["prompt_length"]
  assert p == len(prompt_ids) and ex["input_ids"][:p] == prompt_ids
  assert ex["labels"][:p] == [IGNORE_INDEX] * p
  assert ex["labels"][p:] == ex["input_ids"][p:]
  assert ex["input_ids"][-1] == tok.eos_token_id
  assert tok.decode(ex["input_ids"][p:-1]) == response
  assert ex["attention_mask"] == [1] * len(ex["input_ids"])
  assert tokenize_prompt(tok, query) == prompt_ids

  short = tokenize_example(tok, query, response, max_length=10)
  assert len(short["input_ids"]) == 10 and short["input_ids"][-1] == tok.eos_token_id
  assert short["prompt_length"] == 10 and short["labels"] == [IGNORE_INDEX] * 10  # the prompt did not fit

  full = tokenize_example(tok, query, response, mask_prompt=False, add_eos=False)
  assert full["labels"] == full["input_ids"] == tok(format_query(query) + response)["input_ids"]


class _WordTokenizer:
  """Splits on spaces only, so a word can straddle the prompt/answer boundary."""

  eos_token_id = 0

  def __init__(self):
    self.vocab = {}

  def __call__(self, text, add_special_tokens=True):
    return {"input_ids": [self.vocab.setdefault(w, len(self.vocab) + 1) for w in text.split(" ")]}


def test_tokenize_example_boundary_token_counts_as_answer():
  tok = _WordTokenizer()
  ex = tokenize_example(tok, "two plus two", "s: 4 #### 4", "Q: {query} Answer", max_length=64)
  # prompt words: "Q:", "two", "plus", "two", "Answer"; the full text has "Answers:" instead of "Answer"
  assert ex["prompt_length"] == 4
  assert ex["labels"][:4] == [IGNORE_INDEX] * 4 and ex["labels"][4] == ex["input_ids"][4] != IGNORE_INDEX


# ---------------------------------------------------------------------------------------------------------------------
# batching
# ---------------------------------------------------------------------------------------------------------------------


def test_bucket_batches_cover_every_index_and_group_lengths():
  rng = np.random.default_rng(0)
  lengths = rng.integers(10, 700, size=1003)
  batches = list(bucket_batches(lengths, 8, seed=0, bucket_factor=20))
  flat = [i for b in batches for i in b]
  assert sorted(flat) == list(range(1003))
  assert all(len(b) == 8 for b in batches[:-1]) and len(batches[-1]) == 1003 % 8
  assert batches == list(bucket_batches(lengths, 8, seed=0, bucket_factor=20))
  assert batches != list(bucket_batches(lengths, 8, seed=1, bucket_factor=20))

  # inside each bucket, lengths go from long to short
  per_bucket = 8 * 20
  for start in range(0, len(flat), per_bucket):
    seg = lengths[flat[start : start + per_bucket]]
    assert (np.diff(seg) <= 0).all()
  spread = np.mean([np.ptp(lengths[b]) for b in batches])
  random_spread = np.mean([np.ptp(lengths[rng.permutation(1003)[:8]]) for _ in range(100)])
  assert spread < random_spread / 4

  kept = list(bucket_batches(lengths, 8, seed=0, drop_last=True))
  assert all(len(b) == 8 for b in kept) and len(kept) == 1003 // 8
  rounded = list(bucket_batches(lengths, 8, seed=0, pad_to_multiple=64))
  assert sorted(i for b in rounded for i in b) == list(range(1003))
  assert list(bucket_batches([5, 3, 9], 2, seed=0, shuffle=False)) == [[2, 0], [1]]


def test_padded_lengths_and_collate():
  assert [choose_padded_length(n) for n in (0, 1, 64, 65, 700)] == [64, 64, 64, 128, 704]
  assert choose_padded_length(760, max_length=768) == 768
  assert [choose_padded_length(n, powers_of_two=True) for n in (1, 65, 300)] == [64, 128, 512]
  assert choose_padded_length(600, max_length=768, powers_of_two=True) == 768
  with pytest.raises(ValueError):
    choose_padded_length(800, max_length=768)
  assert padded_length_choices(768, powers_of_two=True) == [64, 128, 256, 512, 768]
  assert padded_length_choices(256) == [64, 128, 192, 256]
  lengths = np.arange(1, 769)
  shapes = {choose_padded_length(int(n), max_length=768) for n in lengths}
  assert shapes == set(padded_length_choices(768))

  examples = [
    {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7], "attention_mask": [1, 1, 1]},
    {"input_ids": [8], "labels": [8], "attention_mask": [1]},
  ]
  right = collate(examples, pad_token_id=0, multiple=4, batch_size=3)
  assert right["input_ids"].shape == (3, 4) and right["input_ids"].dtype == np.int32
  assert right["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0], [0, 0, 0, 0]]
  assert right["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
  assert right["labels"][0].tolist() == [IGNORE_INDEX, 6, 7, IGNORE_INDEX]
  left = collate(examples, pad_token_id=0, length=4, padding_side="left")
  assert left["input_ids"].tolist() == [[0, 5, 6, 7], [0, 0, 0, 8]]
  with pytest.raises(ValueError):
    collate(examples, pad_token_id=0, length=2)


# ---------------------------------------------------------------------------------------------------------------------
# general text
# ---------------------------------------------------------------------------------------------------------------------


def test_general_text_builtin():
  texts = load_general_text()
  assert texts == list(GENERAL_TEXT) and len(texts) >= 40 and len(set(texts)) == len(texts)
  for t in texts:
    assert 60 <= len(t.split()) <= 120
    assert "####" not in t and "<<" not in t
  assert load_general_text(limit=3) == texts[:3]


def test_general_text_from_files(tmp_path):
  txt = tmp_path / "corpus.txt"
  txt.write_text("First paragraph\nwith two lines.\n\n\n  Second paragraph.  \n \nThird.\n")
  assert load_general_text(txt) == ["First paragraph\nwith two lines.", "Second paragraph.", "Third."]
  jl = tmp_path / "corpus.jsonl"
  jl.write_text(json.dumps({"text": "a b c", "id": 1}) + "\n\n" + json.dumps({"text": "d e"}) + "\n")
  assert load_general_text(str(jl)) == ["a b c", "d e"]
  (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
  with pytest.raises(ValueError, match="text"):
    load_general_text(tmp_path / "bad.jsonl")
  with pytest.raises(FileNotFoundError):
    load_general_text(tmp_path / "missing.txt")
