"""Conversion of any weight-changing adapter to a plain LoRA (``jpeft.convert``), checked against PyTorch PEFT.

- At full rank every convertible method's LoRA reproduces the adapted logits, in jpeft and loaded in PEFT as a plain
  LoRA; LoRA at its own rank is exact.
- The reported error of a truncated rank is the SVD's tail energy, computed here with NumPy from a ΔW built
  independently of the conversion; energy thresholds pick PEFT's ranks.
- Where PEFT's ``convert_to_lora`` is right (LoRA, LoHa, LoKr, VeRA, FourierFT, MiSS), jpeft's reconstruction and
  logits are PEFT's; where PEFT is wrong (DoRA's magnitude, the PiSSA/OLoRA base, ``lora_bias``), jpeft is right or
  refuses, and the test shows PEFT's error next to it.
- ``check_vllm`` rejects each rule it enforces.

Tolerances are relative to the scale of what is compared (``numerics``); measured values are next to each bound.
"""

import json
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest

from backends import get_backend
from backends.tiny import make_tiny_llama
from jpeft import checkpoint, convert, core
from jpeft.config import ConversionError, JpeftError, VllmCompatibilityError
from jpeft.models import load_model
from numerics import EPS32, assert_close_to_scale, scaled_error

from method_table import METHODS
from test_parity import _perturbed

# Full-rank factors are ΔW rounded to float32: measured relative Frobenius error ≤ 3.6e-8 (a smoke run of 7 rows,
# before ΔW was computed in float64); bound 8 eps.
FULL_RANK_REL = 8 * EPS32
# Logits of the converted LoRA against the source adapter, both fp32 and summed in other orders (as the parity tests'
# LOGIT_REL): measured worst 1.1e-6 (PiSSA, whose source runs on the residual base); bound 32 eps = 3.8e-6.
LOGIT_REL = 32 * EPS32
# The reported error of a truncated rank against NumPy's SVD tail sqrt(Σ_{i>k} s_i² / Σ s_i²): the report measures
# ‖ΔW − B·A‖ with float32 factors (about 1e-7 of ΔW, the full-rank error), the tail is exact; bound 1e-5 (not
# printed: assert_allclose checks it).
TAIL_REL = 1e-5
# jpeft's B·A (float64 SVD of a float32-built ΔW) against PEFT's (float32 SVD in torch), relative to the largest entry
# of the product. A truncation moves by eps·‖ΔW‖ / (s_k − s_{k+1}) with PEFT's float32 SVD: measured worst 2.1e-5
# (LoKr at rank 2; 9e-7 where the rank is exact); bound 1e-4. The logits of the two LoRAs in PEFT: measured worst
# 1.3e-5 (FourierFT at rank 2; <= 9.1e-7 for the others); bound 1e-4.
PRODUCT_REL = 1e-4
LOGIT_REL_TRUNCATED = 1e-4
# PiSSA/OLoRA adapters initialised by PEFT carry its own SVD/QR of the base; jpeft recomputes the residual with XLA's
# (as test_parity's LOGIT_REL_RESIDUAL): measured 6.8e-6; bound 256 eps = 3.05e-5.
LOGIT_REL_RESIDUAL = 256 * EPS32
# PEFT's wrong conversions are off by far more than any rounding: measured 0.27 (DoRA), 0.76 (PiSSA), 0.93 (OLoRA),
# 0.23 (lora_bias).
PEFT_WRONG = 0.01
FULL = 128  # at least min(out, in) of every module of the tiny model (embedding: min(256, 64))

