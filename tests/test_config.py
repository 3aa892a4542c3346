"""jpeft.config: PEFT's adapter_config.json as frozen dataclasses, checked against the installed PEFT."""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle

import pytest

from jpeft.config import (
  CONFIG_NAME,
  ConfigTypeError,
  FileMissingError,
  FrozenDict,
  InvalidConfigError,
  JpeftError,
  PeftConfig,
  UnsupportedConfigError,
  config_to_dict,
  get_pattern_key,
  save_config,
)
from jpeft.methods.lora import LoraConfig, lora_scaling, resolve_rank_alpha
from jpeft.registry import config_from_dict, load_config, registered_peft_types

import peft  # noqa: E402


def _peft_default(f):
  if f.default is not dataclasses.MISSING:
    return f.default
  return f.default_factory()


# ------------------------------------------------------------------------------------------------------------
# Fields and defaults
# ------------------------------------------------------------------------------------------------------------


def _normalised(value):
  """A PEFT default as jpeft stores it (lists/sets as tuples, dicts as FrozenDicts, dataclasses as dicts)."""
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    value = dataclasses.asdict(value)
  return FrozenDict({"v": value})["v"]


# Fields a config cannot be built without (PEFT raises on its own default too): given here, not compared.
_REQUIRED = {"ADALORA": {"total_step": 1}}


@pytest.mark.parametrize("peft_type", registered_peft_types())
def test_every_registered_config_has_peft_fields_and_defaults(peft_type):
  """Each jpeft config class against the PEFT config class of the same peft_type: same fields, same defaults."""
  from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

  from jpeft import registry

  ours_cls = registry.get_config_class(peft_type)
  theirs_cls = PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]
  ours = {f.name for f in dataclasses.fields(ours_cls)} - ours_cls.peft_absent_fields
  theirs = {f.name: f for f in dataclasses.fields(theirs_cls)}
  assert ours == set(theirs), (sorted(ours - set(theirs)), sorted(set(theirs) - ours))
  required = _REQUIRED.get(peft_type, {})
  default = ours_cls(**required)
  for name, f in theirs.items():
    got = getattr(default, name)
    if name in required:
      continue
    if name == "peft_type":
      assert got == peft_type
    else:
      assert got == _normalised(_peft_default(f)), name
  # and PEFT reads jpeft's defaults back as its own
  from peft import PeftConfig as TheirPeftConfig

  theirs_default = TheirPeftConfig.from_peft_type(**config_to_dict(default))
  assert type(theirs_default) is theirs_cls


def test_base_fields():
  names = [f.name for f in dataclasses.fields(PeftConfig)]
  assert names == [
    "peft_type",
    "task_type",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "peft_version",
    "auto_mapping",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "modules_to_save",
  ]
  assert "LORA" in registered_peft_types()


def test_frozen_hashable_normalised():
  config = LoraConfig(
    target_modules=["q_proj", "v_proj"],
    exclude_modules={"o_proj"},
    modules_to_save=["lm_head"],
    layers_to_transform=[0, 1],
    rank_pattern={"v_proj": 2, "q_proj": 4},
    alpha_pattern={"q_proj": 16},
  )
  assert config.target_modules == ("q_proj", "v_proj")
  assert config.exclude_modules == ("o_proj",)
  assert config.layers_to_transform == (0, 1)
  assert isinstance(config.rank_pattern, FrozenDict)
  assert list(config.rank_pattern) == ["v_proj", "q_proj"]
  assert hash(config) == hash(LoraConfig(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)}))
  with pytest.raises(dataclasses.FrozenInstanceError):
    config.r = 4  # type: ignore[misc]
  assert pickle.loads(pickle.dumps(config)) == config
  # the order of patterns matters, so it is part of equality
  a = LoraConfig(rank_pattern={"v_proj": 2, "q_proj": 4})
  b = LoraConfig(rank_pattern={"q_proj": 4, "v_proj": 2})
  assert a != b
  assert a.rank_pattern == {"v_proj": 2, "q_proj": 4}
  assert config.replace(r=4).r == 4


