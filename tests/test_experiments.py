"""The method-comparison runner: a tiny experiment end to end on both backends, the report, a PEFT-only method on
torch, and the input errors that must come before any training."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from backends.tiny import TINY_LORA, make_experiment_assets, write_json
from experiments import common, report, run, runners

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VOCAB = 320

# a budget that keeps every tiny run to a few seconds: one padded length (256), tiny generations
TINY = dict(
  max_steps=4,
  eval_steps=2,
  batch_size=2,
  batch_size_eval=2,
  n_train=12,
  n_valid=2,
  n_test=2,
  max_new_tokens=4,
  max_seq_length=256,
  pad_multiple=256,
  n_forgetting=3,
  forgetting_max_length=64,
  n_inference=2,
  inference_max_new_tokens=2,
)
LORA = TINY_LORA
SCHEMA = {
  "run_info": ("created_at", "total_time", "experiment_name", "train_config", "peft_config", "error_msg", "backend"),
  "train_info": (
    "accelerator_memory_max",
    "train_time",
    "file_size",
    "num_trainable_params",
    "num_total_params",
    "status",
    "metrics",
    "test_accuracy",
    "peak_memory_bytes",
    "compile_time",
    "tokens_per_sec",
    "forgetting",
    "inference",
    "batch_schedule_sha256",
  ),
  "meta_info": ("model_info", "dataset_info", "package_info", "system_info"),
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  """A tiny random Llama folder, a tiny byte-level BPE tokenizer folder, and experiment folders."""
  root = tmp_path_factory.mktemp("experiments")
  # RandLoRA is a PEFT method jpeft does not implement (the torch backend runs it); if it lands, use one jpeft lacks
  randlora = {"peft_type": "RANDLORA", "r": 4, "target_modules": ["q_proj", "v_proj"]}
  out = make_experiment_assets(
    root,
    {
      "lora/tiny-rank4": {"adapter_config.json": LORA},
      "randlora/tiny-default": {
        "adapter_config.json": randlora,
        "training_params.json": {"optimizer_kwargs": {"lr": 1e-3}},
      },
    },
    vocab_size=VOCAB,
  )
  return dict(out, results=str(root / "results"))


def _run(assets, experiment, backend, **overrides):
  return runners.run_experiment(
    str(assets["exps"] / experiment),
    backend,
    overrides=dict(TINY, **overrides),
    model=assets["model"],
    tokenizer=assets["tokenizer"],
    results_dir=assets["results"],
    progress=False,
  )


@pytest.fixture(scope="module")
def lora_results(assets):
  return {backend: _run(assets, "lora/tiny-rank4", backend) for backend in ("jax", "torch")}


def _scored(assets, info):
  """The test accuracy recomputed from a result's saved predictions and the experiment's own test references."""
  from jpeft.data import accuracy

  exp = common.load_experiment(str(assets["exps"] / "lora" / "tiny-rank4"), overrides=TINY)
  references = [response for _, response in common.load_data(exp.params).test]
  predictions = info["test_predictions_sample"]
  assert len(predictions) == len(references) == TINY["n_test"]
  return accuracy(predictions, references)


def _check_schema(result):
  for section, keys in SCHEMA.items():
    for key in keys:
      assert key in result[section], f"{section}.{key}"


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_tiny_experiment_writes_a_result(assets, lora_results, backend):
  result, path = lora_results[backend]
  assert os.path.basename(path) == f"lora--tiny-rank4--{backend}.json"
  with open(path) as f:
    on_disk = json.load(f)
  _check_schema(on_disk)
  run_info, info = on_disk["run_info"], on_disk["train_info"]
  assert run_info["experiment_name"] == "lora/tiny-rank4" and run_info["backend"] == backend
  assert run_info["peft_config"]["peft_type"] == "LORA" and run_info["peft_config"]["r"] == 4
  assert run_info["train_config"]["model_id"] == assets["model"]
  assert info["status"] == "success"
  # PEFT's metrics: one entry per eval step, then the final test entry
  metrics = info["metrics"]
  assert [m["step"] for m in metrics[:-1]] == [2, 4]
  for m in metrics[:-1]:
    # a fraction of the n_valid = 2 prompts
    assert m["valid accuracy"] * TINY["n_valid"] in (0, 1, 2) and m["train loss"] > 0 and m["train time"] >= 0
  assert set(metrics[-1]) >= {"step", "test accuracy", "train loss", "train total tokens", "forgetting"}
  # the test accuracy is the saved predictions (all n_test of them) scored against the test references
  assert metrics[-1]["test accuracy"] == info["test_accuracy"] == _scored(assets, info)
  assert len(info["losses"]) == TINY["max_steps"]
  assert info["peak_memory_bytes"] > 0 and info["train_time"] > 0 and info["tokens_per_sec"] > 0
  # LoRA r=4 on q (64x64) and v (32x64) in 2 layers; adapter_model.safetensors as saved
  assert info["num_trainable_params"] == 2 * 4 * ((64 + 64) + (64 + 32))
  assert info["file_size"] > info["num_trainable_params"] * 4 and not info["file_size_estimated"]
  forgetting = info["forgetting"]
  assert forgetting["loss_before"] > 0 and forgetting["loss_after"] > 0
  assert forgetting["delta"] == pytest.approx(forgetting["loss_after"] - forgetting["loss_before"])
  inference = info["inference"]
  for key in ("base_tokens_per_sec", "unmerged_tokens_per_sec", "merged_tokens_per_sec"):
    assert inference[key] > 0, key
  assert on_disk["meta_info"]["dataset_info"]["train"]["rows"] == TINY["n_train"]
  predicted = info["predicted_memory"]
  if backend == "jax":  # XLA's buffer assignment of the step, known before it ran
    assert predicted["peak_bytes"] > 0 and predicted["padded_length"] == max(info["padded_lengths"])
    assert (predicted["use_gc"], predicted["accum_steps"], predicted["budget_bytes"]) == (False, 1, None)
  else:
    assert predicted is None


def test_memory_budget_stops_or_fits_a_run_before_it_trains(assets, lora_results, tmp_path, capsys):
  predicted = lora_results["jax"][0]["train_info"]["predicted_memory"]
  budget = (predicted["peak_bytes"] - 1) / 2**30  # one byte under the plain step
  where = dict(
    overrides=TINY, model=assets["model"], tokenizer=assets["tokenizer"], results_dir=str(tmp_path), progress=False
  )
  status, outcome = run.launch(str(assets["exps"] / "lora" / "tiny-rank4"), "jax", memory_budget=budget, **where)
  err = capsys.readouterr().err
  assert status == 2 and outcome is None and "exceeds --memory_budget" in err and "--fit_memory" in err
  # stopped before training: no result, and the cancelled record says why
  assert os.listdir(tmp_path) == ["cancelled"]
  with open(tmp_path / "cancelled" / "lora--tiny-rank4--jax.json") as f:
    cancelled = json.load(f)
  assert "exceeds --memory_budget" in cancelled["run_info"]["error_msg"]
  result, _ = runners.run_experiment(
    str(assets["exps"] / "lora" / "tiny-rank4"), "jax", memory_budget=budget, fit_memory=True, **where
  )
  info = result["train_info"]
  fitted = info["predicted_memory"]
  assert fitted["peak_bytes"] <= fitted["budget_bytes"] == int(budget * 2**30)
  assert (fitted["use_gc"], fitted["accum_steps"]) != (False, 1) and len(fitted["tried"]) >= 2
  assert fitted["tried"][0]["peak_bytes"] == predicted["peak_bytes"]
  # the same effective batch on the same batches: the losses of the plain run, to float rounding
  plain = lora_results["jax"][0]["train_info"]["losses"]
  np.testing.assert_allclose(info["losses"], plain, rtol=1e-4)
  for kwargs, message in (
    ({"fit_memory": True}, "fit_memory needs a memory_budget"),
    ({"memory_budget": -1.0}, "memory_budget must be a positive number"),
  ):
    with pytest.raises(common.ExperimentError, match=message):
      runners.run_experiment(str(assets["exps"] / "lora" / "tiny-rank4"), "jax", overrides=TINY, **kwargs)
  with pytest.raises(common.ExperimentError, match="need the jax backend"):
    runners.run_experiment(str(assets["exps"] / "lora" / "tiny-rank4"), "torch", overrides=TINY, memory_budget=1.0)


def test_both_backends_see_the_same_batches(lora_results):
  jax_info = lora_results["jax"][0]["train_info"]
  torch_info = lora_results["torch"][0]["train_info"]
  assert jax_info["batch_schedule_sha256"] == torch_info["batch_schedule_sha256"]
  assert jax_info["padded_lengths"] == torch_info["padded_lengths"] == [256]
  assert jax_info["train_total_tokens"] == torch_info["train_total_tokens"]
  # B = 0 at init: the first loss is the base model's on the same batch
  assert jax_info["losses"][0] == pytest.approx(torch_info["losses"][0], rel=1e-4)
  # the forgetting loss before training is the base model's on the same texts
  assert jax_info["forgetting"]["loss_before"] == pytest.approx(torch_info["forgetting"]["loss_before"], rel=1e-4)


def test_report_table_and_plot(assets, lora_results, tmp_path):
  out = tmp_path / "table.md"
  rep = report.make_report(assets["results"], out=str(out), plot_path=str(tmp_path / "pareto.png"))
  backends = sorted(r["backend"] for r in rep["rows"] if r["method"] == "lora")
  assert backends == ["jax", "torch"]
  text = out.read_text()
  for column in (
    "test acc",
    "peak mem",
    "train time",
    "tokens/s",
    "ckpt size",
    "trainable params",
    "forgetting",
    "overhead",
  ):
    assert column in text
  assert "| lora | tiny-rank4 | jax |" in text and "| lora | tiny-rank4 | torch |" in text
  with open(rep["plot_path"], "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  # the same experiment on both backends: one pair, its ratios computed from the two result files
  (pair,) = rep["pairs"]
  rows = {r["backend"]: r for r in rep["rows"] if r["method"] == "lora"}
  assert (pair["method"], pair["name"], pair["same_batches"]) == ("lora", "tiny-rank4", True)
  assert pair["tokens_per_sec_ratio"] == pytest.approx(rows["jax"]["tokens_per_sec"] / rows["torch"]["tokens_per_sec"])
  assert pair["peak_memory_ratio"] == pytest.approx(
    rows["jax"]["peak_memory_bytes"] / rows["torch"]["peak_memory_bytes"]
  )
  assert "same experiment on both backends" in text and "| lora/tiny-rank4 |" in text


def test_backend_pairs_flags_different_batches():
  def row(backend, sha, tps, mem):
    return {
      "method": "m",
      "name": "n",
      "backend": backend,
      "max_steps": 3,
      "test_accuracy": 0.5,
      "tokens_per_sec": tps,
      "peak_memory_bytes": mem,
      "memory_baseline_bytes": 100,
      "train_time": 1.0,
      "schedule_sha256": sha,
    }

  (pair,) = report.backend_pairs([row("jax", "a", 30.0, 300), row("torch", "b", 20.0, 600)])
  assert pair["same_batches"] is False and pair["tokens_per_sec_ratio"] == 1.5
  assert pair["peak_memory_ratio"] == 0.5 and pair["peak_above_baseline_ratio"] == 200 / 500
  assert "NO" in report.pairs_table([pair])
  assert report.backend_pairs([row("jax", "a", 30.0, 300)]) == []  # one backend only: no pair


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_a_learnable_task_is_learned_on_both_backends(assets, tmp_path, backend):
  """Every answer is 7 (a local JSONL file): 0 steps score 0, 120 LoRA steps score >= 0.75 (measured: 1.0 on both).

  60 steps were enough when this was written (1.0 jax, 0.875 torch); on a fresh install (transformers 5.24, torch
  2.13) the torch run stops at 0.5 there (half its answers "## 7": the format not yet learned, train loss 1.59 vs
  jax's 1.49 from another LoRA init), so the budget is doubled rather than the bar lowered."""
  from jpeft.data import make_split

  data = tmp_path / "sevens.jsonl"
  with open(data, "w") as f:
    for r in make_split("train", 24, seed=3):
      f.write(json.dumps({"query": r["question"], "response": "#### 7"}) + "\n")
  accuracies = {}
  for steps in (0, 120):
    result, _ = runners.run_experiment(
      str(assets["exps"] / "lora" / "tiny-rank4"),
      backend,
      overrides=dict(
        TINY,
        max_steps=steps,
        eval_steps=0,
        train_data=str(data),
        valid_data=None,
        test_data=str(data),
        n_test=8,
        max_new_tokens=8,
        lr_scheduler="constant",
        optimizer_kwargs={"lr": 3e-2, "weight_decay": 0.0},
      ),
      model=assets["model"],
      tokenizer=assets["tokenizer"],
      results_dir=str(tmp_path / f"results-{steps}"),
      progress=False,
    )
    accuracies[steps] = result["train_info"]["test_accuracy"]
  print(backend, accuracies)
  assert accuracies[0] == 0.0 and accuracies[120] >= 0.75, accuracies


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_untrained_reference_run(assets, tmp_path, backend):
  """0 steps evaluates the untrained model (experiments/base/): the report draws it as a level, not a point."""
  result, path = runners.run_experiment(
    str(assets["exps"] / "lora" / "tiny-rank4"),
    backend,
    overrides=dict(TINY, max_steps=0, eval_steps=0),
    model=assets["model"],
    tokenizer=assets["tokenizer"],
    results_dir=str(tmp_path),
    progress=False,
  )
  info = result["train_info"]
  assert info["status"] == "success" and info["losses"] == [] and info["test_accuracy"] == _scored(assets, info)
  # LoRA at its init is the base model: nothing was forgotten
  assert info["forgetting"]["delta"] == pytest.approx(0.0, abs=1e-5)
  (row,) = report.load_rows(str(tmp_path))
  assert report.is_reference(row) and row["max_steps"] == 0
  rep = report.make_report(str(tmp_path))
  assert rep["plot_path"] is None and "0 steps are the untrained model" in open(rep["table_path"]).read()
  (line,) = [l for l in rep["table"].splitlines() if "tiny-rank4" in l]
  cells = [c.strip() for c in line.strip("|").split("|")]
  assert cells[3] == "0" and cells[4] != "-" and set(cells[6:]) == {"-"}  # accuracy only
  with pytest.raises(common.ExperimentError, match="max_steps must be a non-negative integer"):
    common.make_train_config(common.load_experiment(str(assets["exps"] / "lora" / "tiny-rank4"), {"max_steps": -1}))


def test_compare_plan_runs_peft_only_methods_on_torch_only(assets):
  from tools import compare

  randlora = str(assets["exps"] / "randlora" / "tiny-default")
  runs = compare.plan(["lora/smollm2-rank32", randlora], ["jax", "torch"], {})
  assert runs == [("lora/smollm2-rank32", "jax"), ("lora/smollm2-rank32", "torch"), (randlora, "torch")]
  # asked for jax alone, a method jpeft lacks is still attempted (and fails with a clear error)
  assert compare.plan([randlora], ["jax"], {}) == [(randlora, "jax")]


def test_report_command_line(assets, lora_results, tmp_path):
  out = tmp_path / "README.md"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.report",
      f"--results_dir={assets['results']}",
      f"--out={out}",
      f"--plot={tmp_path / 'plot.png'}",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "tiny-rank4" in proc.stdout and out.exists() and (tmp_path / "plot.png").exists()


def test_pareto_front():
  points = [(100, 0.2), (50, 0.1), (200, 0.2), (300, 0.5), (60, 0.05)]
  assert report.pareto_front(points) == [1, 0, 3]


def test_peft_only_method_runs_on_torch(assets):
  result, path = _run(assets, "randlora/tiny-default", "torch", max_steps=2, eval_steps=0)
  _check_schema(result)
  info = result["train_info"]
  assert result["run_info"]["peft_config"]["peft_type"] == "RANDLORA"
  # RandLoRA r=4 trains, per module, lambda (r, n) and gamma (n, min(in, out)) with n = min(in, out) / r bases:
  # q (64 -> 64): n = 16; v (64 -> 32): n = 8; two layers
  assert info["num_trainable_params"] == 2 * (4 * 16 + 16 * 64 + 4 * 8 + 8 * 32)
  assert len(info["losses"]) == 2 and info["file_size"] > 0
  assert os.path.basename(path) == "randlora--tiny-default--torch.json"
  # the experiment's optimizer_kwargs replaced the default dict whole (PEFT's shallow update)
  assert result["run_info"]["train_config"]["optimizer_kwargs"] == {"lr": 1e-3}


def test_full_finetuning_on_both_backends(assets):
  write_json(
    str(assets["exps"] / "full-finetuning" / "tiny-lr_0.001" / "training_params.json"),
    {"optimizer_kwargs": {"lr": 1e-3}},
  )
  infos = {}
  for backend in ("jax", "torch"):
    result, path = _run(assets, "full-finetuning/tiny-lr_0.001", backend, max_steps=2, eval_steps=0, n_test=1)
    _check_schema(result)
    info = infos[backend] = result["train_info"]
    assert result["run_info"]["peft_config"] is None and result["run_info"]["peft_type"] == "FULL"
    assert info["num_trainable_params"] == info["num_total_params"] > 0
    assert info["file_size_estimated"] and info["file_size"] == 4 * info["num_total_params"]
    assert info["inference"]["unmerged_overhead"] == 0.0
    assert os.path.basename(path) == f"full-finetuning--tiny-lr_0.001--{backend}.json"
  assert infos["jax"]["num_total_params"] == infos["torch"]["num_total_params"]
  assert infos["jax"]["losses"][0] == pytest.approx(infos["torch"]["losses"][0], rel=1e-4)


def test_failed_run_leaves_a_cancelled_record(assets, monkeypatch, tmp_path):
  def fail(self, data):
    raise FloatingPointError("non-finite loss (nan) at step 3")

  monkeypatch.setattr(runners.JaxRunner, "run", fail)
  with pytest.raises(FloatingPointError):
    runners.run_experiment(
      str(assets["exps"] / "lora" / "tiny-rank4"),
      "jax",
      overrides=TINY,
      model=assets["model"],
      tokenizer=assets["tokenizer"],
      results_dir=str(tmp_path),
      progress=False,
    )
  with open(tmp_path / "cancelled" / "lora--tiny-rank4--jax.json") as f:
    record = json.load(f)
  assert record["train_info"]["status"] == "canceled" and "non-finite" in record["run_info"]["error_msg"]
  assert not (tmp_path / "lora--tiny-rank4--jax.json").exists()


# ------------------------------------------------------------------------------------------------------------
# input errors, all before the model is loaded


def _try(assets, folder, backend="jax", **overrides):
  return runners.run_experiment(
    str(folder),
    backend,
    overrides=dict(TINY, **overrides),
    model=assets["model"],
    tokenizer=assets["tokenizer"],
    results_dir=assets["results"],
    progress=False,
    write=False,
  )


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_missing_experiment_folder(assets, no_loading, backend):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    _try(assets, assets["exps"] / "lora" / "no-such-experiment", backend)


def test_adapter_config_required_outside_full_finetuning(assets, no_loading, tmp_path):
  folder = tmp_path / "experiments" / "lora" / "empty"
  folder.mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match="adapter_config.json"):
    _try(assets, folder)


