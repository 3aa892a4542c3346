"""A short method comparison: a few experiments on the embedded default with a small budget, then the report.

    python -m tools.compare [--backends=jax] [--max_steps=30] [--experiments=lora/smollm2-rank32,...]
    python -m tools.compare --suite          # every experiment, both backends, their own budgets (make suite)

Each experiment runs as its own process (``python -m experiments.run``), so that each peak memory (the process's
peak RSS on a CPU) is its own. The results, the markdown table and the Pareto plot go to ``--results_dir``
(default ``runs/compare``, outside the committed suite results). The default budget keeps the three default
experiments within about 15 minutes on a 2-core CPU with SmolLM2-135M; every budget flag can be overridden.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEFAULT_EXPERIMENTS = ("lora/smollm2-rank32", "lora/smollm2-rank64-rslora", "full-finetuning/smollm2-lr_0.0001")
# flag -> default of the short budget (None: the experiment's own value)
BUDGET = {
  "max_steps": 30,
  "eval_steps": 0,
  "n_valid": 0,
  "n_test": 32,
  "max_new_tokens": None,
  "batch_size": None,
  "max_seq_length": None,
  "n_forgetting": 8,
  "n_inference": 2,
  "inference_max_new_tokens": 8,
}

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_list("experiments", list(DEFAULT_EXPERIMENTS), "experiments (<method>/<name> under experiments/)")
  flags.DEFINE_list(
    "backends",
    ["jax"],
    "backends of every experiment (jax, torch); with both, an experiment "
    "the jax backend cannot run (a method jpeft lacks) runs on torch only",
  )
  flags.DEFINE_bool(
    "suite",
    False,
    "the whole suite: every experiment under experiments/ on jax and torch with "
    "its own budget (the budget flags are then unset unless given), into experiments/results",
  )
  flags.DEFINE_string(
    "results_dir", None, "where results, table and plot go (default: runs/compare; --suite: experiments/results)"
  )
  flags.DEFINE_string("model", None, "model source (default: the experiments' model_id)")
  flags.DEFINE_string("tokenizer", None, "tokenizer source (default: the model's)")
  flags.DEFINE_bool("progress", True, "tqdm bars of the runs")
  flags.DEFINE_bool("keep_going", True, "run the remaining experiments after a failure")
  for name, default in BUDGET.items():
    flags.DEFINE_integer(name, default, f"{name} of every run (unset: the experiment's value)")


def _runs_on_jax(path: str) -> bool:
  from experiments import common
  from jpeft import registry

  exp = common.load_experiment(path)
  return exp.peft_config is None or exp.peft_type in set(registry.registered_peft_types())


def plan(experiments, backends, budget: dict) -> list[tuple[str, str]]:
  """(experiment, backend) pairs in run order: backend by backend, skipping jax for methods jpeft lacks."""
  runs = []
  for backend in backends:
    for experiment in experiments:
      path = experiment if os.path.isdir(experiment) else os.path.join(REPO, "experiments", experiment)
      if backend == "jax" and len(backends) > 1 and not _runs_on_jax(path):
        continue
      runs.append((experiment, backend))
  return runs


def command(experiment: str, backend: str, results_dir: str, budget: dict) -> list[str]:
  path = experiment if os.path.isdir(experiment) else os.path.join(REPO, "experiments", experiment)
  cmd = [
    sys.executable,
    "-m",
    "experiments.run",
    f"--experiment={path}",
    f"--backend={backend}",
    f"--results_dir={results_dir}",
    f"--progress={str(FLAGS.progress).lower()}",
  ]
  for name, value in budget.items():
    if value is not None:
      cmd.append(f"--{name}={value}")
  if FLAGS.model:
    cmd.append(f"--model={FLAGS.model}")
  if FLAGS.tokenizer:
    cmd.append(f"--tokenizer={FLAGS.tokenizer}")
  return cmd


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from experiments.report import make_report

  from experiments import common

  if FLAGS.suite:
    experiments = (
      list(common.list_experiments()) if FLAGS.experiments == list(DEFAULT_EXPERIMENTS) else FLAGS.experiments
    )
    backends = FLAGS.backends if FLAGS["backends"].present else ["jax", "torch"]
    budget = {name: getattr(FLAGS, name) if FLAGS[name].present else None for name in BUDGET}
    results_dir = FLAGS.results_dir or str(common.DEFAULT_RESULTS_DIR)
  else:
    experiments, backends = FLAGS.experiments, FLAGS.backends
    budget = {name: getattr(FLAGS, name) for name in BUDGET}
    results_dir = FLAGS.results_dir or os.path.join(REPO, "runs", "compare")
  unknown = sorted(set(backends) - set(common.BACKENDS))
  if unknown:
    raise app.UsageError(f"unknown backends {unknown}; use {list(common.BACKENDS)}")

  os.makedirs(results_dir, exist_ok=True)
  runs = plan(experiments, backends, budget)
  failed = []
  t0 = time.perf_counter()
  for i, (experiment, backend) in enumerate(runs, 1):
    cmd = command(experiment, backend, results_dir, budget)
    print(f"[{i}/{len(runs)}] {experiment} on {backend}", flush=True)
    t = time.perf_counter()
    rc = subprocess.call(cmd, cwd=REPO)
    print(
      f"[{i}/{len(runs)}] {experiment} on {backend}: {'done' if rc == 0 else f'FAILED (exit {rc})'} in "
      f"{time.perf_counter() - t:.0f}s",
      flush=True,
    )
    if rc != 0:
      failed.append(f"{experiment} [{backend}]")
      if not FLAGS.keep_going:
        break
  report = make_report(results_dir)
  print()
  print(report["table"])
  if report["pairs"]:
    print("\njax / torch, same experiment:\n" + report["pairs_table"])
  print(f"\ntable: {report['table_path']}\nplot: {report['plot_path']}\ntotal {time.perf_counter() - t0:.0f}s")
  if failed:
    print(f"failed: {failed}")
    return 1
  return 0


if __name__ == "__main__":
  define_flags()
  app.run(main)