def test_frozen_dict():
  d = FrozenDict({"a": [1, 2], "b": {"c": 3}})
  assert d["a"] == (1, 2)
  assert isinstance(d["b"], FrozenDict)
  assert d.to_dict() == {"a": [1, 2], "b": {"c": 3}}
  assert hash(d) == hash(FrozenDict(a=(1, 2), b=FrozenDict(c=3)))
  assert len(d) == 2 and "a" in d and "z" not in d
  with pytest.raises(TypeError):
    d["x"] = 1  # type: ignore[index]


ACCEPTED_WITHOUT_EFFECT = {
  "peft_type": "LORA",
  "task_type": "CAUSAL_LM",
  "inference_mode": True,
  "peft_version": "0.17.0",
  "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M",
  "revision": "main",
  "auto_mapping": {"base_model_class": "LlamaForCausalLM", "parent_library": "transformers"},
  "runtime_config": {"ephemeral_gpu_offload": True},
  "megatron_core": "megatron.core",
  "qalora_group_size": 32,
  "ensure_weight_tying": False,
}


def test_accepted_fields_without_effect():
  """Fields jpeft reads and keeps but does not act on: every value is kept as given, written back unchanged, and
  is what PEFT reads from the same dict."""
  config = config_from_dict(ACCEPTED_WITHOUT_EFFECT)
  saved = config_to_dict(config)
  theirs = peft.PeftConfig.from_peft_type(**ACCEPTED_WITHOUT_EFFECT)
  for key, value in ACCEPTED_WITHOUT_EFFECT.items():
    assert getattr(config, key) == value, key
    if key == "runtime_config":  # PEFT does not save it either
      assert key not in saved
    else:
      assert saved[key] == value, key
    assert _comparable(getattr(theirs, key)) == value, key
  # the fields not given keep PEFT's defaults
  default = config_to_dict(LoraConfig())
  assert {k: v for k, v in saved.items() if k not in ACCEPTED_WITHOUT_EFFECT} == {
    k: v for k, v in default.items() if k not in ACCEPTED_WITHOUT_EFFECT
  }


# what each accepted init_lora_weights becomes: jpeft lower-cases the two that PEFT compares case-insensitively
SUPPORTED_INITS = {True: True, False: False, "gaussian": "gaussian", "Gaussian": "gaussian", "pissa": "pissa"}
SUPPORTED_INITS.update({"olora": "olora", "OLoRA": "olora"})


@pytest.mark.parametrize("init", list(SUPPORTED_INITS), ids=repr)
def test_supported_inits(init):
  config = LoraConfig(init_lora_weights=init)
  assert config.init_lora_weights is SUPPORTED_INITS[init] or config.init_lora_weights == SUPPORTED_INITS[init]
  assert type(config.init_lora_weights) is type(SUPPORTED_INITS[init])
  # PEFT accepts the same value, and treats it the same way (its layers compare the lower-cased string)
  theirs = peft.LoraConfig(init_lora_weights=init).init_lora_weights
  assert (theirs.lower() if isinstance(theirs, str) else theirs) == config.init_lora_weights
  assert config_from_dict(config_to_dict(config)) == config


# ------------------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------------------

UNSUPPORTED = [
  ("kasa_config", {"beta": 0.0001, "gamma": 0.001}),
  ("kasa_config", {}),
  ("use_bdlora", {"target_modules_bd_a": ["o_proj"], "target_modules_bd_b": ["q_proj"], "nblocks": 2}),
  ("arrow_config", {"top_k": 2}),
  ("velora_config", {"num_groups": 64}),
  ("monteclora_config", {"n_experts": 2}),
  ("trainable_token_indices", [1, 2, 3]),
  ("alora_invocation_tokens", [5, 6]),
  ("megatron_config", {"tensor_model_parallel_size": 2}),
  ("layer_replication", [[0, 2], [1, 2]]),
  ("target_parameters", ["mlp.gate_proj.weight"]),
  ("use_qalora", True),
  ("lora_bias", True),
  ("ensure_weight_tying", True),
  ("init_lora_weights", "mica"),
  ("init_lora_weights", "orthogonal"),
  ("init_lora_weights", "loftq"),
  ("init_lora_weights", "corda"),
  ("init_lora_weights", "eva"),
  ("init_lora_weights", "lora_ga"),
  ("init_lora_weights", "pissa_niter_4"),
]


