"""Any weight-changing adapter as a plain LoRA that servers load (PEFT's ``convert_to_lora``, done from the true ΔW).

For every adapted module the conversion takes the exact effective weight change ``ΔW = W_adapted − W`` (the merged
weight minus the *original* base weight) and factors it by a truncated SVD, ``ΔW ≈ B·A`` with ``B = U_k·S_k``
(out, k) and ``A = V_kᵀ`` (k, in), at a fixed rank or at the smallest rank keeping an energy fraction of
``Σ S²``. The LoRA has ``lora_alpha = r`` (scaling 1), so the factors are the weight change itself.

What this gets right where PEFT's ``convert_to_lora`` (0.21.2) does not:

- multiplicative methods convert from their merged weight, so DoRA's magnitude vector, OFT's/BOFT's/HRA's rotations
  and IA3's scales are in ΔW (PEFT factors DoRA's bare ``s·B·A`` and drops the magnitude);
- PiSSA/OLoRA are converted against the original base, not the residual base they rewrite at init (PEFT's result
  only works on the residual, which no server has);
- a change of a bias (IA3 on a model with biases, BEFT) cannot be carried by a ``bias="none"`` LoRA: refused, where
  PEFT drops ``lora_bias`` silently; ``lora_bias`` adapters themselves are refused when loading.

Refused with the reason: methods whose effect is not a fixed weight change (Lily mixes its experts by a router over
the input) and adapters that change no weight. ``modules_to_save`` copies are carried over unchanged (target
``peft``) or refused (target ``vllm``).

``target="vllm"`` writes what vLLM loads: one rank for every module from vLLM's allowed set (``VLLM_RANKS``), no
``rank_pattern``/``alpha_pattern`` (vLLM ignores them and scales by the global ``lora_alpha / r``), ``lora_alpha =
r``, no DoRA, no ``modules_to_save``, ``bias="none"``, linear modules only, keys
``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``; :func:`check_vllm` validates a folder against those
rules and runs on every such output.

Every conversion reports (and :func:`convert` writes ``conversion.json`` beside the adapter) the relative Frobenius
error ``‖ΔW − B·A‖_F / ‖ΔW‖_F`` per module and overall (``sqrt(Σ‖err‖² / Σ‖ΔW‖²)``), and the logit error of the
converted adapter against the original on a fixed probe batch (``max |Δlogit| / max |logit|``).

Command line::

  python -m jpeft.convert --adapter=DIR --base=MODEL --out=DIR (--rank=N | --energy=F) [--target=peft|vllm]
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import checkpoint, core, registry
from jpeft.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from jpeft.config import ConversionError, UnmergeableError, VllmCompatibilityError
from jpeft.models.llama import LlamaConfig, base_array, forward, module_kinds

# The LoRA ranks vLLM accepts (its ``max_lora_rank`` choices).
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
TARGETS = ("peft", "vllm")
REPORT_FILE = "conversion.json"
# The probe batch of the logit error: token ids drawn from this seed, every position attended.
PROBE_SEED = 0
PROBE_SHAPE = (4, 64)


@dataclasses.dataclass(frozen=True)
class Conversion:
  """The result of :func:`to_lora`: a LoRA config and adapter for the original base, and the report."""

  config: Any
  adapter: core.Adapter
  report: dict


def _module_of(key: str) -> str:
  return key[: -len(".weight")]


def _float64(tree):
  return jax.tree_util.tree_map(
    lambda x: jnp.asarray(x, jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
  )


def _weight_changes(original: dict, params: dict, adapter: core.Adapter, config, model_config) -> dict[str, np.ndarray]:
  """``{module: ΔW}`` (float64, the PEFT layout ``(out, in)``; ``(H, V)`` for an embedding) over the adapted modules.

  The adapted weights are computed in float64 from the adapted modules' own params: ``W' − W`` of a float32 ``W'``
  would carry the rounding of ``W'`` (``eps·|W|`` per entry), which swamps a small ΔW (a short or low-lr run)."""
  peft_type = config.peft_type
  saved_copies = set(core._modules_to_save(adapter, config))
  modules = {m for m in adapter if m != core.SHARED and m not in saved_copies}
  if not modules:
    raise ConversionError(
      f"{peft_type} changes no weight of the model (it acts on the inputs or the attention), so there is no weight "
      f"change for a LoRA to carry"
    )
  norms = sorted((m for m in modules if core.module_kind(m, model_config) == "norm"), key=core.model_order)
  if norms:  # LN tuning: a LoRA adapts linear and embedding weights, never a norm's vector
    raise ConversionError(
      f"{peft_type} cannot be converted to LoRA: it changes the norm {norms[0]!r}, and a LoRA carries changes of "
      f"linear and embedding weights only (merge the adapter instead: core.merge)"
    )
  subset = {k: v for k, v in params.items() if k.rsplit(".", 1)[0] in modules}
  with jax.enable_x64(True):
    subset64, adapter64 = _float64(subset), _float64({m: adapter[m] for m in adapter if m not in saved_copies})
    adapted = core.apply(subset64, core.project(adapter64, config), config, model_config=model_config)
    for key, entry in adapted.items():
      if (hasattr(entry, "matmul") or hasattr(entry, "embed")) and not hasattr(entry, "materialize"):
        reason = getattr(entry, "unmergeable_reason", None) or f"{type(entry).__name__} has no merged weight"
        raise ConversionError(
          f"{peft_type} cannot be converted to LoRA: a LoRA carries one fixed weight change per module, and "
          f"{peft_type} on {_module_of(key)!r} has none: {reason}"
        )
    try:
      merged = core.merge(subset64, adapter64, config, model_config=model_config)
    except UnmergeableError as e:
      raise ConversionError(f"{peft_type} cannot be converted to LoRA: {e}") from e
    merged = {k: np.asarray(v, np.float64) for k, v in merged.items() if k in subset}
  for key, value in merged.items():  # a bias change (IA3 on a biased model, BEFT) is not a LoRA
    if key.endswith(".bias") and key in original:
      if not np.allclose(value, np.asarray(original[key], np.float64), rtol=0, atol=0):
        raise ConversionError(
          f"{peft_type} changes the bias of {key[: -len('.bias')]!r}; a LoRA with bias='none' (what servers load) "
          f"cannot carry a bias change"
        )
  deltas = {}
  for module in modules:
    key = module + ".weight"
    change = merged[key] - np.asarray(base_array(original[key]), np.float64)
    if core.module_kind(module, model_config) == "embedding":
      change = change.T  # LoRA's embedding factors: ΔEᵀ = lora_embedding_B · lora_embedding_A, (H, r) · (r, V)
    deltas[module] = change
  return dict(sorted(deltas.items(), key=lambda kv: core.model_order(kv[0])))