def test_invalid_training_params_key(assets, no_loading, tmp_path):
  folder = tmp_path / "experiments" / "lora" / "typo"
  write_json(str(folder / "adapter_config.json"), LORA)
  write_json(str(folder / "training_params.json"), {"learning_rate": 1e-3})
  with pytest.raises(common.ExperimentError) as info:
    _try(assets, folder)
  message = str(info.value)
  assert "'learning_rate'" in message and "training_params.json" in message
  assert "optimizer_kwargs" in message and "max_steps" in message  # the valid keys are listed


def test_invalid_optimizer_kwargs(assets, no_loading, tmp_path):
  folder = tmp_path / "experiments" / "lora" / "riemannian"
  write_json(str(folder / "adapter_config.json"), LORA)
  write_json(str(folder / "training_params.json"), {"optimizer_type": "riemannian"})
  with pytest.raises(common.ExperimentError, match="riemannian"):
    _try(assets, folder)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_dataset_without_fields(assets, no_loading, tmp_path, backend):
  data = tmp_path / "bad.jsonl"
  data.write_text(json.dumps({"prompt": "1+1?", "completion": "#### 2"}) + "\n")
  with pytest.raises(common.ExperimentError, match=r"train_data .*bad.jsonl.*question/answer fields"):
    _try(assets, assets["exps"] / "lora" / "tiny-rank4", backend, train_data=str(data))
  # the launcher reports it as one error line, not a traceback
  import io

  from experiments import run

  stderr = io.StringIO()
  status, outcome = run.launch(
    str(assets["exps"] / "lora" / "tiny-rank4"),
    backend,
    overrides=dict(TINY, train_data=str(data)),
    model=assets["model"],
    tokenizer=assets["tokenizer"],
    progress=False,
    write=False,
    stderr=stderr,
  )
  (line,) = stderr.getvalue().splitlines()
  assert status == 2 and outcome is None and line.startswith("error: ExperimentError: train_data") and "fields" in line