@pytest.mark.parametrize("field,value", UNSUPPORTED, ids=[f"{f}={v!r}"[:40] for f, v in UNSUPPORTED])
def test_unsupported_fields(field, value):
  with pytest.raises(UnsupportedConfigError) as info:
    config_from_dict({"peft_type": "LORA", "target_modules": ["q_proj"], field: value})
  message = str(info.value)
  assert field in message
  assert repr(value)[:20] in message
  assert isinstance(info.value, ValueError)


def test_init_sub_configs_ignored_like_peft():
  config = LoraConfig(loftq_config={"loftq_bits": 4}, eva_config={"rho": 2.0}, corda_config={"cache_file": "x"})
  assert config.loftq_config == {}
  assert config.eva_config == {"rho": 2.0}


def test_fan_in_fan_out_reset_like_peft_for_linear():
  assert LoraConfig(fan_in_fan_out=True).fan_in_fan_out is False


def test_r_must_be_positive():
  for r in (0, -1):
    with pytest.raises(ValueError, match=rf"`r` should be a positive integer value but the value passed is {r}"):
      LoraConfig(r=r)
  with pytest.raises(ValueError, match="positive integer"):
    resolve_rank_alpha(LoraConfig(rank_pattern={"q_proj": 0}), "model.layers.0.self_attn.q_proj")


@pytest.mark.parametrize(
  "kwargs,message",
  [
    (dict(target_modules=".*q_proj", layers_to_transform=[0]), "`layers_to_transform` cannot be used"),
    (dict(target_modules=".*q_proj", layers_pattern="layers"), "`layers_pattern` cannot be used"),
    (dict(target_modules=["q_proj"], layers_pattern="layers"), "`layers_to_transform` must also be specified"),
    (dict(use_dora=True, lora_bias=True), "not supported for DoRA"),
    (dict(init_lora_weights="pissa", lora_bias=True), "only supported with init_lora_weights=True or False"),
    (dict(bias="some"), "bias"),
    (dict(init_lora_weights="bogus"), "Unknown initialization"),
    (dict(init_lora_weights="PiSSA"), "Unknown initialization"),
    (dict(lora_dropout=1.5), "dropout"),
    (dict(task_type="NOT_A_TASK"), "Invalid task type"),
    (dict(peft_type="IA3"), "peft_type"),
  ],
)
def test_invalid_like_peft(kwargs, message):
  with pytest.raises(ValueError, match=message) as info:
    LoraConfig(**kwargs)
  assert not isinstance(info.value, UnsupportedConfigError)


@pytest.mark.parametrize("p", [1.0, 1, 1.0000001, 1.5, -0.1, -1e-9, float("nan"), float("inf")])
def test_dropout_out_of_range_is_refused(p):
  with pytest.raises(InvalidConfigError) as info:
    config_from_dict({"peft_type": "LORA", "lora_dropout": p})
  message = str(info.value)
  assert "`lora_dropout`" in message and "0 <= lora_dropout < 1" in message and repr(p) in message
  if p == 1:  # the reason, for the one value PEFT itself accepts
    assert "zeroes every input of the adapter, so nothing trains" in message


@pytest.mark.parametrize("p", ["0.1", None, True, [0.1], {"p": 0.1}])
def test_dropout_must_be_a_number(p):
  with pytest.raises(ConfigTypeError) as info:
    config_from_dict({"peft_type": "LORA", "lora_dropout": p})
  assert "`lora_dropout`" in str(info.value) and "number" in str(info.value)
  assert isinstance(info.value, ValueError) and isinstance(info.value, TypeError)