# One row per convertible method (every jpeft method but Lily and BEFT) and the variants that change what ΔW is (multiplicative, residual base,
# embedding, per-module ranks, full copies, partial layers).
CONVERTIBLE = [
  "lora",
  "rslora",
  "dora",
  "lora-pissa",
  "lora-olora",
  "lora-embedding",
  "lora-patterns",
  "lora-modules-to-save",
  "lora-layers",
  "ia3",
  "oft",
  "oft-r",
  "vera",
  "fourierft",
  "boft",
  "hra",
  "hra-gs",
  "loha",
  "lokr",
  "miss",
  "miss-bat",
  "miss-mini",
  "adalora",
]
# Rows whose method PEFT 0.21.2 converts correctly (supports_lora_conversion and W' = W + get_delta_weight).
PEFT_CORRECT = ["lora", "loha", "lokr", "vera", "fourierft", "miss", "miss-bat"]


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
  return make_tiny_llama(str(tmp_path_factory.mktemp("base")), initializer_range=0.1)


@pytest.fixture(scope="module")
def base(base_folder):
  return load_model(base_folder)


@pytest.fixture(scope="module")
def torch_backend(base_folder):
  b = get_backend("torch")
  b.load_base(base_folder)
  return b


@pytest.fixture(scope="module")
def jax_backend(base_folder):
  b = get_backend("jax")
  b.load_base(base_folder)
  return b


def _batch():
  ids = np.random.default_rng(5).integers(0, 256, (3, 16))
  return ids, np.ones_like(ids)


def _saved(backend, row, folder, *, seed=1, config=None):
  """An adapter of the row with every trained tensor perturbed (non-identity), saved; returns its logits."""
  backend.attach_adapter(config or METHODS[row], seed=seed)
  backend.set_adapter_state_dict(_perturbed(backend.adapter_state_dict(), 0, row if config is None else None))
  backend.save_adapter(str(folder))
  return backend.logits(*_batch())


def _logits_in_peft(torch_backend, folder):
  torch_backend.load_adapter(str(folder))
  assert torch_backend.peft_config.peft_type == "LORA"
  return torch_backend.logits(*_batch())


def _products(state) -> dict[str, np.ndarray]:
  """``{module: B·A}`` of a LoRA state dict (scaling 1), in float64."""
  out = {}
  for key, a in state.items():
    if key.endswith("lora_A.weight"):
      module = key[: -len(".lora_A.weight")]
      out[module] = np.asarray(state[module + ".lora_B.weight"], np.float64) @ np.asarray(a, np.float64)
  return out


def _read(folder):
  from jpeft.checkpoint import read_safetensors

  return read_safetensors(os.path.join(folder, "adapter_model.safetensors"))


@pytest.mark.parametrize("row", CONVERTIBLE)
def test_full_rank_conversion_reproduces_the_adapter(row, base, jax_backend, torch_backend, tmp_path):
  expected = _saved(jax_backend, row, tmp_path / "src")
  report = convert.convert(tmp_path / "src", base, str(tmp_path / "lora"), rank=FULL, progress=False)
  assert report["rel_error"] <= FULL_RANK_REL, report["rel_error"]
  assert report["max_module_rel_error"] <= FULL_RANK_REL
  assert report["adapter_effect"] > 0.02  # the source adapter matters (else the logit check proves nothing)
  assert report["logit_rel_error"] <= LOGIT_REL, report["logit_rel_error"]
  with open(tmp_path / "lora" / "conversion.json") as f:
    assert json.load(f)["rel_error"] == report["rel_error"]
  out = _logits_in_peft(torch_backend, tmp_path / "lora")
  assert_close_to_scale(out, expected, LOGIT_REL, what=f"{row}: converted LoRA in PEFT vs the {row} adapter in jpeft")
  jax_backend.load_adapter(str(tmp_path / "lora"))
  assert_close_to_scale(jax_backend.logits(*_batch()), expected, LOGIT_REL, what=f"{row}: converted LoRA in jpeft")


def test_lora_at_its_own_rank_is_exact(base, jax_backend, tmp_path):
  _saved(jax_backend, "lora", tmp_path / "src")
  report = convert.convert(tmp_path / "src", base, str(tmp_path / "lora"), rank=4, progress=False)
  assert report["rank"] == 4 and report["rel_error"] <= FULL_RANK_REL
  state = _read(str(tmp_path / "src"))
  expected = {k: 2.0 * v for k, v in _products(state).items()}  # lora_alpha / r = 8 / 4
  got = _products(_read(str(tmp_path / "lora")))
  assert set(got) == set(expected)
  for module in got:
    assert_close_to_scale(got[module], expected[module], FULL_RANK_REL, what=module)