def test_unsupported_method_on_jax(assets, no_loading):
  from jpeft import config as config_lib

  # RandLoRA is not in jpeft; if it lands, point this test at a PEFT method jpeft still lacks.
  with pytest.raises(config_lib.UnsupportedConfigError, match="RANDLORA"):
    _try(assets, assets["exps"] / "randlora" / "tiny-default", "jax")


def test_full_finetuning_folder_and_shallow_merge(tmp_path):
  exp = common.load_experiment(os.path.join(ROOT, "experiments", "full-finetuning", "smollm2-lr_0.0001"))
  assert exp.is_full_finetuning and exp.method == "full-finetuning" and exp.peft_type == "FULL"
  assert exp.params["optimizer_kwargs"] == {"lr": 1e-4}
  assert exp.result_filename("jax") == "full-finetuning--smollm2-lr_0.0001--jax.json"
  marker = tmp_path / "experiments" / "lora" / "as-full"
  write_json(str(marker / "adapter_config.json"), {"peft_type": "FULL"})
  assert common.load_experiment(marker).is_full_finetuning
  # PEFT's cosine schedule warms up over 10% of max_steps unless told otherwise
  config = common.make_train_config(common.load_experiment(marker, {"max_steps": 50}))
  assert config.warmup_steps == 5 and config.lr_scheduler == "cosine"
  config = common.make_train_config(common.load_experiment(marker, {"max_steps": 50, "warmup_steps": 0}))
  assert config.warmup_steps == 0