@pytest.mark.parametrize("p", [0, 0.0, 1e-12, 0.1, 0.5, 0.9, 0.999999])
def test_dropout_in_range_is_kept(p):
  config = config_from_dict({"peft_type": "LORA", "lora_dropout": p})
  assert config.lora_dropout == p
  assert config_to_dict(config)["lora_dropout"] == p
  assert peft.LoraConfig(lora_dropout=p).lora_dropout == p  # PEFT takes the same values


@pytest.mark.parametrize(
  "field,value,words",
  [
    ("r", "8", ["`r`", "an integer", "'8'"]),
    ("r", 8.0, ["`r`", "an integer", "8.0"]),
    ("lora_alpha", "16", ["`lora_alpha`", "a number"]),
    ("use_dora", "false", ["`use_dora`", "true or false", "'false'"]),
    ("use_rslora", 1, ["`use_rslora`", "true or false"]),
    ("target_modules", 5, ["`target_modules`", "a list of strings or a string or null"]),
    ("layers_to_transform", "0", ["`layers_to_transform`"]),
    ("rank_pattern", ["q_proj"], ["`rank_pattern`", "a dict"]),
    ("layer_replication", [[0]], ["`layer_replication`", "lists of 2 integers"]),
    ("inference_mode", None, ["`inference_mode`", "null"]),
  ],
)
def test_wrong_types_name_the_field(field, value, words):
  with pytest.raises(ConfigTypeError) as info:
    config_from_dict({"peft_type": "LORA", field: value})
  for word in words:
    assert word in str(info.value), (word, str(info.value))


@pytest.mark.parametrize(
  "kwargs,words",
  [
    (dict(lora_alpha=float("nan")), ["`lora_alpha`", "finite"]),
    (dict(lora_alpha=float("inf")), ["`lora_alpha`", "finite"]),
    (dict(lora_alpha=1e39), ["`lora_alpha`", "float32"]),
    (dict(alpha_pattern={"q_proj": float("nan")}), ["alpha_pattern['q_proj']"]),
    (dict(rank_pattern={"q_proj": 0}), ["`rank_pattern`['q_proj']", "positive integer"]),
    (dict(rank_pattern={"q_proj": 2.5}), ["`rank_pattern`['q_proj']", "integer rank"]),
    (dict(rank_pattern={"(": 2}), ["`rank_pattern`", "'('", "regular expression"]),
    (dict(target_modules="*_proj"), ["`target_modules`", "'*_proj'", "regular expression"]),
    (dict(exclude_modules="[mlp"), ["`exclude_modules`", "regular expression"]),
    (dict(modules_to_save=["lm_head("]), ["`modules_to_save`", "regular expression"]),
    (dict(modules_to_save=[""]), ["`modules_to_save`", "non-empty"]),
    (dict(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="(x"), ["`layers_pattern`"]),
    (dict(task_type="causal_lm"), ["`task_type`", "CAUSAL_LM"]),
    (dict(use_dora=True, megatron_config={"tensor_model_parallel_size": 2}), ["`megatron_config`"]),
  ],
)
def test_invalid_values_name_the_field(kwargs, words):
  with pytest.raises(InvalidConfigError) as info:
    config_from_dict({"peft_type": "LORA", **kwargs})
  for word in words:
    assert word in str(info.value), (word, str(info.value))


def test_peft_type_must_be_an_upper_case_string():
  with pytest.raises(ConfigTypeError, match="`peft_type` must be a string"):
    config_from_dict({"peft_type": 5})
  with pytest.raises(UnsupportedConfigError, match="did you mean 'LORA'"):
    config_from_dict({"peft_type": "lora"})


def test_error_hierarchy():
  from jpeft import core, targets
  from jpeft.models import loading

  for cls in (
    InvalidConfigError,
    ConfigTypeError,
    UnsupportedConfigError,
    FileMissingError,
    targets.TargetError,
    targets.NoMatchingTargetsError,
    targets.UnsupportedTargetError,
    targets.ConflictingTargetsError,
    core.AdapterCheckpointError,
    loading.CheckpointError,
  ):
    assert issubclass(cls, JpeftError) and issubclass(cls, ValueError), cls
  assert issubclass(FileMissingError, FileNotFoundError) and issubclass(ConfigTypeError, TypeError)


