"""The comparison table and the Pareto plot over all result files.

    python -m experiments.report [--results_dir=experiments/results] [--out=experiments/results/README.md]

Reads every ``*.json`` result in ``--results_dir`` (this runner's files, and PEFT's own result files, whose
missing fields show as ``-``), prints a markdown table, writes it to ``--out``, and draws test accuracy against
peak memory (marker size: checkpoint size; marker shape and colour: backend; the Pareto front: no other run
has both less memory and a higher accuracy) to ``--plot``.
"""

from __future__ import annotations

import glob
import json
import math
import os
from typing import Any, Sequence

from absl import app, flags

from experiments import common

COLUMNS = (
  "method",
  "name",
  "backend",
  "steps",
  "test acc",
  "valid acc",
  "peak mem (MiB)",
  "predicted step (MiB)",
  "train time (s)",
  "compile (s)",
  "tokens/s",
  "ckpt size (MB)",
  "trainable params",
  "forgetting Δ",
  "gen overhead unmerged",
  "gen overhead merged",
)
_BACKEND_STYLE = {"jax": ("o", "tab:blue"), "torch": ("s", "tab:orange")}
_OTHER_STYLE = ("^", "tab:gray")


def _last(metrics: Sequence[dict], key: str):
  for entry in reversed(metrics or []):
    if entry.get(key) is not None:
      return entry[key]
  return None


def summarize(result: dict, filename: str = "") -> dict:
  """The report row of one result file (this runner's or PEFT's)."""
  run, info = result.get("run_info", {}), result.get("train_info", {})
  metrics = info.get("metrics") or []
  experiment = run.get("experiment_name") or os.path.basename(filename).rsplit(".", 1)[0].replace("--", "/", 1)
  method, _, name = experiment.partition("/")
  backend = run.get("backend")
  if backend is None:  # a PEFT result file
    stem = os.path.basename(filename).rsplit(".", 1)[0]
    backend = stem.split("--")[2] if stem.count("--") >= 2 else "peft"
  forgetting = info.get("forgetting")
  forgetting_delta = forgetting.get("delta") if isinstance(forgetting, dict) else _last(metrics, "forgetting")
  inference = info.get("inference") or {}
  test_acc = info.get("test_accuracy", _last(metrics, "test accuracy"))
  train_config = run.get("train_config") or {}
  return {
    "method": method,
    "name": name,
    "backend": backend,
    "max_steps": train_config.get("max_steps"),
    "schedule_sha256": info.get("batch_schedule_sha256"),
    "memory_baseline_bytes": info.get("memory_baseline_bytes"),
    "test_accuracy": test_acc,
    "valid_accuracy": info.get("valid_accuracy", _last(metrics, "valid accuracy")),
    "peak_memory_bytes": info.get("peak_memory_bytes", info.get("accelerator_memory_max")),
    "predicted_memory_bytes": (info.get("predicted_memory") or {}).get("peak_bytes"),
    "train_time": info.get("train_time"),
    "compile_time": info.get("compile_time"),
    "tokens_per_sec": info.get("tokens_per_sec", _last(metrics, "tokens / sec")),
    "file_size": info.get("file_size"),
    "file_size_estimated": bool(info.get("file_size_estimated")),
    "num_trainable_params": info.get("num_trainable_params"),
    "forgetting_delta": forgetting_delta,
    "unmerged_overhead": inference.get("unmerged_overhead"),
    "merged_overhead": inference.get("merged_overhead"),
    "status": info.get("status"),
    "file": filename,
  }


def load_rows(results_dir: str) -> list[dict]:
  rows = []
  for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
    try:
      with open(path, encoding="utf-8") as f:
        result = json.load(f)
    except (OSError, json.JSONDecodeError):
      continue
    if not isinstance(result, dict) or "train_info" not in result:
      continue
    rows.append(summarize(result, path))
  rows.sort(key=lambda r: (r["method"], r["name"], r["backend"]))
  return rows