def _tail(change, k):
  s = np.linalg.svd(change, compute_uv=False)
  return np.sqrt(np.sum(s[k:] ** 2) / np.sum(s**2))


def test_truncated_error_is_the_svd_tail(base, jax_backend, tmp_path):
  """ΔW here is s·B·A from the saved LoRA tensors (r 4), never the conversion's own merge; rank 2 drops half."""
  _saved(jax_backend, "lora", tmp_path / "src")
  report = convert.convert(tmp_path / "src", base, str(tmp_path / "lora"), rank=2, progress=False)
  deltas = {k[len("base_model.model.") :]: 2.0 * v for k, v in _products(_read(str(tmp_path / "src"))).items()}
  assert set(report["modules"]) == set(deltas)
  num = den = 0.0
  for module, change in deltas.items():
    tail = _tail(change, 2)
    assert tail > 0.05  # rank 2 of a rank-4 change loses something
    np.testing.assert_allclose(report["modules"][module]["rel_error"], tail, rtol=TAIL_REL)
    s = np.linalg.svd(change, compute_uv=False)
    num, den = num + np.sum(s[2:] ** 2), den + np.sum(s**2)
  np.testing.assert_allclose(report["rel_error"], np.sqrt(num / den), rtol=TAIL_REL)
  assert report["logit_rel_error"] > LOGIT_REL  # a truncation shows in the logits


def test_energy_picks_the_smallest_rank_per_module(base, jax_backend, torch_backend, tmp_path):
  """LoHa's ΔW (a Hadamard product, rank up to r² = 16) through jpeft's merge; ranks by PEFT's energy rule."""
  _saved(jax_backend, "loha", tmp_path / "src")
  energy = 0.9
  report = convert.convert(tmp_path / "src", base, str(tmp_path / "lora"), energy=energy, progress=False)
  model_config, params = base
  config, adapter, loaded = checkpoint.load_pretrained(str(tmp_path / "src"), params, model_config)
  merged = core.merge(loaded, adapter, config, model_config=model_config)
  ranks = {}
  for module, entry in report["modules"].items():
    change = np.asarray(merged[module + ".weight"], np.float64) - np.asarray(params[module + ".weight"], np.float64)
    s = np.linalg.svd(change, compute_uv=False)
    kept = np.cumsum(s**2) / np.sum(s**2)
    k = int(np.argmax(kept >= energy)) + 1
    assert entry["rank"] == k and entry["energy_kept"] >= energy
    np.testing.assert_allclose(entry["rel_error"], np.sqrt(1 - kept[k - 1]), rtol=TAIL_REL, atol=1e-7)
    ranks[module] = k
  assert len(set(ranks.values())) > 1  # the modules really get different ranks
  with open(tmp_path / "lora" / "adapter_config.json") as f:
    cfg = json.load(f)
  for module, k in ranks.items():
    assert cfg["rank_pattern"].get(module, cfg["r"]) == k
  torch_backend.load_adapter(str(tmp_path / "lora"))  # PEFT builds every module at its own rank
  for key, value in torch_backend.adapter_state_dict().items():
    if key.endswith("lora_A.weight"):
      assert value.shape[0] == ranks[key[len("base_model.model.") : -len(".lora_A.weight")]]


