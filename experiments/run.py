"""Run one experiment folder on one backend and write its result file.

    python -m experiments.run --experiment=experiments/lora/smollm2-rank32 --backend=jax
    python -m experiments.run --experiment=experiments/ia3/smollm2-lr_0.01 --backend=torch --max_steps=20

The result goes to ``<results_dir>/<method>--<name>--<backend>.json`` in PEFT's schema (``run_info``,
``train_info`` with ``metrics`` per eval step, ``meta_info``) plus the fields listed in
``experiments/README.md``. Every input error (missing folder, unknown training-params key, a dataset without
question/answer fields, an adapter config the backend cannot run, target modules that match no module of the
model's config or that the method cannot adapt) is found before the model is loaded and printed as one
``error: <type>: <message>`` line (exit status 2).

On jax, the compiled train step's memory is predicted before the first step (XLA's buffer assignment at the longest
padded length) and printed; ``--memory_budget=GiB`` stops a run predicted above it before it trains, and with
``--fit_memory`` turns on remat, then splits each batch into micro-batches (same effective batch, same loss), until
the prediction fits.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from absl import app, flags  # noqa: E402

from experiments import common  # noqa: E402
from experiments.runners import run_experiment  # noqa: E402

# command-line overrides of training-params keys (None: keep the experiment's value)
_INT_OVERRIDES = {
  "max_steps": "optimizer steps",
  "batch_size": "train rows per step",
  "batch_size_eval": "prompts per generation batch",
  "eval_steps": "validate every this many steps (0: only the final test)",
  "max_seq_length": "token cap of train examples and prompts",
  "max_new_tokens": "generation budget per prompt (generation_kwargs.max_new_tokens)",
  "seed": "seed of the adapter init and the data order",
  "warmup_steps": "linear warmup steps (default: PEFT's 10% of max_steps for cosine)",
  "n_train": "rows of the train data",
  "n_valid": "rows of the validation data",
  "n_test": "rows of the test data",
  "n_forgetting": "paragraphs of the forgetting text",
  "n_inference": "prompts of the generation-speed measurement",
  "inference_max_new_tokens": "tokens per prompt of the generation-speed measurement",
}
_STR_OVERRIDES = {
  "train_data": "train data source (file, embedded:train, hub id[:split])",
  "valid_data": "validation data source",
  "test_data": "test data source",
  "forgetting_data": "general-text file for the forgetting loss",
  "dtype": "model dtype: float32, bfloat16",
}

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command-line flags (defined only when this module is the program, so importing it defines none)."""
  flags.DEFINE_string("experiment", None, "experiment folder: experiments/<method>/<name>")
  flags.DEFINE_enum("backend", "jax", list(common.BACKENDS), "jax (jpeft) or torch (transformers + PEFT)")
  flags.DEFINE_string(
    "model",
    None,
    "model source instead of the params' model_id: registry name (smollm2-135m), local HF folder, .gguf file or hub id",
  )
  flags.DEFINE_string("tokenizer", None, "tokenizer source (default: the model's)")
  flags.DEFINE_string("results_dir", str(common.DEFAULT_RESULTS_DIR), "where the result JSON goes")
  flags.DEFINE_string(
    "save_dir",
    None,
    "keep the trained adapter in <save_dir>/<method>--<name>--<backend>/ "
    "(default: saved to a temporary folder for its size, then deleted)",
  )
  flags.DEFINE_string("checkpoint_dir", None, "jax: orbax checkpoints of the run (resumes from the latest)")
  flags.DEFINE_float("lr", None, "learning rate (replaces optimizer_kwargs['lr'] only)")
  flags.DEFINE_float(
    "memory_budget",
    None,
    "jax: GiB the compiled train step may take (XLA's prediction, printed before the first step); above it the run "
    "stops before training unless --fit_memory",
  )
  flags.DEFINE_bool(
    "compilation_cache",
    True,
    "jax: keep compiled train steps on disk ($JAX_COMPILATION_CACHE_DIR, else <jpeft cache>/xla), so a second run "
    "of the same experiment loads them instead of compiling",
  )
  flags.DEFINE_bool(
    "fit_memory", False, "jax: over --memory_budget, turn on remat, then micro-batches (same effective batch)"
  )
  flags.DEFINE_bool("progress", True, "show a tqdm progress bar")
  for name, text in _INT_OVERRIDES.items():
    flags.DEFINE_integer(name, None, text)
  for name, text in _STR_OVERRIDES.items():
    flags.DEFINE_string(name, None, text)