def _num(value, fmt: str, scale: float = 1.0) -> str:
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return "-"
  return format(value / scale if scale != 1.0 else value, fmt)


def _pct(value) -> str:
  return "-" if value is None else f"{100 * value:+.1f}%"


def markdown_table(rows: Sequence[dict]) -> str:
  lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
  for r in rows:
    size = _num(r["file_size"], ".2f", 1e6) + ("~" if r["file_size_estimated"] and r["file_size"] else "")
    cells = [
      r["method"],
      r["name"],
      r["backend"],
      _num(r["max_steps"], "d"),
      _num(r["test_accuracy"], ".3f"),
      _num(r["valid_accuracy"], ".3f"),
      _num(r["peak_memory_bytes"], ".0f", 2**20),
      _num(r["predicted_memory_bytes"], ".0f", 2**20),
      _num(r["train_time"], ".1f"),
      _num(r["compile_time"], ".1f"),
      _num(r["tokens_per_sec"], ".0f"),
      size,
      _num(r["num_trainable_params"], ","),
      _num(r["forgetting_delta"], "+.4f"),
      _pct(r["unmerged_overhead"]),
      _pct(r["merged_overhead"]),
    ]
    if is_reference(r):  # no method was trained: only the accuracy (and the forgetting baseline) mean something
      cells = cells[:6] + ["-"] * (len(cells) - 6)
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def is_reference(row: dict) -> bool:
  """An untrained reference run (``max_steps`` 0, e.g. ``base/``): drawn as a level, not as a method."""
  return row.get("max_steps") == 0


def _ratio(a, b):
  return a / b if a is not None and b else None


def backend_pairs(rows: Sequence[dict], numerator: str = "jax", denominator: str = "torch") -> list[dict]:
  """Experiments run on both backends, one entry each: the jax/torch ratios of throughput, peak memory (also
  above the memory before loading the model), train time, and whether both trained on the same batches."""
  by_key = {(r["method"], r["name"], r["backend"]): r for r in rows}
  pairs = []
  for (method, name, backend), a in sorted(by_key.items()):
    b = by_key.get((method, name, denominator))
    if backend != numerator or b is None or is_reference(a):
      continue
    above = lambda r: (
      r["peak_memory_bytes"] - r["memory_baseline_bytes"]  # noqa: E731
      if r["peak_memory_bytes"] and r["memory_baseline_bytes"] is not None
      else None
    )
    pairs.append(
      {
        "method": method,
        "name": name,
        "test_accuracy": (a["test_accuracy"], b["test_accuracy"]),
        "tokens_per_sec": (a["tokens_per_sec"], b["tokens_per_sec"]),
        "tokens_per_sec_ratio": _ratio(a["tokens_per_sec"], b["tokens_per_sec"]),
        "peak_memory_ratio": _ratio(a["peak_memory_bytes"], b["peak_memory_bytes"]),
        "peak_above_baseline_ratio": _ratio(above(a), above(b)),
        "train_time_ratio": _ratio(a["train_time"], b["train_time"]),
        "same_batches": (
          a["schedule_sha256"] == b["schedule_sha256"] if a["schedule_sha256"] and b["schedule_sha256"] else None
        ),
      }
    )
  return pairs


def pairs_table(pairs: Sequence[dict]) -> str:
  cols = (
    "experiment",
    "test acc jax / torch",
    "tokens/s jax / torch",
    "tokens/s ratio",
    "peak mem ratio",
    "peak above baseline ratio",
    "train time ratio",
    "same batches",
  )
  lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
  for p in pairs:
    ta, tb = p["test_accuracy"]
    sa, sb = p["tokens_per_sec"]
    same = {True: "yes", False: "NO", None: "-"}[p["same_batches"]]
    lines.append(
      "| "
      + " | ".join(
        [
          f"{p['method']}/{p['name']}",
          f"{_num(ta, '.3f')} / {_num(tb, '.3f')}",
          f"{_num(sa, '.0f')} / {_num(sb, '.0f')}",
          _num(p["tokens_per_sec_ratio"], ".2f") + "x",
          _num(p["peak_memory_ratio"], ".2f") + "x",
          _num(p["peak_above_baseline_ratio"], ".2f") + "x",
          _num(p["train_time_ratio"], ".2f") + "x",
          same,
        ]
      )
      + " |"
    )
  return "\n".join(lines)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
  """Indices of the points that no other point beats: less (or equal) memory and higher (or equal) accuracy,
  one of them strictly. ``points`` are (memory, accuracy); the front is returned by increasing memory."""
  order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
  front, best = [], -math.inf
  for i in order:
    if points[i][1] > best:
      front.append(i)
      best = points[i][1]
  return front