def energy_rank(singular_values: np.ndarray, energy: float) -> int:
  """The smallest k whose top-k singular values keep ``energy`` of ``Σ S²`` (PEFT's rule; at least 1)."""
  power = np.cumsum(np.asarray(singular_values, np.float64) ** 2)
  if power.size == 0 or power[-1] == 0:
    return 1
  return int(min(np.searchsorted(power, energy * power[-1]) + 1, power.size))


def _factor(change: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
  """``(A (rank, in), B (out, rank))`` with ``B·A`` the best rank-``rank`` approximation; zero-padded past the
  matrix's own rank limit ``min(out, in)``."""
  u, s, vt = np.linalg.svd(change, full_matrices=False)
  k = min(rank, s.size)
  a = np.zeros((rank, change.shape[1]))
  b = np.zeros((change.shape[0], rank))
  a[:k] = vt[:k]
  b[:, :k] = u[:, :k] * s[:k]
  return a, b


def _check_request(rank, energy, target) -> None:
  if target not in TARGETS:
    raise ConversionError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
  if (rank is None) == (energy is None):
    raise ConversionError("give exactly one of rank (a fixed rank for every module) or energy (a fraction in (0, 1])")
  if rank is not None:
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
      raise ConversionError(f"rank must be a positive integer, got {rank!r}")
    if target == "vllm" and rank not in VLLM_RANKS:
      raise ConversionError(f"vLLM accepts LoRA ranks {', '.join(map(str, VLLM_RANKS))} only, got rank={rank}")
  elif not (isinstance(energy, (float, int, np.floating)) and not isinstance(energy, bool) and 0 < energy <= 1):
    raise ConversionError(f"energy must be a fraction in (0, 1], got {energy!r}")


def _vllm_rank(ranks: dict[str, int]) -> int:
  need = max(ranks.values())
  for r in VLLM_RANKS:
    if r >= need:
      return r
  raise ConversionError(
    f"the energy asked for needs rank {need} (module {max(ranks, key=ranks.get)!r}), above vLLM's largest LoRA rank "
    f"{VLLM_RANKS[-1]}; ask for less energy or a fixed rank"
  )


def _target_modules(modules: list[str], model_config: LlamaConfig, target: str):
  """Full module names for PEFT (exactly the converted set); for vLLM the short names (``q_proj``) when they name
  exactly the converted set, since vLLM reads ``target_modules`` as projection names."""
  if target == "vllm":
    short = sorted({m.rsplit(".", 1)[-1] for m in modules})
    if {m for m in module_kinds(model_config) if m.rsplit(".", 1)[-1] in short} == set(modules):
      return short
  return list(modules)


def to_lora(
  original: dict,
  params: dict,
  adapter: core.Adapter,
  config,
  model_config: LlamaConfig,
  *,
  rank: int | None = None,
  energy: float | None = None,
  target: str = "peft",
  dtype=jnp.float32,
  progress: bool = False,
) -> Conversion:
  """Convert a loaded adapter to a LoRA for the base ``original``.

  ``params`` are the params the adapter runs on (what :func:`jpeft.checkpoint.load_pretrained` returns: the residual
  base for PiSSA/OLoRA, else ``original``). Exactly one of ``rank`` (every module) or ``energy`` (per module, the
  smallest rank keeping that fraction of ``Σ S²``; one rank for all with ``target="vllm"``, rounded up to vLLM's set).

  Raises:
    ConversionError: the adapter's effect is not a weight change, it changes a bias, or the request is invalid.
  """
  _check_request(rank, energy, target)
  if config.peft_type == "LORA" and getattr(config, "lora_bias", False):
    raise ConversionError("lora_bias=True: a LoRA with bias='none' cannot carry the bias of lora_B")
  deltas = _weight_changes(original, params, adapter, config, model_config)
  save = core._modules_to_save(adapter, config)
  if target == "vllm":
    embeddings = [m for m in deltas if core.module_kind(m, model_config) == "embedding"]
    if embeddings:
      raise ConversionError(
        f"target vllm: {embeddings[0]!r} is an embedding; the vllm target writes LoRA on linear modules only "
        f"(convert with target='peft' to keep an embedding LoRA)"
      )
    if save:
      raise ConversionError(
        f"target vllm: the adapter trains a full copy of {save[0]!r} (modules_to_save), which vLLM does not load"
      )
  decompositions = {}
  items = deltas.items()
  if progress:
    from tqdm.auto import tqdm

    items = tqdm(items, total=len(deltas), desc="SVD", dynamic_ncols=True)
  for module, change in items:
    decompositions[module] = np.linalg.svd(change, full_matrices=False, compute_uv=False)
  if rank is not None:
    ranks = {m: int(rank) for m in deltas}
  else:
    ranks = {m: energy_rank(s, float(energy)) for m, s in decompositions.items()}
    if target == "vllm":
      ranks = dict.fromkeys(ranks, _vllm_rank(ranks))
  lora, modules_report = {}, {}
  total_err, total_norm = 0.0, 0.0
  for module, change in deltas.items():
    a, b = _factor(change, ranks[module])
    a, b = np.asarray(jnp.asarray(a, dtype)), np.asarray(jnp.asarray(b, dtype))
    err = float(np.linalg.norm(change - b.astype(np.float64) @ a.astype(np.float64)))
    norm = float(np.linalg.norm(change))
    total_err += err**2
    total_norm += norm**2
    s = decompositions[module]
    kept = float(np.sum(s[: ranks[module]] ** 2) / np.sum(s**2)) if norm > 0 else 1.0
    modules_report[module] = {
      "shape": list(change.shape),
      "rank": ranks[module],
      "norm": norm,
      "rel_error": err / norm if norm > 0 else 0.0,
      "energy_kept": kept,
    }
    if core.module_kind(module, model_config) == "embedding":
      lora[module] = {"lora_embedding_A": jnp.asarray(a), "lora_embedding_B": jnp.asarray(b)}
    else:
      lora[module] = {"lora_A.weight": jnp.asarray(a), "lora_B.weight": jnp.asarray(b)}
  for module in save:
    lora[module] = dict(adapter[module])
  common = max(set(ranks.values()), key=lambda r: (list(ranks.values()).count(r), r))
  pattern = {m: r for m, r in ranks.items() if r != common}
  fields = dict(
    peft_type="LORA",
    r=common,
    lora_alpha=common,
    target_modules=_target_modules(list(deltas), model_config, target),
    rank_pattern=pattern,
    alpha_pattern=dict(pattern),
    modules_to_save=list(config.modules_to_save) if save else None,
    base_model_name_or_path=config.base_model_name_or_path,
  )
  lora_config = registry.config_from_dict(fields)
  report = {
    "source_peft_type": config.peft_type,
    "target": target,
    "request": {"rank": rank} if rank is not None else {"energy": float(energy)},
    "rank": common,
    "rank_pattern": pattern,
    "modules": modules_report,
    "rel_error": float(np.sqrt(total_err / total_norm)) if total_norm > 0 else 0.0,
    "max_module_rel_error": max(m["rel_error"] for m in modules_report.values()),
    "lora_parameters": int(sum(np.size(a) for m in lora.values() for a in m.values())),
  }
  return Conversion(lora_config, lora, report)


def probe_batch(vocab_size: int, max_positions: int | None = None) -> dict[str, np.ndarray]:
  """The fixed batch the logit error is measured on: ``PROBE_SHAPE`` token ids from ``PROBE_SEED`` (rows no longer
  than the model's positions), every position attended."""
  rows, length = PROBE_SHAPE
  length = min(length, max_positions or length)
  ids = np.random.default_rng(PROBE_SEED).integers(0, vocab_size, (rows, length), dtype=np.int32)
  return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def logit_error(original, params, adapter, config, conversion: Conversion, model_config: LlamaConfig) -> dict:
  """The converted LoRA on ``original`` against the source adapter on ``params``, over :func:`probe_batch`:
  ``max |Δlogit| / max |logit|``, and the source adapter's own effect on the same scale (against the bare base)."""
  batch = probe_batch(model_config.vocab_size, getattr(model_config, "max_position_embeddings", None))

  @jax.jit
  def run(p, ids, mask):
    return forward(p, model_config, ids, mask)

  def logits(p):
    return np.asarray(run(p, batch["input_ids"], batch["attention_mask"]), np.float64)

  ref = logits(core.apply(params, adapter, config, model_config=model_config))
  out = logits(core.apply(original, conversion.adapter, conversion.config, model_config=model_config))
  bare = logits(original)
  scale = float(np.abs(ref).max())
  return {
    "probe": f"{batch['input_ids'].shape[0]}x{batch['input_ids'].shape[1]} token ids from seed {PROBE_SEED}",
    "logit_rel_error": float(np.abs(out - ref).max() / scale),
    "adapter_effect": float(np.abs(ref - bare).max() / scale),
  }


def convert(
  adapter_dir: str,
  base,
  out_dir: str,
  *,
  rank: int | None = None,
  energy: float | None = None,
  target: str = "peft",
  probe: bool = True,
  progress: bool = True,
) -> dict:
  """Read an adapter folder (PEFT's or jpeft's), write its LoRA conversion to ``out_dir`` and return the report
  (also written to ``out_dir/conversion.json``). ``base`` is a model source for :func:`jpeft.models.load_model` or
  an already loaded ``(model_config, params)`` pair. With ``target="vllm"`` the folder is then checked by
  :func:`check_vllm`."""
  from jpeft.models import load_model

  _check_request(rank, energy, target)
  model_config, original = load_model(base) if isinstance(base, (str, os.PathLike)) else base
  config, adapter, params = checkpoint.load_pretrained(adapter_dir, original, model_config)
  conversion = to_lora(
    original, params, adapter, config, model_config, rank=rank, energy=energy, target=target, progress=progress
  )
  report = dict(conversion.report, adapter=os.fspath(adapter_dir), base=base if isinstance(base, str) else None)
  if probe:
    report.update(logit_error(original, params, adapter, config, conversion, model_config))
  checkpoint.save_pretrained(out_dir, conversion.adapter, conversion.config, original)
  report["file_bytes"] = os.path.getsize(os.path.join(out_dir, ADAPTER_WEIGHTS))
  if target == "vllm":
    check_vllm(out_dir)
  with open(os.path.join(out_dir, REPORT_FILE), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2)
    f.write("\n")
  return report


_VLLM_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


def vllm_violations(folder: str) -> list[str]:
  """Every way the adapter folder breaks what vLLM's LoRA loader reads (empty: it loads as written)."""
  folder = os.fspath(folder)
  config_path, weights_path = os.path.join(folder, ADAPTER_CONFIG), os.path.join(folder, ADAPTER_WEIGHTS)
  problems = []
  if not os.path.isfile(config_path):
    return [f"no {ADAPTER_CONFIG} in {folder!r}"]
  with open(config_path, encoding="utf-8") as f:
    try:
      cfg = json.load(f)
    except json.JSONDecodeError as e:
      return [f"{ADAPTER_CONFIG} is not valid JSON ({e})"]
  if cfg.get("peft_type") != "LORA":
    problems.append(f"peft_type is {cfg.get('peft_type')!r}; vLLM loads LORA adapters only")
  r = cfg.get("r")
  if r not in VLLM_RANKS:
    problems.append(f"r={r!r} is not one of vLLM's ranks ({', '.join(map(str, VLLM_RANKS))})")
  if cfg.get("lora_alpha") != r:
    problems.append(f"lora_alpha={cfg.get('lora_alpha')!r} differs from r={r!r} (the conversion bakes scaling 1 in)")
  for field in ("rank_pattern", "alpha_pattern"):
    if cfg.get(field):
      problems.append(f"{field} is set ({len(cfg[field])} entries); vLLM ignores it and uses r and lora_alpha")
  if cfg.get("use_dora"):
    problems.append("use_dora is true; vLLM does not run DoRA")
  if cfg.get("modules_to_save"):
    problems.append(f"modules_to_save={cfg['modules_to_save']!r}; vLLM does not load full module copies")
  if cfg.get("bias", "none") != "none":
    problems.append(f"bias={cfg['bias']!r}; vLLM needs bias='none'")
  if cfg.get("lora_bias"):
    problems.append("lora_bias is true; vLLM does not load lora_B biases")
  if not os.path.isfile(weights_path):
    problems.append(f"no {ADAPTER_WEIGHTS} in {folder!r}")
    return problems
  try:
    state = checkpoint.read_safetensors(weights_path)
  except Exception as e:  # noqa: BLE001 -- any unreadable file is one violation
    problems.append(f"{ADAPTER_WEIGHTS} cannot be read ({e})")
    return problems
  factors: dict[str, dict[str, tuple]] = {}
  for key, value in state.items():
    m = _VLLM_KEY.match(key)
    if m is None:
      problems.append(f"tensor {key!r} is not base_model.model.<module>.lora_A.weight / lora_B.weight")
      continue
    factors.setdefault(m["module"], {})[m["ab"]] = np.shape(value)
  for module, ab in factors.items():
    if set(ab) != {"A", "B"}:
      problems.append(f"{module!r} has lora_{''.join(sorted(ab))} only; vLLM needs both lora_A and lora_B")
      continue
    if len(ab["A"]) != 2 or len(ab["B"]) != 2 or ab["A"][0] != r or ab["B"][1] != r:
      problems.append(f"{module!r}: lora_A {ab['A']} and lora_B {ab['B']} do not have rank r={r!r}")
  if not factors and not any(p.startswith("tensor") for p in problems):
    problems.append(f"{ADAPTER_WEIGHTS} holds no LoRA tensors")
  return problems


def check_vllm(folder: str) -> None:
  """Raise :class:`VllmCompatibilityError` listing every rule the folder breaks (see :func:`vllm_violations`)."""
  problems = vllm_violations(folder)
  if problems:
    raise VllmCompatibilityError(
      f"{folder!r} is not a LoRA adapter vLLM loads as written:\n" + "\n".join(f"  - {p}" for p in problems)
    )


def summary(report: dict) -> str:
  """A few lines for the terminal: overall and worst module error, rank, logit error."""
  worst = max(report["modules"].items(), key=lambda kv: kv[1]["rel_error"])
  lines = [
    f"{report['source_peft_type']} -> LoRA ({report['target']}): {len(report['modules'])} modules, rank {report['rank']}"
    + (f" ({len(report['rank_pattern'])} modules with their own rank)" if report["rank_pattern"] else ""),
    f"  relative Frobenius error: overall {report['rel_error']:.3e}, worst {worst[1]['rel_error']:.3e} ({worst[0]})",
    f"  LoRA parameters: {report['lora_parameters']:,}",
  ]
  if "logit_rel_error" in report:
    lines.append(
      f"  logits on the probe batch: error {report['logit_rel_error']:.3e} of the largest logit "
      f"(the adapter's own effect: {report['adapter_effect']:.3e})"
    )
  return "\n".join(lines)


def main(argv) -> None:
  from absl import flags

  del argv
  FLAGS = flags.FLAGS
  try:
    report = convert(
      FLAGS.adapter,
      FLAGS.base,
      FLAGS.out,
      rank=FLAGS.rank,
      energy=FLAGS.energy,
      target=FLAGS.target,
      probe=FLAGS.probe,
      progress=FLAGS.progress,
    )
  except (ConversionError, core.AdapterCheckpointError, FileNotFoundError, ValueError) as e:
    raise SystemExit(f"error: {e}") from None
  print(summary(report))
  print(f"wrote {FLAGS.out} ({report['file_bytes']:,} bytes) and {os.path.join(FLAGS.out, REPORT_FILE)}")


def _define_flags() -> None:
  from absl import flags

  flags.DEFINE_string("adapter", None, "adapter folder (PEFT's format: adapter_config.json + safetensors)")
  flags.DEFINE_string("base", "smollm2-135m", "base model: registry name, HF folder, .gguf file or hub id")
  flags.DEFINE_string("out", None, "output folder for the LoRA adapter and conversion.json")
  flags.DEFINE_integer("rank", None, "one rank for every module")
  flags.DEFINE_float("energy", None, "per module, the smallest rank keeping this fraction of sum(S^2)")
  flags.DEFINE_enum("target", "peft", list(TARGETS), "peft: any LoRA PEFT loads; vllm: what vLLM loads")
  flags.DEFINE_bool("probe", True, "measure the logit error on a fixed probe batch")
  flags.DEFINE_bool("progress", True, "show a tqdm progress bar")
  flags.mark_flags_as_required(["adapter", "out"])


if __name__ == "__main__":
  from absl import app

  _define_flags()
  app.run(main)