@pytest.mark.parametrize(
  "row,rank", [(row, 32) for row in PEFT_CORRECT] + [(row, 2) for row in PEFT_CORRECT if row != "miss"]
)
def test_matches_peft_convert_to_lora(row, rank, base, torch_backend, tmp_path):
  """Rank 32 is the largest PEFT accepts on every module (it refuses a rank above a module's min(out, in), 32 for
  k/v; jpeft pads): exact for k/v and for the low-rank changes (LoRA r 4, VeRA r 8, LoHa ≤ 16, MiSS r 16), a
  truncation of FourierFT, LoKr and MiSS bat on the 64-wide modules. PEFT converts MiSS's default/mini forms exactly
  at their own rank r whatever rank is asked, so rank 2 leaves MiSS's default out."""
  from peft import convert_to_lora, save_as_lora

  _saved(torch_backend, row, tmp_path / "src", seed=3)
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Converting a PEFT adapter to LoRA that is already a LoRA adapter")
    _, peft_state = convert_to_lora(torch_backend.model, rank)
    save_as_lora(str(tmp_path / "peft"), torch_backend.model, rank)
  convert.convert(tmp_path / "src", base, str(tmp_path / "lora"), rank=rank, progress=False, probe=False)
  ours, theirs = _products(_read(str(tmp_path / "lora"))), _products({k: v.numpy() for k, v in peft_state.items()})
  assert set(ours) == set(theirs)
  for module in ours:
    assert_close_to_scale(ours[module], theirs[module], PRODUCT_REL, what=f"{row} rank {rank}: {module} B·A")
  ref = _logits_in_peft(torch_backend, tmp_path / "peft")
  got = _logits_in_peft(torch_backend, tmp_path / "lora")
  assert_close_to_scale(got, ref, LOGIT_REL_TRUNCATED, what=f"{row} rank {rank} logits")


@pytest.mark.parametrize("row", ["dora", "lora-pissa", "lora-olora"])
def test_where_peft_converts_wrongly_jpeft_is_right(row, base, base_folder, torch_backend, tmp_path):
  """PEFT factors DoRA's bare s·B·A (no magnitude) and PiSSA/OLoRA's change against the residual base; loaded on
  the base a server has, its LoRA is far off. jpeft's, from the true ΔW, reproduces the adapter."""
  from peft import save_as_lora

  expected = _saved(torch_backend, row, tmp_path / "src", seed=4)
  save_as_lora(str(tmp_path / "peft"), torch_backend.model, 32)
  convert.convert(tmp_path / "src", base, str(tmp_path / "lora"), rank=FULL, progress=False, probe=False)
  torch_backend.load_base(base_folder)  # the original base, as a server loads it
  peft_error = scaled_error(_logits_in_peft(torch_backend, tmp_path / "peft"), expected)
  assert peft_error > PEFT_WRONG, f"{row}: PEFT's conversion is off by only {peft_error:.3g}"
  torch_backend.load_base(base_folder)
  ours = _logits_in_peft(torch_backend, tmp_path / "lora")
  bound = LOGIT_REL if row == "dora" else LOGIT_REL_RESIDUAL
  assert_close_to_scale(ours, expected, bound, what=f"{row}: jpeft's conversion (PEFT's is off by {peft_error:.3g})")


def test_lora_bias_is_refused_where_peft_drops_it(base, base_folder, torch_backend, tmp_path):
  from peft import save_as_lora

  config = dict(METHODS["lora"], lora_bias=True)
  expected = _saved(torch_backend, "lora", tmp_path / "src", seed=5, config=config)
  save_as_lora(str(tmp_path / "peft"), torch_backend.model, 32)  # no error, no warning: lora_B.bias is gone
  torch_backend.load_base(base_folder)
  peft_error = scaled_error(_logits_in_peft(torch_backend, tmp_path / "peft"), expected)
  if os.environ.get("JPEFT_PRINT_ERRORS"):
    print(f"[measured] lora_bias: PEFT's conversion is off by {peft_error:.3g} (must exceed {PEFT_WRONG})")
  assert peft_error > PEFT_WRONG
  with pytest.raises(JpeftError, match="lora_bias"):
    convert.convert(tmp_path / "src", base, str(tmp_path / "lora"), rank=8, progress=False)
  assert not os.path.exists(tmp_path / "lora")


