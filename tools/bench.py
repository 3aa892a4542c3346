"""Benchmarks (not tests): jpeft vs transformers/PEFT on the embedded SmolLM2-135M, each side in its own process.

  python -m tools.bench --task=generate     # greedy generation tokens/s (issue: >= 3x transformers)
  python -m tools.bench --task=train_full   # forward+backward+AdamW step, all params, tokens/s and peak memory
  python -m tools.bench --task=train_lora   # LoRA r32 all-linear train step, tokens/s and peak memory
  python -m tools.bench --task=experiment --experiment=lora/smollm2-rank32 [--max_steps=N]
      # one whole experiment on both backends (experiments.run, one process each), then the jpeft/PEFT ratios
      # of train tokens/s and peak memory (targets: >= 1.3x throughput, <= 0.7x peak memory);
      # --from_results=experiments/results reads finished result files instead of running

Figures are medians over the timed repetitions, after compilation/warm-up. Peak memory on a CPU is the
process's peak RSS (both sides load the same fp32 weights); "above load" subtracts the RSS right after the
weights are loaded, which isolates what the step itself needs. On a GPU, the devices' own peak counters.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

from absl import app, flags

flags.DEFINE_enum("task", "train_lora", ["generate", "train_full", "train_lora", "experiment"], "what to measure")
flags.DEFINE_string(
  "experiment", "lora/smollm2-rank32", "experiment (<method>/<name> under experiments/), task=experiment"
)
flags.DEFINE_string("from_results", None, "task=experiment: read both result files from this folder, run nothing")
flags.DEFINE_string("results_dir", None, "task=experiment: where the two runs write (default: runs/bench)")
flags.DEFINE_integer("max_steps", None, "task=experiment: optimizer steps (default: the experiment's)")
flags.DEFINE_string("worker", None, "internal: run one side (jax|torch) and print JSON")
flags.DEFINE_string("model", "smollm2-135m", "model source")
flags.DEFINE_integer("batch", 4, "batch size")
flags.DEFINE_integer("seq", 128, "sequence length (train) / prompt length (generate)")
flags.DEFINE_integer("new_tokens", 64, "new tokens per sequence (generate)")
flags.DEFINE_integer("reps", 5, "timed repetitions")
flags.DEFINE_integer("rank", 32, "LoRA rank (train_lora)")
flags.DEFINE_bool("remat", False, "jpeft: rematerialise decoder layers in the backward pass")
FLAGS = flags.FLAGS

LORA = lambda r: dict(peft_type="LORA", r=r, lora_alpha=2 * r, target_modules="all-linear")  # noqa: E731


def _rss() -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) * 1024
  return 0


def _peak() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _timed(fn) -> tuple[float, float]:
  """(first call's seconds -- compile/warm-up --, median seconds of FLAGS.reps further calls)."""
  t0 = time.perf_counter()
  fn()
  first = time.perf_counter() - t0
  times = []
  for _ in range(FLAGS.reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return first, statistics.median(times)


def _batch(vocab):
  import numpy as np

  rng = np.random.default_rng(0)
  ids = rng.integers(3, vocab, (FLAGS.batch, FLAGS.seq)).astype(np.int32)
  return ids, np.ones_like(ids), ids.copy()


def _worker_jax():
  import jax
  import jax.numpy as jnp
  from jpeft import core, optim, registry, train
  from jpeft.generate import generate
  from jpeft.models import load_model

  config, params = load_model(FLAGS.model)
  loaded = _rss()
  ids, mask, labels = _batch(config.vocab_size)
  out = {"side": "jax", "device": jax.devices()[0].platform}
  if FLAGS.task == "generate":
    gen = lambda: generate(params, config, ids, mask, max_new_tokens=FLAGS.new_tokens, eos_token_id=-1)  # noqa
    out["compile_s"], median = _timed(gen)
    out["tokens_per_s"] = FLAGS.batch * FLAGS.new_tokens / median
  else:
    peft_config = None
    if FLAGS.task == "train_lora":
      peft_config = registry.config_from_dict(LORA(FLAGS.rank))
      trainable, params = core.init(jax.random.key(0), params, peft_config, config)
    else:
      trainable, params = params, {}
    opt = optim.make_optimizer(trainable, peft_config, lr=1e-4, weight_decay=0.1, grad_norm_clip=1.0)
    state = opt.init(trainable)
    step = train.make_train_step(config, peft_config, opt, remat=FLAGS.remat)
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "labels": jnp.asarray(labels)}
    rng = jax.random.key(0)
    t0 = time.perf_counter()
    compiled = step.lower(trainable, state, params, batch, rng).compile()
    mem = compiled.memory_analysis()
    trainable, state, m = step(trainable, state, params, batch, rng)
    jax.block_until_ready(m["loss"])
    out["compile_s"] = time.perf_counter() - t0
    if mem is not None:
      out["xla_temp_bytes"] = int(getattr(mem, "temp_size_in_bytes", 0))
    times = []
    for _ in range(FLAGS.reps):
      t0 = time.perf_counter()
      trainable, state, m = step(trainable, state, params, batch, rng)
      jax.block_until_ready(m["loss"])
      times.append(time.perf_counter() - t0)
    out["tokens_per_s"] = FLAGS.batch * FLAGS.seq / statistics.median(times)
    out["trainable_params"] = core.num_params(trainable)
  dev = jax.devices()[0]
  if dev.platform != "cpu":
    out["peak_bytes"] = int((dev.memory_stats() or {}).get("peak_bytes_in_use", 0))
  else:
    out["peak_bytes"], out["above_load_bytes"] = _peak(), _peak() - loaded
  return out


def _worker_torch():
  import torch
  from backends.torch_backend import TorchBackend

  backend = TorchBackend()
  backend.load_base(FLAGS.model)
  loaded = _rss()
  model = backend.model
  ids, mask, labels = _batch(model.config.vocab_size)
  dev = backend.device
  t_ids, t_mask, t_labels = (torch.tensor(x, device=dev).long() for x in (ids, mask, labels))
  out = {"side": "torch", "device": dev.type, "threads": torch.get_num_threads()}
  sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
  if FLAGS.task == "generate":

    def gen():
      with torch.no_grad():
        model.generate(
          input_ids=t_ids,
          attention_mask=t_mask,
          max_new_tokens=FLAGS.new_tokens,
          min_new_tokens=FLAGS.new_tokens,
          do_sample=False,
          pad_token_id=0,
        )
      sync()

    out["compile_s"], median = _timed(gen)
    out["tokens_per_s"] = FLAGS.batch * FLAGS.new_tokens / median
  else:
    backend.attach_adapter(LORA(FLAGS.rank) if FLAGS.task == "train_lora" else {"peft_type": "FULL"})
    backend.configure_optimizer(lr=1e-4, weight_decay=0.1, grad_norm_clip=1.0)
    out["compile_s"], median = _timed(lambda: (backend.train_step(ids, mask, labels), sync()))
    out["tokens_per_s"] = FLAGS.batch * FLAGS.seq / median
    out["trainable_params"] = backend.num_trainable_params()
  if dev.type == "cuda":
    out["peak_bytes"] = int(torch.cuda.max_memory_allocated())
  else:
    out["peak_bytes"], out["above_load_bytes"] = _peak(), _peak() - loaded
  return out


def _matmul_gflops() -> float:
  """This machine's fp32 matmul throughput (the CPU's physical limit), measured with numpy."""
  import numpy as np

  a = np.random.rand(1024, 1024).astype(np.float32)
  a @ a
  times = []
  for _ in range(5):
    t0 = time.perf_counter()
    a @ a
    times.append(time.perf_counter() - t0)
  return 2 * 1024**3 / statistics.median(times) / 1e9


TARGET_THROUGHPUT, TARGET_MEMORY = 1.3, 0.7


def _experiment_ratios() -> int:
  """Run (or read) one experiment on both backends and print the jax/torch ratios."""
  from experiments import report

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  folder = FLAGS.from_results or FLAGS.results_dir or os.path.join(repo, "runs", "bench")
  if not FLAGS.from_results:
    path = os.path.join(repo, "experiments", FLAGS.experiment)
    for side in ("jax", "torch"):
      cmd = [
        sys.executable,
        "-m",
        "experiments.run",
        f"--experiment={path}",
        f"--backend={side}",
        f"--results_dir={folder}",
        "--progress=false",
      ]
      if FLAGS.max_steps is not None:
        cmd.append(f"--max_steps={FLAGS.max_steps}")
      if FLAGS.model != "smollm2-135m":
        cmd.append(f"--model={FLAGS.model}")
      print(f"running {FLAGS.experiment} on {side} ...", flush=True)
      if subprocess.call(cmd, cwd=repo) != 0:
        raise SystemExit(f"{side} run failed")
  method, _, name = FLAGS.experiment.strip("/").partition("/")
  pairs = [p for p in report.backend_pairs(report.load_rows(folder)) if (p["method"], p["name"]) == (method, name)]
  if not pairs:
    raise SystemExit(f"no jax and torch results of {FLAGS.experiment} in {folder}")
  p = pairs[0]
  print(report.pairs_table(pairs))
  tput, mem = p["tokens_per_sec_ratio"], p["peak_memory_ratio"]
  print(
    f"\n{FLAGS.experiment}: train tokens/s jpeft/PEFT {tput:.2f}x (target >= {TARGET_THROUGHPUT}x: "
    f"{'met' if tput >= TARGET_THROUGHPUT else 'NOT met'}), peak memory {mem:.2f}x (target <= {TARGET_MEMORY}x: "
    f"{'met' if mem <= TARGET_MEMORY else 'NOT met'})"
  )
  return 0


def main(argv):
  del argv
  if FLAGS.task == "experiment" and not FLAGS.worker:
    return _experiment_ratios()
  if FLAGS.worker:
    result = _worker_jax() if FLAGS.worker == "jax" else _worker_torch()
    print("RESULT " + json.dumps(result))
    return
  results = {}
  for side in ("jax", "torch"):
    cmd = [sys.executable, "-m", "tools.bench", f"--worker={side}"] + [a for a in sys.argv[1:]]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
      sys.stderr.write(proc.stderr[-3000:])
      raise SystemExit(f"{side} worker failed")
    results[side] = json.loads(line[0][len("RESULT ") :])
  j, t = results["jax"], results["torch"]
  print(json.dumps(results, indent=2))
  what = {
    "generate": f"generation, batch {FLAGS.batch}, prompt {FLAGS.seq}, {FLAGS.new_tokens} new tokens",
    "train_full": f"full fine-tuning step, batch {FLAGS.batch}x{FLAGS.seq}",
    "train_lora": f"LoRA r{FLAGS.rank} all-linear step, batch {FLAGS.batch}x{FLAGS.seq}",
  }[FLAGS.task]
  print(f"\n{what} on {FLAGS.model} ({j['device']}){' jpeft with remat' if FLAGS.remat else ''}")
  print(
    f"  tokens/s   jpeft {j['tokens_per_s']:.1f}   reference {t['tokens_per_s']:.1f}   "
    f"ratio {j['tokens_per_s'] / t['tokens_per_s']:.2f}x"
  )
  print(
    f"  peak mem   jpeft {j['peak_bytes'] / 2**20:.0f} MiB   reference {t['peak_bytes'] / 2**20:.0f} MiB   "
    f"ratio {j['peak_bytes'] / t['peak_bytes']:.2f}x"
  )
  if "above_load_bytes" in j:
    print(
      f"  above load jpeft {j['above_load_bytes'] / 2**20:.0f} MiB   reference "
      f"{t['above_load_bytes'] / 2**20:.0f} MiB   ratio {j['above_load_bytes'] / max(t['above_load_bytes'], 1):.2f}x"
    )
  print(f"  compile/warm-up  jpeft {j['compile_s']:.1f}s   reference {t['compile_s']:.1f}s")
  if FLAGS.task != "generate" and j["device"] == "cpu":
    gflops = _matmul_gflops()
    flops_per_token = 6 * 135e6 if FLAGS.task == "train_full" else 4 * 135e6  # fwd+bwd (no weight grads for LoRA)
    print(
      f"  machine fp32 matmul {gflops:.0f} GFLOP/s -> MFU jpeft {j['tokens_per_s'] * flops_per_token / gflops / 1e9:.0%}"
      f", reference {t['tokens_per_s'] * flops_per_token / gflops / 1e9:.0%}"
    )


if __name__ == "__main__":
  app.run(main)
