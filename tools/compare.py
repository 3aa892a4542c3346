"""A short method comparison: a few experiments on the embedded default with a small budget, then the report.

    python -m tools.compare [--backend=jax] [--max_steps=6] [--experiments=lora/smollm2-rank32,...]

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

DEFAULT_EXPERIMENTS = ("lora/smollm2-rank32", "lora/smollm2-rank64-rslora", "full-finetuning/smollm2-lr_0.00001")
# flag -> default of the short budget (None: the experiment's own value)
BUDGET = {
    "max_steps": 6,
    "eval_steps": 0,
    "n_valid": 0,
    "n_test": 8,
    "max_new_tokens": 96,
    "batch_size": None,
    "max_seq_length": None,
    "n_forgetting": 8,
    "n_inference": 2,
    "inference_max_new_tokens": 8,
}

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_list("experiments", list(DEFAULT_EXPERIMENTS), "experiments (<method>/<name> under experiments/)")
  flags.DEFINE_enum("backend", "jax", ["jax", "torch"], "backend of every run")
  flags.DEFINE_string("results_dir", os.path.join(REPO, "runs", "compare"), "where results, table and plot go")
  flags.DEFINE_string("model", None, "model source (default: the experiments' model_id)")
  flags.DEFINE_string("tokenizer", None, "tokenizer source (default: the model's)")
  flags.DEFINE_bool("progress", True, "tqdm bars of the runs")
  flags.DEFINE_bool("keep_going", True, "run the remaining experiments after a failure")
  for name, default in BUDGET.items():
    flags.DEFINE_integer(name, default, f"{name} of every run (unset: the experiment's value)")


def command(experiment: str) -> list[str]:
  path = experiment if os.path.isdir(experiment) else os.path.join(REPO, "experiments", experiment)
  cmd = [sys.executable, "-m", "experiments.run", f"--experiment={path}", f"--backend={FLAGS.backend}",
         f"--results_dir={FLAGS.results_dir}", f"--progress={str(FLAGS.progress).lower()}"]
  for name in BUDGET:
    value = getattr(FLAGS, name)
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

  os.makedirs(FLAGS.results_dir, exist_ok=True)
  failed = []
  t0 = time.perf_counter()
  for i, experiment in enumerate(FLAGS.experiments, 1):
    cmd = command(experiment)
    print(f"[{i}/{len(FLAGS.experiments)}] {experiment} on {FLAGS.backend}", flush=True)
    t = time.perf_counter()
    rc = subprocess.call(cmd, cwd=REPO)
    print(f"[{i}/{len(FLAGS.experiments)}] {experiment}: {'done' if rc == 0 else f'FAILED (exit {rc})'} in "
          f"{time.perf_counter() - t:.0f}s", flush=True)
    if rc != 0:
      failed.append(experiment)
      if not FLAGS.keep_going:
        break
  report = make_report(FLAGS.results_dir)
  print()
  print(report["table"])
  print(f"\ntable: {report['table_path']}\nplot: {report['plot_path']}\ntotal {time.perf_counter() - t0:.0f}s")
  if failed:
    print(f"failed: {failed}")
    return 1
  return 0


if __name__ == "__main__":
  define_flags()
  app.run(main)