@pytest.mark.parametrize(
  "row,reason",
  [
    ("lily", "depends on the input: the router"),
    ("beft", "has no bias"),
    ("lily-stride", "router"),
    ("ln-tuning", "changes the norm 'model.layers.0.input_layernorm'"),
  ],
)
def test_methods_without_a_weight_change_are_refused(row, reason, base, jax_backend, tmp_path):
  _saved(jax_backend, row, tmp_path / "src")
  with pytest.raises(ConversionError, match=reason):
    convert.convert(tmp_path / "src", base, str(tmp_path / "lora"), rank=8, progress=False)
  assert not os.path.exists(tmp_path / "lora")


@pytest.mark.parametrize(
  "kwargs,message",
  [
    (dict(rank=8, energy=0.9), "exactly one of rank"),
    (dict(), "exactly one of rank"),
    (dict(rank=0), "positive integer"),
    (dict(rank=2.5), "positive integer"),
    (dict(energy=0.0), r"fraction in \(0, 1\]"),
    (dict(energy=1.5), r"fraction in \(0, 1\]"),
    (dict(rank=12, target="vllm"), "vLLM accepts LoRA ranks 1, 8, 16"),
    (dict(rank=8, target="tgi"), "unknown target"),
  ],
)
def test_bad_requests(kwargs, message, base, tmp_path, no_loading):
  with pytest.raises(ConversionError, match=message):
    convert.convert(tmp_path / "nothing", base, str(tmp_path / "lora"), progress=False, **kwargs)


def test_vllm_target(base, jax_backend, tmp_path):
  _saved(jax_backend, "loha", tmp_path / "src")
  report = convert.convert(tmp_path / "src", base, str(tmp_path / "lora"), energy=0.9, target="vllm", progress=False)
  with open(tmp_path / "lora" / "adapter_config.json") as f:
    cfg = json.load(f)
  need = max(m["rank"] for m in report["modules"].values())
  assert cfg["r"] == cfg["lora_alpha"] == min(r for r in convert.VLLM_RANKS if r >= need)
  assert not cfg["rank_pattern"] and not cfg["alpha_pattern"] and not cfg["use_dora"]
  assert sorted(cfg["target_modules"]) == sorted(METHODS["loha"]["target_modules"])  # vLLM's short names
  assert convert.vllm_violations(str(tmp_path / "lora")) == []
  # the rounded-up rank only adds energy: every module's error is at most the per-module energy's
  assert all(m["energy_kept"] >= 0.9 for m in report["modules"].values())


@pytest.mark.parametrize("row,message", [("lora-embedding", "is an embedding"), ("lora-modules-to-save", "full copy")])
def test_vllm_target_refuses_what_vllm_does_not_load(row, message, base, jax_backend, tmp_path):
  _saved(jax_backend, row, tmp_path / "src")
  with pytest.raises(ConversionError, match=message):
    convert.convert(tmp_path / "src", base, str(tmp_path / "lora"), rank=8, target="vllm", progress=False)


def _edit_config(folder, **fields):
  path = os.path.join(folder, "adapter_config.json")
  with open(path) as f:
    cfg = json.load(f)
  cfg.update(fields)
  with open(path, "w") as f:
    json.dump(cfg, f)


def _edit_weights(folder, fn):
  from safetensors.numpy import save_file

  state = fn(dict(_read(folder)))
  save_file(state, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})


def _rename_first(state, new):
  key = sorted(state)[0]
  state[new(key)] = state.pop(key)
  return state


def _drop_first_b(state):
  del state[next(k for k in sorted(state) if k.endswith("lora_B.weight"))]
  return state


def _reshape_first_a(state):
  key = next(k for k in sorted(state) if k.endswith("lora_A.weight"))
  state[key] = state[key][:4]
  return state