def _short(row: dict) -> str:
  name = row["name"]
  for prefix in ("smollm2-",):
    name = name[len(prefix) :] if name.startswith(prefix) else name
  return f"{row['method']}/{name}" if name else row["method"]


def plot(rows: Sequence[dict], path: str, title: str = "test accuracy vs peak memory") -> str | None:
  """Write the Pareto plot, one panel per backend (peak memory is only comparable within a backend's runtime);
  None when no row has both a test accuracy and a peak memory."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.lines import Line2D

  usable = [r for r in rows if r["test_accuracy"] is not None and r["peak_memory_bytes"] and not is_reference(r)]
  if not usable:
    return None
  backends = sorted({r["backend"] for r in usable})
  biggest = max(r["file_size"] or 0 for r in usable) or 1
  top = max(r["test_accuracy"] for r in usable)
  levels = [r for r in rows if is_reference(r) and r["test_accuracy"] is not None]
  fig, axes = plt.subplots(1, len(backends), figsize=(6.5 * len(backends), 6), sharey=True, squeeze=False)
  for ax, backend in zip(axes[0], backends):
    marker, colour = _BACKEND_STYLE.get(backend, _OTHER_STYLE)
    mine = sorted((r for r in usable if r["backend"] == backend), key=lambda r: r["peak_memory_bytes"])
    points = [(r["peak_memory_bytes"] / 2**20, r["test_accuracy"]) for r in mine]
    for i, (r, (x, y)) in enumerate(zip(mine, points)):
      ax.scatter(
        x,
        y,
        s=30 + 600 * math.sqrt((r["file_size"] or 0) / biggest),
        marker=marker,
        c=colour,
        alpha=0.6,
        edgecolors="black",
        linewidths=0.5,
      )
      # labels alternate right/left of their point so that neighbours stay readable
      right = i % 2 == 0
      ax.annotate(
        _short(r),
        (x, y),
        textcoords="offset points",
        xytext=(7 if right else -7, 2 - 6 * (i % 3 == 2)),
        ha="left" if right else "right",
        fontsize=7,
      )
    front = pareto_front(points)
    if front:
      xs = [points[i][0] for i in front] + [max(p[0] for p in points)]
      ys = [points[i][1] for i in front] + [points[front[-1]][1]]
      ax.step(xs, ys, where="post", color="tab:red", linestyle="--", linewidth=1.2)
    for j, r in enumerate(x for x in levels if x["backend"] == backend):
      ax.axhline(r["test_accuracy"], color="tab:gray", linestyle=":", linewidth=1.2)
      ax.annotate(
        f"untrained ({_short(r)}): {r['test_accuracy']:.3f}",
        (points[0][0], r["test_accuracy"]),
        textcoords="offset points",
        xytext=(0, -10 - 9 * j),
        fontsize=7,
        color="tab:gray",
      )
    lo, hi = points[0][0], points[-1][0]
    pad = max(0.08 * (hi - lo), 50.0)
    ax.set_xlim(lo - 2.5 * pad, hi + 2.5 * pad)
    ax.set_xlabel("peak memory (MiB)")
    ax.set_title(f"{backend}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(
      handles=[
        Line2D(
          [],
          [],
          linestyle="none",
          marker=marker,
          markersize=8,
          markerfacecolor=colour,
          markeredgecolor="black",
          alpha=0.6,
          label=backend,
        ),
        Line2D([], [], color="tab:red", linestyle="--", label="Pareto front"),
      ],
      loc="lower right",
      fontsize=8,
    )
  axes[0][0].set_ylabel("test accuracy")
  axes[0][0].set_ylim(-0.06 if levels else -0.02, min(1.05, max(0.1, 1.15 * top)))
  fig.suptitle(title + " (marker size: checkpoint size)")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def _shown_path(path: str) -> str:
  """``path`` relative to the project when it lies inside it (no machine path in committed reports)."""
  root = os.path.dirname(os.path.abspath(common.EXPERIMENTS_DIR))
  full = os.path.abspath(path)
  return os.path.relpath(full, root) if os.path.commonpath([full, root]) == root else full


def make_report(
  results_dir: str | os.PathLike = common.DEFAULT_RESULTS_DIR, out: str | None = None, plot_path: str | None = None
) -> dict[str, Any]:
  """Table + plot of every result in ``results_dir``; returns {"rows", "table", "table_path", "plot_path"}."""
  results_dir = str(results_dir)
  rows = load_rows(results_dir)
  out = out or os.path.join(results_dir, "README.md")
  plot_path = plot_path or os.path.join(results_dir, "pareto.png")
  table = markdown_table(rows)
  pairs = backend_pairs(rows)
  written_plot = plot(rows, plot_path)
  notes = [
    "# Method comparison results",
    "",
    f"{len(rows)} result(s) from `{_shown_path(results_dir)}`. Peak memory: device peak on an accelerator, else the process's "
    "peak RSS. Predicted step (jax): XLA's buffer assignment of the compiled train step at the longest padded "
    "length, known before the first step (arguments + outputs + temporaries - donated; the process adds its "
    "runtime, host copies and evaluation). Train time excludes compilation (jax) and evaluation. Checkpoint size: "
    "`adapter_model.safetensors` as saved (`~`: estimated as parameters x bytes, PEFT's rule for full "
    "fine-tuning). Forgetting Δ: mean per-token loss on general text after minus before training. "
    "Generation overhead: base tokens/s divided by the adapted model's, minus one.",
    "",
    table,
    "",
  ]
  if any(is_reference(r) for r in rows):
    notes += [
      "Rows with 0 steps are the untrained model (the accuracy floor); the plot draws them as dotted levels.",
      "",
    ]
  if pairs:
    notes += [
      "## The same experiment on both backends",
      "",
      "jax (jpeft) over torch (transformers + PEFT), from the result files above. Tokens/s: non-pad "
      "train tokens per second of timed steps; peak memory: as in the table; above baseline: minus the "
      "process's memory before the model was loaded; same batches: equal batch-schedule hashes.",
      "",
      pairs_table(pairs),
      "",
    ]
  if written_plot:
    notes += [
      f"![test accuracy vs peak memory]({os.path.relpath(written_plot, os.path.dirname(os.path.abspath(out)))})",
      "",
    ]
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w", encoding="utf-8") as f:
    f.write("\n".join(notes))
  return {
    "rows": rows,
    "table": table,
    "pairs": pairs,
    "pairs_table": pairs_table(pairs) if pairs else "",
    "table_path": out,
    "plot_path": written_plot,
  }


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command-line flags (defined only when this module is the program, so importing it defines none)."""
  flags.DEFINE_string("results_dir", str(common.DEFAULT_RESULTS_DIR), "folder of result JSON files")
  flags.DEFINE_string("out", None, "markdown output (default: <results_dir>/README.md)")
  flags.DEFINE_string("plot", None, "plot output (default: <results_dir>/pareto.png)")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  report = make_report(FLAGS.results_dir, FLAGS.out, FLAGS.plot)
  print(report["table"])
  if report["pairs"]:
    print("\njax / torch, same experiment:\n" + report["pairs_table"])
  print(f"\ntable: {report['table_path']}")
  print(f"plot: {report['plot_path'] or '(no result with a test accuracy and a peak memory)'}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
