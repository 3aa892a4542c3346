"""jpeft.targets against PEFT itself, run on tiny random Llama models."""

from __future__ import annotations

import json
import logging
import math
import warnings

import pytest

import torch  # noqa: E402
import transformers  # noqa: E402
import peft  # noqa: E402

from peft.tuners.lora import LoraLayer  # noqa: E402
from peft.utils import ModulesToSaveWrapper  # noqa: E402

from jpeft.config import UnsupportedConfigError  # noqa: E402
from jpeft.methods.lora import LoraConfig, lora_scaling, resolve_rank_alpha  # noqa: E402
from jpeft.registry import config_from_dict  # noqa: E402
from jpeft.targets import (  # noqa: E402
  AllTargetsExcludedError,
  ConflictingTargetsError,
  NoMatchingTargetsError,
  TargetResolution,
  UnsupportedTargetError,
  default_feedforward_modules,
  default_target_modules,
  layer_index,
  resolve_targets,
  summarize_modules,
)

from paths import LORA_EXPERIMENTS as EXPERIMENTS  # noqa: E402

NUM_LAYERS = 3


def make_llama(tied: bool, num_layers: int = NUM_LAYERS):
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=num_layers,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    tie_word_embeddings=tied,
  )
  return transformers.LlamaForCausalLM(config)


def module_kinds_of(model, with_containers: bool = False) -> dict[str, str]:
  kinds = {}
  for name, module in model.named_modules():
    if not name:
      continue
    if isinstance(module, torch.nn.Linear):
      kinds[name] = "linear"
    elif isinstance(module, torch.nn.Embedding):
      kinds[name] = "embedding"
    elif type(module).__name__.endswith("RMSNorm"):
      kinds[name] = "norm"
    elif with_containers:
      kinds[name] = "module"
  return kinds


@pytest.fixture(scope="module")
def kinds():
  model = make_llama(tied=False)
  return {"leaves": module_kinds_of(model), "all": module_kinds_of(model, with_containers=True)}


def run_peft(config_kwargs: dict, tied: bool, num_layers: int = NUM_LAYERS):
  """Applies PEFT's LoRA; returns (targets, modules_to_save, {target: (r, scaling)}) or the exception raised."""
  model = make_llama(tied, num_layers)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    try:
      pm = peft.get_peft_model(model, peft.LoraConfig(**config_kwargs))
    except (ValueError, TypeError) as e:
      return e
  prefix = "base_model.model."
  targets, saved, rs = [], [], {}
  for name, module in pm.named_modules():
    if isinstance(module, LoraLayer):
      key = name.removeprefix(prefix)
      targets.append(key)
      rs[key] = (module.r["default"], module.scaling["default"])
    elif isinstance(module, ModulesToSaveWrapper):
      saved.append(name.removeprefix(prefix))
  return tuple(targets), tuple(saved), rs


def jpeft_lora(config_kwargs: dict, kinds: dict[str, str], **kwargs) -> TargetResolution:
  config = config_from_dict({"peft_type": "LORA", **config_kwargs})
  return resolve_targets(config, kinds, "llama", **kwargs)