def test_numpy_scalars_are_plain_numbers():
  import numpy as np

  config = LoraConfig(r=np.int64(4), lora_alpha=np.float32(8.0), lora_dropout=np.float64(0.1))
  assert (type(config.r), type(config.lora_alpha), type(config.lora_dropout)) == (int, float, float)
  assert config == LoraConfig(r=4, lora_alpha=8.0, lora_dropout=0.1)


@pytest.mark.parametrize(
  "kwargs",
  [
    dict(target_modules=".*q_proj", layers_to_transform=[0]),
    dict(target_modules=["q_proj"], layers_pattern="layers"),
    dict(use_dora=True, lora_bias=True),
    dict(task_type="NOT_A_TASK"),
  ],
)
def test_peft_rejects_the_same(kwargs):
  with pytest.raises(ValueError):
    peft.LoraConfig(**kwargs)


# ------------------------------------------------------------------------------------------------------------
# config_from_dict / registry
# ------------------------------------------------------------------------------------------------------------


def test_unknown_peft_type():
  with pytest.raises(UnsupportedConfigError) as info:
    config_from_dict({"peft_type": "POLY", "r": 4})
  message = str(info.value)
  assert "POLY" in message and "PEFT method" in message and "not (yet)" in message and "LORA" in message
  with pytest.raises(UnsupportedConfigError) as info:
    config_from_dict({"peft_type": "NOT_A_METHOD"})
  message = str(info.value)
  assert "NOT_A_METHOD" in message and "LORA" in message and "not (yet)" not in message


def test_missing_peft_type():
  with pytest.raises(InvalidConfigError, match="peft_type"):
    config_from_dict({"r": 8})
  with pytest.raises(InvalidConfigError):
    config_from_dict(["not", "a", "dict"])  # type: ignore[arg-type]


def test_unknown_keys_are_ignored_with_warning(caplog):
  caplog.set_level(logging.WARNING, logger="absl")
  config = config_from_dict({"peft_type": "LORA", "r": 4, "some_future_field": 1, "another": [1]})
  assert config.r == 4
  assert "some_future_field" in caplog.text and "another" in caplog.text


def test_peft_type_enum_accepted():
  config = config_from_dict({"peft_type": peft.PeftType.LORA, "task_type": peft.TaskType.CAUSAL_LM})
  assert config.peft_type == "LORA" and config.task_type == "CAUSAL_LM"


def test_register_files_config_and_method_together():
  from jpeft.methods import base
  from jpeft.methods import lora

  @dataclasses.dataclass(frozen=True, kw_only=True)
  class _TestConfig(PeftConfig):
    peft_type: str = "JPEFT_TEST_METHOD"
    scale: float = 1.0

    peft_absent_fields = frozenset({"layers_to_transform", "layers_pattern"})

  method = base.Method(config_class=_TestConfig, init_module=lora.init_module, adapt_module=lora.adapt_module)
  try:
    base.register(method)
    assert "JPEFT_TEST_METHOD" in registered_peft_types()
    from jpeft import registry

    assert registry.get_method("JPEFT_TEST_METHOD") is method and method.peft_type == "JPEFT_TEST_METHOD"
    config = config_from_dict({"peft_type": "JPEFT_TEST_METHOD", "scale": 2.0, "target_modules": ["q_proj"]})
    assert isinstance(config, _TestConfig) and config.scale == 2.0
    d = config_to_dict(config)
    assert "layers_to_transform" not in d and d["scale"] == 2.0 and d["target_modules"] == ["q_proj"]
    # a field PEFT's class lacks is an unknown key
    config = config_from_dict({"peft_type": "JPEFT_TEST_METHOD", "layers_to_transform": [0]})
    assert config.layers_to_transform is None
    with pytest.raises(ValueError, match="peft_type"):
      _TestConfig(peft_type="LORA")

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class _Other(PeftConfig):
      peft_type: str = "JPEFT_TEST_METHOD"

    with pytest.raises(ValueError, match="already registered"):
      base.register(base.Method(config_class=_Other, init_module=lora.init_module, adapt_module=lora.adapt_module))
  finally:
    base._TABLE.pop("JPEFT_TEST_METHOD", None)
  assert "JPEFT_TEST_METHOD" not in registered_peft_types()
  with pytest.raises(TypeError):
    base.register(base.Method(config_class=int, init_module=lora.init_module, adapt_module=lora.adapt_module))