def _overrides_from_flags() -> dict:
  out = {}
  for name in list(_INT_OVERRIDES) + list(_STR_OVERRIDES):
    value = getattr(FLAGS, name)
    if value is not None:
      out[name] = value
  return out


def input_errors() -> tuple[type[BaseException], ...]:
  """The exception types that are the user's input, reported as one ``error: ...`` line (exit status 2)."""
  from jpeft import config as config_lib

  # JpeftError: every config, target-module and checkpoint error of jpeft (see jpeft.config.JpeftError)
  return (common.ExperimentError, FileNotFoundError, config_lib.JpeftError)


def launch(
  experiment: str,
  backend: str = "jax",
  *,
  overrides: dict | None = None,
  model: str | None = None,
  lr: float | None = None,
  stderr=None,
  **kwargs,
) -> tuple[int, tuple[dict, str | None] | None]:
  """Check the inputs, then run: ``(0, (result, path))``, or ``(2, None)`` after printing one ``error: ...`` line.

  Before any weight is loaded: the experiment folder and its training params (``common.load_experiment``), and
  the adapter's target modules against the module names of the model's config (``common.check_adapter_targets``).
  ``kwargs`` go to :func:`experiments.runners.run_experiment`.
  """
  stderr = stderr if stderr is not None else sys.stderr
  try:
    # run_experiment checks everything (folder, training params, target modules vs the model's config, data)
    # before any weight loads
    return 0, run_experiment(experiment, backend, overrides=overrides, model=model, lr=lr, **kwargs)
  except input_errors() as exc:
    message = " ".join(str(exc).split("\n"))
    print(f"error: {type(exc).__name__}: {message}", file=stderr)
    return 2, None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.experiment:
    raise app.UsageError("--experiment=experiments/<method>/<name> is required")
  if FLAGS.backend == "jax" and FLAGS.compilation_cache:
    from jpeft.trainer import enable_compilation_cache

    enable_compilation_cache()
  status, outcome = launch(
    FLAGS.experiment,
    FLAGS.backend,
    overrides=_overrides_from_flags(),
    model=FLAGS.model,
    tokenizer=FLAGS.tokenizer,
    results_dir=FLAGS.results_dir,
    save_dir=FLAGS.save_dir,
    checkpoint_dir=FLAGS.checkpoint_dir,
    progress=FLAGS.progress,
    lr=FLAGS.lr,
    memory_budget=FLAGS.memory_budget,
    fit_memory=FLAGS.fit_memory,
  )
  if outcome is None:
    return status
  result, path = outcome
  info = result["train_info"]
  print(
    f"{result['run_info']['experiment_name']} [{FLAGS.backend}]: test accuracy {info['test_accuracy']}, "
    f"train {info['train_time']:.1f}s (+{info['compile_time']:.1f}s compile), "
    f"{(info['tokens_per_sec'] or 0):.0f} tokens/s, peak memory {info['peak_memory_bytes'] / 2**20:.0f} MiB, "
    f"forgetting {info['forgetting']['delta']}"
  )
  predicted = info.get("predicted_memory")
  if predicted:
    print(
      f"memory: predicted train step {predicted['peak_bytes'] / 2**20:.0f} MiB "
      f"(use_gc={predicted['use_gc']}, accum_steps={predicted['accum_steps']}), "
      f"measured process peak {info['peak_memory_bytes'] / 2**20:.0f} MiB ({info['peak_memory_kind']})"
    )
  print(f"result: {path}")
  return 0


if __name__ == "__main__":
  define_flags()
  app.run(main)