# (id, LoraConfig kwargs, uses containers: only a module_kinds with container modules can reproduce PEFT)
CASES = [
  ("list", dict(target_modules=["q_proj", "v_proj"]), False),
  ("list-dotted-suffix", dict(target_modules=["self_attn.q_proj", "mlp.down_proj"]), False),
  ("list-full-name", dict(target_modules=["model.layers.1.self_attn.k_proj"]), False),
  ("list-no-dot-boundary", dict(target_modules=["proj"]), False),
  ("list-empty", dict(target_modules=[]), False),
  ("str-regex", dict(target_modules=r".*layers\.1\..*(q|v)_proj"), False),
  ("str-must-fullmatch", dict(target_modules="q_proj"), False),
  ("all-linear", dict(target_modules="all-linear"), False),
  ("all-linear-uppercase", dict(target_modules="ALL-LINEAR"), False),
  ("none-default", dict(target_modules=None), False),
  ("exclude-str", dict(target_modules="all-linear", exclude_modules=r".*mlp.*"), False),
  (
    "exclude-list",
    dict(
      target_modules=["q_proj", "v_proj", "o_proj"],
      exclude_modules=["o_proj", "model.layers.0.self_attn.q_proj"],
    ),
    False,
  ),
  ("exclude-unused", dict(target_modules=["q_proj"], exclude_modules=["nothing_here"]), False),
  ("exclude-everything", dict(target_modules=["q_proj"], exclude_modules=["q_proj"]), False),
  ("layers-int", dict(target_modules=["q_proj", "down_proj"], layers_to_transform=1), False),
  ("layers-list", dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[0, 2]), False),
  ("layers-empty-list", dict(target_modules=["q_proj"], layers_to_transform=[]), False),
  ("layers-with-none-default", dict(target_modules=None, layers_to_transform=[2]), False),
  (
    "layers-pattern-str",
    dict(target_modules=["v_proj", "up_proj"], layers_to_transform=[1], layers_pattern="layers"),
    False,
  ),
  (
    "layers-pattern-list",
    dict(target_modules=["v_proj"], layers_to_transform=[0, 1], layers_pattern=["blocks", "layers"]),
    False,
  ),
  (
    "layers-pattern-nomatch",
    dict(target_modules=["v_proj"], layers_to_transform=[0], layers_pattern="blocks"),
    False,
  ),
  (
    "layers-exact-key-skips-filter",
    dict(target_modules=["model.layers.0.self_attn.q_proj", "v_proj"], layers_to_transform=[2]),
    False,
  ),
  ("layers-out-of-range", dict(target_modules=["v_proj"], layers_to_transform=[7]), False),
  ("modules-to-save-lm-head", dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]), False),
  (
    "modules-to-save-excludes-target",
    dict(target_modules="all-linear", modules_to_save=["down_proj", "model.norm"]),
    False,
  ),
  (
    "modules-to-save-endswith",
    dict(target_modules=["q_proj"], modules_to_save=["input_layernorm"]),
    False,
  ),
  (
    "modules-to-save-no-dot-boundary",
    dict(target_modules="all-linear", modules_to_save=["layernorm"]),
    False,
  ),
  ("modules-to-save-container", dict(target_modules=["q_proj", "gate_proj"], modules_to_save=["mlp"]), True),
  ("target-embeddings", dict(target_modules=["embed_tokens", "lm_head"]), False),
  (
    "patterns",
    dict(
      target_modules=["q_proj", "v_proj", "down_proj"],
      r=4,
      lora_alpha=8,
      rank_pattern={"v_proj": 2, "model.layers.1.self_attn.q_proj": 6},
      alpha_pattern={"q_proj": 32, r"layers\.2\.mlp\.down_proj": 3},
    ),
    False,
  ),
  (
    "patterns-dict-order",
    dict(
      target_modules=["q_proj", "v_proj"],
      rank_pattern={r"layers\.0\..*": 3, "q_proj": 5},
      alpha_pattern={"q_proj": 10, r".*\.0\.self_attn\.q_proj": 20},
    ),
    False,
  ),
  (
    "patterns-rslora",
    dict(target_modules=["q_proj", "v_proj"], r=16, lora_alpha=8, use_rslora=True, rank_pattern={"v_proj": 4}),
    False,
  ),
]


def _check_against_peft(kwargs: dict, tied: bool, module_kinds: dict[str, str]):
  expected = run_peft(kwargs, tied)
  if isinstance(expected, Exception):
    with pytest.raises(NoMatchingTargetsError):
      jpeft_lora(kwargs, module_kinds)
    return None
  targets, saved, rs = expected
  got = jpeft_lora(kwargs, module_kinds)
  assert got.targets == targets
  assert got.modules_to_save == saved
  config = config_from_dict({"peft_type": "LORA", **kwargs})
  for name in got.targets:
    r, alpha = resolve_rank_alpha(config, name)
    peft_r, peft_scaling = rs[name]
    assert r == peft_r, name
    assert lora_scaling(r, alpha, config.use_rslora) == pytest.approx(peft_scaling, rel=1e-12), name
  return got


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("case_id,kwargs,needs_containers", CASES, ids=[c[0] for c in CASES])
def test_matches_peft(case_id, kwargs, needs_containers, tied, kinds):
  _check_against_peft(kwargs, tied, kinds["all"])
  if not needs_containers:
    _check_against_peft(kwargs, tied, kinds["leaves"])