# ------------------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------------------


def test_load_config_folder_and_file(tmp_path):
  (tmp_path / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}))
  from_folder = load_config(tmp_path)
  from_file = load_config(tmp_path / CONFIG_NAME)
  assert from_folder == from_file
  assert from_folder.r == 4 and from_folder.target_modules == ("q_proj",)


def test_load_config_missing(tmp_path):
  with pytest.raises(FileMissingError, match=str(tmp_path)):
    load_config(tmp_path)
  with pytest.raises(FileNotFoundError, match="nope.json"):
    load_config(tmp_path / "nope.json")


def test_load_config_invalid_json(tmp_path):
  (tmp_path / CONFIG_NAME).write_text('{"peft_type": "LORA", ')
  with pytest.raises(InvalidConfigError, match=CONFIG_NAME):
    load_config(tmp_path)
  (tmp_path / CONFIG_NAME).write_text("[1, 2]")
  with pytest.raises(InvalidConfigError, match="JSON object"):
    load_config(tmp_path)
  (tmp_path / CONFIG_NAME).write_text('{"r": 4}')
  with pytest.raises(InvalidConfigError, match="peft_type"):
    load_config(tmp_path)
  (tmp_path / CONFIG_NAME).write_bytes(b'{"peft_type": "LORA", "bias": "n\xf6ne"}')  # latin-1, not UTF-8
  with pytest.raises(InvalidConfigError, match="UTF-8"):
    load_config(tmp_path)
  # every config error of a file names the file, whatever its type
  for content, error in (
    ({"peft_type": "LORA", "lora_dropout": 1.0}, InvalidConfigError),
    ({"peft_type": "POLY"}, UnsupportedConfigError),
  ):
    (tmp_path / CONFIG_NAME).write_text(json.dumps(content))
    with pytest.raises(error, match=str(tmp_path / CONFIG_NAME)):
      load_config(tmp_path)


ROUND_TRIP = [
  dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=16, task_type="CAUSAL_LM"),
  dict(target_modules=r".*layers\.1\..*(q|v)_proj", lora_dropout=0.1, use_rslora=True),
  dict(
    target_modules=["q_proj", "v_proj", "down_proj"],
    rank_pattern={"v_proj": 2, r"layers\.0\..*": 3},
    alpha_pattern={"q_proj": 32.0},
    exclude_modules=["model.layers.0.mlp.down_proj"],
    layers_to_transform=[0, 2],
    layers_pattern="layers",
    modules_to_save=["lm_head"],
    bias="lora_only",
  ),
  dict(target_modules="all-linear", use_dora=True, init_lora_weights="gaussian", exclude_modules=".*mlp.*"),
  dict(target_modules=None, init_lora_weights="olora", layers_to_transform=1),
  dict(target_modules=["q_proj"], init_lora_weights=False, inference_mode=False),
]


def _comparable(value):
  if isinstance(value, set):
    return sorted(value)
  if isinstance(value, (list, tuple)):
    return [_comparable(v) for v in value]
  if isinstance(value, dict):
    return {k: _comparable(v) for k, v in value.items()}
  return getattr(value, "value", value)