def test_suite_folders_are_valid():
  """Every shipped experiment loads; the jax backend accepts exactly the methods jpeft implements."""
  from jpeft import registry
  from jpeft.config import FrozenDict

  names = common.list_experiments()
  for expected in (
    "lora/smollm2-rank32",
    "lora/smollm2-rank64",
    "lora/smollm2-rank64-rslora",
    "lora/smollm2-rank32-lorafa",
    "lora/smollm2-rank32-dora",
    "lora/smollm2-rank32-loraplus",
    "full-finetuning/smollm2-lr_0.0001",
    "base/smollm2-untrained",
  ):
    assert expected in names
  assert {n.split("/")[0] for n in names} >= {"oft", "ia3", "lily", "vera", "fourierft"}
  supported = set(registry.registered_peft_types())
  for name in names:
    exp = common.load_experiment(os.path.join(ROOT, "experiments", name))
    train_config = common.make_train_config(exp)
    assert train_config.max_steps == (0 if name.startswith("base/") else 150), name
    if exp.peft_config is not None and exp.peft_type in supported:
      peft_config = registry.config_from_dict(exp.peft_config)
      assert peft_config.peft_type == exp.peft_type, name
      for key, value in exp.peft_config.items():  # every field as written in the file (PEFT's own reading)
        if hasattr(peft_config, key):
          assert getattr(peft_config, key) == FrozenDict({"v": value})["v"], (name, key)
    # the targets of every adapter resolve against SmolLM2's modules, without loading its weights
    common.check_adapter_targets(exp, "smollm2-135m", "jax" if exp.peft_type in supported else "torch")