def test_expected_values_of_some_cases(kinds):
  k = kinds["leaves"]
  got = jpeft_lora(dict(target_modules="all-linear"), k)
  assert "lm_head" not in got.targets
  assert len(got.targets) == 7 * NUM_LAYERS
  assert got.target_modules == got.targets
  got = jpeft_lora(dict(target_modules=None), k)
  assert got.target_modules == ("q_proj", "v_proj")
  assert got.targets == tuple(
    f"model.layers.{i}.self_attn.{p}" for i in range(NUM_LAYERS) for p in ("q_proj", "v_proj")
  )
  got = jpeft_lora(dict(target_modules=["q_proj", "v_proj", "o_proj"], exclude_modules=["o_proj"]), k)
  assert len(got.excluded) == NUM_LAYERS and all(e.endswith("o_proj") for e in got.excluded)
  got = jpeft_lora(dict(target_modules=["q_proj"], modules_to_save=["lm_head"]), k)
  assert got.modules_to_save == ("lm_head",)
  config = config_from_dict(
    {"peft_type": "LORA", "target_modules": ["q_proj", "v_proj"], "rank_pattern": {r"layers\.0\..*": 3, "q_proj": 5}}
  )
  assert resolve_rank_alpha(config, "model.layers.0.self_attn.q_proj") == (3, 8)
  assert resolve_rank_alpha(config, "model.layers.1.self_attn.q_proj") == (5, 8)
  assert resolve_rank_alpha(config, "model.layers.1.self_attn.v_proj") == (8, 8)


# ------------------------------------------------------------------------------------------------------------
# The LoRA experiment configs of PEFT's method-comparison benchmark
# ------------------------------------------------------------------------------------------------------------

# Experiments whose adapter_config.json jpeft refuses, and the field named in the error.
#   bdlora: `use_bdlora` (block-diagonal LoRA factors) is a LoRA variant jpeft does not implement.
#   kasa:   `kasa_config` (KaSA truncates the base weight and adds lora_diag) is not implemented.
#   mica:   `init_lora_weights="mica"` (frozen B from the smallest singular vectors) is not implemented.
# lorafa and riemannian change only the optimizer (training_params.json); their adapter configs are plain LoRA.
REFUSED_EXPERIMENTS = {
  "llama-3.2-3B-rank14-target-mlp-bdlora": "use_bdlora",
  "llama-3.2-3B-rank32-kasa": "kasa_config",
  "llama-3.2-3B-rank32-mica": "init_lora_weights",
}


def _experiment_dirs():
  return sorted(p for p in EXPERIMENTS.iterdir() if (p / "adapter_config.json").is_file())


def test_experiment_list_is_known():
  names = {p.name for p in _experiment_dirs()}
  assert set(REFUSED_EXPERIMENTS) <= names
  assert len(names) >= 10


@pytest.mark.parametrize("exp_dir", _experiment_dirs(), ids=lambda p: p.name)
def test_lora_experiment_configs(exp_dir, kinds):
  data = json.loads((exp_dir / "adapter_config.json").read_text())
  if exp_dir.name in REFUSED_EXPERIMENTS:
    field = REFUSED_EXPERIMENTS[exp_dir.name]
    with pytest.raises(UnsupportedConfigError, match=field):
      config_from_dict(data)
    return
  config = config_from_dict(data)
  assert isinstance(config, LoraConfig)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    peft_config = peft.LoraConfig.from_pretrained(str(exp_dir))
    pm = peft.get_peft_model(make_llama(tied=True), peft_config)
  expected = {
    n.removeprefix("base_model.model."): (m.r["default"], m.scaling["default"])
    for n, m in pm.named_modules()
    if isinstance(m, LoraLayer)
  }
  got = resolve_targets(config, kinds["leaves"], "llama")
  assert set(got.targets) == set(expected)
  assert len(got.targets) == len(expected)
  for name in got.targets:
    r, alpha = resolve_rank_alpha(config, name)
    assert (r, lora_scaling(r, alpha, config.use_rslora)) == pytest.approx(expected[name])