@pytest.mark.parametrize("kwargs", ROUND_TRIP)
def test_round_trip_through_peft(tmp_path, kwargs):
  config = LoraConfig(**kwargs)
  path = save_config(config, tmp_path)
  text = open(path).read()
  data = json.loads(text)
  assert text == json.dumps(data, indent=2, sort_keys=True)
  assert data["inference_mode"] is True
  assert data["peft_version"] == peft.__version__
  assert "runtime_config" not in data

  for loader in (peft.LoraConfig.from_pretrained, peft.PeftConfig.from_pretrained):
    theirs = loader(str(tmp_path))
    assert isinstance(theirs, peft.LoraConfig)
    for f in dataclasses.fields(LoraConfig):
      if f.name in ("inference_mode", "peft_version", "runtime_config"):
        continue
      ours = getattr(config, f.name)
      expected = getattr(theirs, f.name)
      if f.name in ("target_modules", "exclude_modules") and isinstance(expected, set):
        assert sorted(ours) == sorted(expected), f.name
      else:
        assert _comparable(config_to_dict(config)[f.name]) == _comparable(expected), f.name
    assert theirs.inference_mode is True

  # json.dumps(sort_keys=True) also sorts the pattern dicts, so after saving (by PEFT too) their order is
  # alphabetical, and that is the order PEFT matches them in after loading.
  reloaded = load_config(tmp_path)
  for name in ("rank_pattern", "alpha_pattern"):
    assert list(getattr(reloaded, name)) == sorted(getattr(config, name))
    assert list(getattr(reloaded, name)) == list(getattr(peft.LoraConfig.from_pretrained(str(tmp_path)), name))
  assert reloaded == config.replace(
    inference_mode=True,
    peft_version=peft.__version__,
    rank_pattern=dict(sorted(config.rank_pattern.items())),
    alpha_pattern=dict(sorted(config.alpha_pattern.items())),
  )


def test_load_what_peft_saved(tmp_path):
  theirs = peft.LoraConfig(
    r=4,
    lora_alpha=8,
    target_modules=["q_proj", "v_proj"],
    rank_pattern={"v_proj": 2},
    use_dora=True,
    modules_to_save=["lm_head"],
  )
  theirs.save_pretrained(str(tmp_path))
  ours = load_config(tmp_path)
  assert isinstance(ours, LoraConfig)
  assert sorted(ours.target_modules) == ["q_proj", "v_proj"]
  assert (ours.r, ours.lora_alpha, ours.use_dora) == (4, 8, True)
  assert ours.rank_pattern == {"v_proj": 2}
  assert ours.modules_to_save == ("lm_head",)
  assert ours.peft_version == peft.__version__


def test_save_into_file_path_fails(tmp_path):
  file = tmp_path / "x"
  file.write_text("")
  with pytest.raises(ValueError, match="directory"):
    save_config(LoraConfig(), file)


# ------------------------------------------------------------------------------------------------------------
# Patterns and scaling
# ------------------------------------------------------------------------------------------------------------


def test_pattern_resolution():
  config = LoraConfig(
    r=8,
    lora_alpha=16,
    rank_pattern={r"layers\.0\..*": 3, "q_proj": 5},
    alpha_pattern={"v_proj": 4},
  )
  assert resolve_rank_alpha(config, "model.layers.0.self_attn.q_proj") == (3, 16)
  assert resolve_rank_alpha(config, "model.layers.1.self_attn.q_proj") == (5, 16)
  assert resolve_rank_alpha(config, "model.layers.1.self_attn.v_proj") == (8, 4)
  # the pattern must match a whole dotted suffix
  assert resolve_rank_alpha(config, "model.layers.1.self_attn.xq_proj") == (8, 16)
  assert get_pattern_key(["q_proj", "proj"], "a.b.q_proj") == "q_proj"
  assert get_pattern_key(["k_proj"], "a.b.q_proj") is None


def test_pattern_resolution_matches_peft_get_pattern_key():
  from peft.utils.other import get_pattern_key as peft_get_pattern_key

  patterns = [r"layers\.0\..*", "q_proj", "self_attn.v_proj", "proj", r".*\.1\.mlp\..*"]
  keys = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.1.self_attn.v_proj",
    "model.layers.1.mlp.up_proj",
    "model.layers.2.mlp.down_proj",
    "lm_head",
  ]
  for key in keys:
    expected = peft_get_pattern_key(patterns, key)
    got = get_pattern_key(patterns, key)
    assert (got if got is not None else key) == expected


def test_lora_scaling():
  assert lora_scaling(8, 16) == 2.0
  assert lora_scaling(64, 64, use_rslora=True) == 8.0
  assert lora_scaling(4, 8.0) == 2.0