def test_committed_results_name_no_machine_path():
  """The committed suite results record the model by registry name and the report by project-relative path."""
  results = os.path.join(ROOT, "experiments", "results")
  files = sorted(f for f in os.listdir(results) if f.endswith(".json"))
  assert files
  for name in files:
    with open(os.path.join(results, name)) as f:
      result = json.load(f)
    sources = (
      result["run_info"]["train_config"]["model_id"],
      result["run_info"]["peft_config"] and result["run_info"]["peft_config"].get("base_model_name_or_path"),
      result["meta_info"]["model_info"]["model_id"],
    )
    for source in sources:
      assert source is None or not os.path.isabs(source), (name, source)
  with open(os.path.join(results, "README.md")) as f:
    head = f.read(2000)
  assert "`experiments/results`" in head and f"`{ROOT}" not in head


def test_a_saved_run_converts_to_lora(assets, tmp_path):
  """``experiments.run --save_dir`` keeps an adapter that ``jpeft.convert`` takes; converted at its own rank (4) the
  LoRA answers the test prompts exactly as the trained adapter, at rank 1 its error shows."""
  from tools.convert_eval import evaluate_conversions, table

  path = str(assets["exps"] / "lora" / "tiny-rank4")
  runners.run_experiment(
    path,
    "jax",
    overrides=TINY,
    model=assets["model"],
    tokenizer=assets["tokenizer"],
    results_dir=str(tmp_path / "results"),
    save_dir=str(tmp_path / "saved"),
    progress=False,
  )
  saved = tmp_path / "saved" / "lora--tiny-rank4--jax"
  assert (saved / "adapter_model.safetensors").is_file()
  result = evaluate_conversions(
    path, str(saved), [4, 1], overrides=TINY, model=assets["model"], tokenizer=assets["tokenizer"], progress=False
  )
  source, exact, truncated = result["rows"]
  assert exact["rel_error"] < 1e-6 and exact["predictions"] == source["predictions"]
  assert exact["test_accuracy"] == source["test_accuracy"]
  assert truncated["rel_error"] > 0.1 and truncated["lora_parameters"] < exact["lora_parameters"]
  assert "| 4 |" in table(result)