# ------------------------------------------------------------------------------------------------------------
# Defaults table
# ------------------------------------------------------------------------------------------------------------

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")


def _peft_default_mapping(peft_type):
  from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
  from peft.utils import constants

  if peft_type == "IA3":
    return constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING
  tuner = PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type)
  return getattr(tuner, "target_module_mapping", None) if tuner is not None else None


@pytest.mark.parametrize("peft_type", [t.value for t in peft.utils.PeftType])
def test_default_target_table_matches_peft(peft_type, kinds):
  if peft_type == "TRAINABLE_TOKENS":
    assert default_target_modules(peft_type, "llama", kinds["leaves"]) == "model.embed_tokens"
    return
  mapping = _peft_default_mapping(peft_type) or {}
  for model_type in MODEL_TYPES:
    expected = mapping.get(model_type)
    got = default_target_modules(peft_type, model_type)
    assert got == (None if expected is None else tuple(expected)), (peft_type, model_type)
  assert default_target_modules(peft_type, "no-such-model") is None


def test_default_ia3_feedforward_table_matches_peft():
  from peft.utils import constants

  for model_type in MODEL_TYPES:
    expected = constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model_type)
    assert default_feedforward_modules(model_type) == tuple(expected)
  assert default_feedforward_modules("no-such-model") is None


def test_default_targets_override_and_unknown_model_type(kinds):
  config = LoraConfig()
  with pytest.raises(ValueError, match="target_modules"):
    resolve_targets(config, kinds["leaves"], "no-such-model")
  got = resolve_targets(config, kinds["leaves"], "no-such-model", default_targets=["o_proj"])
  assert got.targets == tuple(f"model.layers.{i}.self_attn.o_proj" for i in range(NUM_LAYERS))


# ------------------------------------------------------------------------------------------------------------
# Errors and logging
# ------------------------------------------------------------------------------------------------------------


def test_no_match_error_message(kinds):
  with pytest.raises(NoMatchingTargetsError) as info:
    jpeft_lora(dict(target_modules=["qkv_proj"]), kinds["leaves"])
  message = str(info.value)
  assert "qkv_proj" in message
  assert "model.embed_tokens" in message
  shown = message.split("Available modules include:")[1]
  assert shown.count("model.") <= 10
  assert isinstance(info.value, ValueError)


def test_all_excluded_error(kinds):
  with pytest.raises(AllTargetsExcludedError, match="excluded"):
    jpeft_lora(dict(target_modules=["q_proj"], exclude_modules=["q_proj"]), kinds["leaves"])
  with pytest.raises(AllTargetsExcludedError, match="modules_to_save"):
    jpeft_lora(dict(target_modules=["lm_head"], modules_to_save=["lm_head"]), kinds["leaves"])


def test_unsupported_kind_matches_peft_error(kinds):
  kwargs = dict(target_modules=r".*input_layernorm")
  peft_error = run_peft(kwargs, tied=False)
  assert isinstance(peft_error, ValueError) and "is not supported. Currently, only the following modules" in str(
    peft_error
  )
  with pytest.raises(UnsupportedTargetError, match="input_layernorm") as info:
    jpeft_lora(kwargs, kinds["leaves"], supported_kinds=("linear", "embedding"))
  message = str(info.value)
  assert (
    "Target module 'model.layers.0.input_layernorm' is a norm (RMSNorm) layer, which LORA does not support" in message
  )
  assert "Currently, only the following modules are supported: linear (torch.nn.Linear), embedding" in message
  assert f"matched {NUM_LAYERS} module(s) of kind 'norm': model.layers.*.input_layernorm (x{NUM_LAYERS})" in message
  # without the kind check, the name rule alone is applied
  got = jpeft_lora(kwargs, kinds["leaves"])
  assert got.targets == tuple(f"model.layers.{i}.input_layernorm" for i in range(NUM_LAYERS))