VLLM_RULES = {
  "peft_type": (lambda d: _edit_config(d, peft_type="LOHA"), "vLLM loads LORA adapters only"),
  "rank": (lambda d: _edit_config(d, r=12), "r=12 is not one of vLLM's ranks"),
  "alpha": (lambda d: _edit_config(d, lora_alpha=16), "lora_alpha=16 differs from r=8"),
  "rank_pattern": (lambda d: _edit_config(d, rank_pattern={"q_proj": 8}), "rank_pattern is set"),
  "alpha_pattern": (lambda d: _edit_config(d, alpha_pattern={"q_proj": 8}), "alpha_pattern is set"),
  "dora": (lambda d: _edit_config(d, use_dora=True), "use_dora is true"),
  "modules_to_save": (lambda d: _edit_config(d, modules_to_save=["lm_head"]), "modules_to_save"),
  "bias": (lambda d: _edit_config(d, bias="all"), "bias='all'"),
  "lora_bias": (lambda d: _edit_config(d, lora_bias=True), "lora_bias is true"),
  "key": (
    lambda d: _edit_weights(d, lambda s: _rename_first(s, lambda k: k.replace(".weight", ""))),
    "is not base_model.model.<module>.lora_A.weight",
  ),
  "pair": (lambda d: _edit_weights(d, _drop_first_b), "vLLM needs both lora_A and lora_B"),
  "shape": (lambda d: _edit_weights(d, _reshape_first_a), "do not have rank r=8"),
  "config_file": (lambda d: os.remove(os.path.join(d, "adapter_config.json")), "no adapter_config.json"),
  "weights_file": (lambda d: os.remove(os.path.join(d, "adapter_model.safetensors")), "no adapter_model.safetensors"),
  "corrupt_weights": (
    lambda d: open(os.path.join(d, "adapter_model.safetensors"), "wb").write(b"not a safetensors file"),
    "cannot be read",
  ),
}


@pytest.fixture(scope="module")
def vllm_folder(base, base_folder, tmp_path_factory):
  root = tmp_path_factory.mktemp("vllm")
  b = get_backend("jax")
  b.load_base(base_folder)
  _saved(b, "lora", root / "src")
  convert.convert(root / "src", base, str(root / "ok"), rank=8, target="vllm", progress=False, probe=False)
  return root / "ok"


@pytest.mark.parametrize("rule", sorted(VLLM_RULES))
def test_check_vllm_rejects_each_rule(rule, vllm_folder, tmp_path):
  convert.check_vllm(str(vllm_folder))  # the conversion's own output passes
  folder = str(tmp_path / "bad")
  shutil.copytree(vllm_folder, folder)
  edit, message = VLLM_RULES[rule]
  edit(folder)
  problems = convert.vllm_violations(folder)
  assert any(message in p for p in problems), problems
  with pytest.raises(VllmCompatibilityError, match="not a LoRA adapter vLLM loads"):
    convert.check_vllm(folder)


def test_command_line(base_folder, jax_backend, tmp_path):
  _saved(jax_backend, "oft", tmp_path / "src")
  env = dict(os.environ, PYTHONPATH=os.getcwd())
  cmd = [sys.executable, "-m", "jpeft.convert", f"--adapter={tmp_path / 'src'}", f"--base={base_folder}"]
  proc = subprocess.run(
    cmd + [f"--out={tmp_path / 'lora'}", "--rank=8", "--target=vllm", "--noprogress"],
    capture_output=True,
    text=True,
    env=env,
  )
  assert proc.returncode == 0, proc.stderr
  assert "OFT -> LoRA (vllm)" in proc.stdout and "relative Frobenius error" in proc.stdout
  assert "logits on the probe batch" in proc.stdout
  with open(tmp_path / "lora" / "conversion.json") as f:
    assert json.load(f)["rank"] == 8
  proc = subprocess.run(
    cmd + [f"--out={tmp_path / 'x'}", "--rank=12", "--target=vllm"], capture_output=True, text=True, env=env
  )
  assert proc.returncode != 0 and "error: vLLM accepts LoRA ranks" in proc.stderr