@pytest.mark.parametrize("modules_to_save", [["proj"], ["q_proj_"], ["self_attn.q_proj"]])
def test_target_also_in_modules_to_save(kinds, modules_to_save):
  """A module both adapted and fully copied: PEFT refuses it ("modules_to_save cannot be applied to modules of type
  ...lora.layer.Linear"), so does jpeft, naming the modules; a whole dotted name keeps the module out of the
  targets instead, as in PEFT."""
  kwargs = dict(target_modules=["q_proj", "v_proj"], modules_to_save=modules_to_save)
  expected = run_peft(kwargs, tied=False)
  if isinstance(expected, Exception):
    with pytest.raises(ConflictingTargetsError) as info:
      jpeft_lora(kwargs, kinds["leaves"])
    assert "modules_to_save" in str(info.value) and "model.layers.0.self_attn.q_proj" in str(info.value)
  else:
    got = jpeft_lora(kwargs, kinds["leaves"])
    assert (got.targets, got.modules_to_save) == expected[:2]


def test_launcher_command_line_reports_target_errors(tmp_path):
  """``python -m experiments.run`` with a norm target: exit status 2, one ``error:`` line naming the module and
  the adapter config, no traceback -- found from the model's config.json, before any weight is loaded."""
  import os
  import subprocess
  import sys

  from backends.tiny import make_tiny_llama

  model = make_tiny_llama(str(tmp_path / "model"))
  os.remove(os.path.join(model, "model.safetensors"))  # no weights at all: the check must not need them
  folder = tmp_path / "experiments" / "lora" / "norm"
  folder.mkdir(parents=True)
  (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "target_modules": ["input_layernorm"]}))
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for backend, error in (("jax", "UnsupportedTargetError"), ("torch", "UnsupportedTargetError")):
    proc = subprocess.run(
      [sys.executable, "-m", "experiments.run", f"--experiment={folder}", f"--model={model}", f"--backend={backend}"],
      cwd=repo,
      capture_output=True,
      text=True,
      timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert errors[0].startswith(f"error: {error}: {folder / 'adapter_config.json'}: Target module "), errors[0]
    assert "'model.layers.0.input_layernorm' is a norm (RMSNorm) layer" in errors[0]


def test_layer_index():
  assert layer_index("model.layers.12.self_attn.q_proj") == 12
  assert layer_index("model.layers.1.experts.3.w1") == 1
  assert layer_index("lm_head") is None
  assert layer_index("model.h.4.attn.c_attn", "h") == 4
  assert layer_index("model.layers.4.attn.c_attn", ["h", "layers"]) == 4
  assert layer_index("model.layers.4.attn.c_attn", "blocks") is None


def test_summary_is_logged(kinds, caplog):
  caplog.set_level(logging.INFO, logger="absl")
  jpeft_lora(dict(target_modules=["q_proj", "v_proj"]), kinds["leaves"])
  text = caplog.text
  assert f"{2 * NUM_LAYERS} target modules" in text
  assert f"model.layers.*.self_attn.q_proj (x{NUM_LAYERS})" in text


def test_summarize_modules():
  names = [f"model.layers.{i}.mlp.{p}" for i in range(30) for p in ("up_proj", "down_proj")]
  assert summarize_modules(names) == "model.layers.*.mlp.up_proj (x30), model.layers.*.mlp.down_proj (x30)"
  assert summarize_modules(["lm_head"]) == "lm_head"


def test_scaling_values():
  assert lora_scaling(8, 16) == 2.0
  assert lora_scaling(16, 8, use_rslora=True) == pytest.approx(8 / math.sqrt(16))
  with pytest.raises(ValueError, match="positive integer"):
    lora_scaling(0, 8)
