"""IA3 beyond the method table: the config against PEFT's ``IA3Config``, PEFT's feed-forward matching (its suffix
quirk and the llama default table) on a tiny Llama, the bias path against PEFT, the non-identity init, merge
math and bad input.

Tolerances (``JPEFT_PRINT_ERRORS=1 pytest -s`` prints each measured ratio): the same as tests/test_parity.py's for
the same quantities on the same tiny models; the numbers measured here are next to each constant.
"""

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

from backends import get_backend
from backends.tiny import make_batch, make_tiny_llama
from jpeft import core, registry
from jpeft.config import AdapterCheckpointError, ConfigTypeError, InvalidConfigError
from jpeft.methods import ia3
from jpeft.methods.base import ModuleSpec
from jpeft.models import load_model
from jpeft.targets import UnsupportedTargetError
from numerics import EPS32, assert_close_to_scale, scaled_error

VOCAB = 256
# fp32 logits, jpeft vs PEFT on the biased tiny Llama: measured 7.2e-7 = 6 eps (7.7e-7 merged); test_parity's bound,
# 32 eps. Leaving the bias unscaled gives 0.18.
LOGIT_REL = 32 * EPS32
# Loss and gradients (test_parity's bounds): measured loss 0, gradients at most 1.1e-6 (bound 1e-5).
LOSS_REL = 16 * EPS32
GRAD_REL = 1e-5
# Merged weights and biases against PEFT's (an elementwise product, rounded once in each): measured 0 (bound 1 eps).
MERGE_REL = EPS32
# jpeft's merged model vs its unmerged one (measured 5.8e-7), matmul vs the merged weight (1.0e-7); bound 1e-5, as in
# tests/test_conformance.py.
SAME_FUNCTION_REL = 1e-5
# The perturbed adapter's own effect on the logits (PEFT adapted vs bare) dwarfs LOGIT_REL: measured 0.76.
MIN_EFFECT = 2e-2

DEFAULT_TARGET_SUFFIXES = ("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def plain_folder(tmp_path_factory):
  return make_tiny_llama(str(tmp_path_factory.mktemp("plain")), initializer_range=0.1)


@pytest.fixture(scope="module")
def biased_folder(tmp_path_factory):
  return make_tiny_llama(
    str(tmp_path_factory.mktemp("biased")), initializer_range=0.1, attention_bias=True, mlp_bias=True
  )


def _jpeft_config(**kw):
  return registry.config_from_dict({"peft_type": "IA3", **kw})


# ------------------------------------------------------------------------------------------------------------
# Config validation against PEFT's IA3Config


CONFIG_CASES = {
  "ff-subset": dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
  "ff-not-subset": dict(target_modules=["k_proj", "v_proj"], feedforward_modules=["down_proj"]),
  # the subset is over the literal strings: "mlp.down_proj" is not in ["down_proj"] though it names a target
  "ff-longer-name": dict(target_modules=["down_proj"], feedforward_modules=["mlp.down_proj"]),
  "ff-empty": dict(target_modules=["q_proj"], feedforward_modules=[]),
  # no check when either side is a str or null
  "ff-str": dict(target_modules=["k_proj", "v_proj"], feedforward_modules="down_proj"),
  "targets-str": dict(target_modules="all-linear", feedforward_modules=["gate_proj"]),
  "targets-null": dict(feedforward_modules=["gate_proj"]),
  "ff-null": dict(target_modules=["q_proj"]),
  "all-null": dict(),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_config_accepts_and_refuses_as_peft(case):
  kw = CONFIG_CASES[case]
  try:
    theirs = peft.IA3Config(**kw)
  except ValueError as e:
    assert "subset" in str(e)
    with pytest.raises(InvalidConfigError, match="`feedforward_modules` should be a subset of `target_modules`"):
      _jpeft_config(**kw)
    return
  ours = _jpeft_config(**kw)
  for name in ("target_modules", "feedforward_modules", "init_ia3_weights", "fan_in_fan_out"):
    t, o = getattr(theirs, name), getattr(ours, name)
    assert (set(o) if isinstance(o, tuple) else o) == t, name


def test_subset_error_names_the_extra_modules():
  with pytest.raises(InvalidConfigError, match=r"\['down_proj'\] of feedforward_modules"):
    _jpeft_config(target_modules=["k_proj", "v_proj"], feedforward_modules=["down_proj", "k_proj"])


def test_fan_in_fan_out_is_reset_on_linear_targets(plain_folder, caplog):
  with caplog.at_level(logging.WARNING):
    ours = _jpeft_config(target_modules=["q_proj"], fan_in_fan_out=True)
  assert ours.fan_in_fan_out is False
  assert "Setting fan_in_fan_out to False" in caplog.text
  model = transformers.AutoModelForCausalLM.from_pretrained(plain_folder)
  theirs = peft.get_peft_model(model, peft.IA3Config(target_modules=["q_proj"], fan_in_fan_out=True))
  assert theirs.peft_config["default"].fan_in_fan_out is False


# ------------------------------------------------------------------------------------------------------------
# Which modules are adapted, and which of them are feed-forward, against PEFT on the tiny Llama

TARGETING_CASES = {
  # null/null: PEFT's llama table, k/v/down with down as feed-forward
  "default-table": dict(),
  # null target_modules with a feed-forward list: the table's targets, this list's feed-forward rule
  "default-targets-ff-v": dict(feedforward_modules=["v_proj"]),
  # the suffix quirk: "p_proj" (a target that matches no module) makes up_proj feed-forward, with no dot boundary
  "suffix-quirk": dict(target_modules=["up_proj", "p_proj", "k_proj"], feedforward_modules=["p_proj"]),
  # "all-linear" is a str: no subset check, and "proj" is a suffix of every linear of a layer
  "all-linear-proj": dict(target_modules="all-linear", feedforward_modules=["proj"]),
  # a str feed-forward spec is fullmatch-ed against the full name: only layer 0's down_proj
  "ff-regex": dict(target_modules=["q_proj", "down_proj"], feedforward_modules=r"model\.layers\.0\.mlp\.down_proj"),
  # null feed-forward with explicit targets: the table's down_proj
  "ff-null": dict(target_modules=["q_proj", "down_proj"]),
}


def _peft_shapes(folder, kw):
  model = transformers.AutoModelForCausalLM.from_pretrained(folder)
  peft_model = peft.get_peft_model(model, peft.IA3Config(task_type="CAUSAL_LM", **kw))
  state = peft.get_peft_model_state_dict(peft_model)
  return {k: tuple(v.shape) for k, v in state.items()}


@pytest.mark.parametrize("case", sorted(TARGETING_CASES))
def test_targets_and_feedforward_match_peft(case, plain_folder):
  kw = TARGETING_CASES[case]
  theirs = _peft_shapes(plain_folder, kw)
  model_config, params = load_model(plain_folder)
  adapter, _ = core.init(jax.random.key(0), params, _jpeft_config(**kw), model_config)
  ours = {k: tuple(v.shape) for k, v in core.to_state_dict(adapter).items()}
  # the keys say which modules are adapted, the shapes which are feed-forward ((1, in)) or not ((out, 1))
  assert ours == theirs
  if case == "default-table":
    names = {k.removeprefix("base_model.model.").removesuffix(".ia3_l") for k in ours}
    assert names == {f"model.layers.{i}.{s}" for i in range(2) for s in DEFAULT_TARGET_SUFFIXES}
    feedforward = {n for n in names if ours[f"base_model.model.{n}.ia3_l"][0] == 1}
    assert feedforward == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
  if case == "suffix-quirk":
    assert theirs["base_model.model.model.layers.0.mlp.up_proj.ia3_l"] == (1, 64)


def test_feedforward_rule():
  assert ia3.is_feedforward(_jpeft_config(), "model.layers.3.mlp.down_proj")  # the llama table
  assert not ia3.is_feedforward(_jpeft_config(), "model.layers.3.mlp.up_proj")
  cfg = _jpeft_config(target_modules=["up_proj", "p_proj"], feedforward_modules=["p_proj"])
  assert ia3.is_feedforward(cfg, "model.layers.0.mlp.up_proj")  # no dot boundary
  cfg = _jpeft_config(target_modules=["q_proj"], feedforward_modules="mlp.*")
  assert not ia3.is_feedforward(cfg, "model.layers.0.mlp.down_proj")  # fullmatch on the full name


# ------------------------------------------------------------------------------------------------------------
# Biases: the output scaling scales the bias too (k, v, up are output-scaled; down is feed-forward, bias untouched)

BIAS_CONFIG = dict(
  peft_type="IA3", target_modules=["k_proj", "v_proj", "up_proj", "down_proj"], feedforward_modules=["down_proj"]
)


def _perturbed(state, seed):
  rng = np.random.default_rng(seed)
  return {k: (v + 0.3 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in state.items()}


def test_bias_path_matches_peft(biased_folder):
  jx, pt = get_backend("jax"), get_backend("torch")
  for b in (jx, pt):
    b.load_base(biased_folder)
  pt.attach_adapter(BIAS_CONFIG, seed=0)
  state = _perturbed(pt.adapter_state_dict(), 0)
  pt.set_adapter_state_dict(state)
  jx.attach_adapter(BIAS_CONFIG, seed=0)
  jx.set_adapter_state_dict(state)
  batch = make_batch(0, 3, 16, VOCAB)
  mask = batch["attention_mask"].astype(bool)
  ids, am = batch["input_ids"], batch["attention_mask"]
  ref = pt.logits(ids, am)
  assert_close_to_scale(jx.logits(ids, am), ref, LOGIT_REL, mask=mask, what="ia3 bias: logits")
  plain = get_backend("torch")
  plain.load_base(biased_folder)
  effect = scaled_error(plain.logits(ids, am), ref, mask=mask)
  if os.environ.get("JPEFT_PRINT_ERRORS"):
    print(f"[measured] ia3 bias: adapter effect: {effect:.3g} (bound {MIN_EFFECT:.3g})")
  assert effect > MIN_EFFECT, effect

  loss_pt, g_pt = pt.loss_and_grads(ids, am, batch["labels"])
  loss_jx, g_jx = jx.loss_and_grads(ids, am, batch["labels"])
  assert_close_to_scale(np.float64(loss_jx), np.float64(loss_pt), LOSS_REL, what="ia3 bias: loss")
  assert set(g_jx) == set(g_pt)
  for k in g_pt:
    assert_close_to_scale(g_jx[k], g_pt[k], GRAD_REL, what=f"ia3 bias: gradient {k}")

  # merged: PEFT's merge_and_unload scales the rows and the bias (non-feed-forward) or the columns (feed-forward)
  jx.merge()
  pt.merge()
  assert_close_to_scale(jx.logits(ids, am), pt.logits(ids, am), LOGIT_REL, mask=mask, what="ia3 bias: merged logits")
  theirs = {k: v.detach().numpy() for k, v in pt.model.state_dict().items()}
  for i in range(2):
    for suffix in ("self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj"):
      for p in ("weight", "bias"):
        key = f"model.layers.{i}.{suffix}.{p}"
        assert_close_to_scale(np.asarray(jx.params[key]), theirs[key], MERGE_REL, what=f"ia3 merged {key}")


def test_bias_entry_is_scaled_only_for_output_scaling():
  w, b = jnp.ones((3, 2)), jnp.array([1.0, 2.0, 3.0])
  cfg = _jpeft_config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
  k_proj = ModuleSpec("model.layers.0.self_attn.k_proj", "linear", w, b)
  out = ia3.adapt_module(k_proj, {"ia3_l": jnp.array([[2.0], [3.0], [4.0]])}, cfg, {}, None)
  np.testing.assert_array_equal(out["bias"], [2.0, 6.0, 12.0])
  down_proj = ModuleSpec("model.layers.0.mlp.down_proj", "linear", w, b)
  out = ia3.adapt_module(down_proj, {"ia3_l": jnp.ones((1, 2))}, cfg, {}, None)
  assert set(out) == {"weight"}


# ------------------------------------------------------------------------------------------------------------
# Init


def test_init_false_is_not_identity(plain_folder):
  model_config, params = load_model(plain_folder)
  cfg = _jpeft_config(init_ia3_weights=False)
  assert registry.get_method("IA3").identity_at_init(cfg) is False
  assert registry.get_method("IA3").identity_at_init(_jpeft_config()) is True
  adapter, _ = core.init(jax.random.key(0), params, cfg, model_config)
  values = np.concatenate([np.asarray(t["ia3_l"]).ravel() for t in adapter.values()])
  # PEFT's torch.randn: N(0, 1). 384 draws: the sample mean has std 0.05, the sample std about 0.036.
  assert values.size == 2 * (32 + 32 + 128)
  assert abs(values.mean()) < 0.25 and 0.8 < values.std() < 1.2
  # and PEFT's draws have the same law
  model = transformers.AutoModelForCausalLM.from_pretrained(plain_folder)
  torch.manual_seed(0)
  theirs = peft.get_peft_model_state_dict(peft.get_peft_model(model, peft.IA3Config(init_ia3_weights=False)))
  t = np.concatenate([v.numpy().ravel() for v in theirs.values()])
  assert abs(t.mean()) < 0.25 and 0.8 < t.std() < 1.2
  ones, _ = core.init(jax.random.key(0), params, _jpeft_config(), model_config)
  assert all(np.all(np.asarray(t["ia3_l"]) == 1.0) for t in ones.values())


# ------------------------------------------------------------------------------------------------------------
# Merge math


@pytest.mark.parametrize("feedforward", [False, True])
def test_merge_scales_rows_or_columns(feedforward):
  kw, kl, kx = jax.random.split(jax.random.key(0), 3)
  w = jax.random.normal(kw, (5, 3))
  scale = jax.random.normal(kl, (1, 3) if feedforward else (5, 1))
  weight = ia3.IA3Weight(w, scale, feedforward=feedforward)
  merged, wn, ln = np.asarray(weight.materialize()), np.asarray(w), np.asarray(scale).ravel()
  expected = np.empty_like(wn)
  for i in range(5):
    for j in range(3):
      expected[i, j] = wn[i, j] * (ln[j] if feedforward else ln[i])
  np.testing.assert_allclose(merged, expected, rtol=1e-6)
  x = jax.random.normal(kx, (2, 4, 3))
  assert_close_to_scale(weight.matmul(x), x @ merged.T, SAME_FUNCTION_REL, what=f"ia3 matmul ff={feedforward}")


def test_merge_equals_apply_with_bias_and_unmerge_refuses(biased_folder):
  from jpeft.models import forward

  model_config, params = load_model(biased_folder)
  cfg = _jpeft_config(**BIAS_CONFIG)
  adapter, _ = core.init(jax.random.key(0), params, cfg, model_config)
  keys = jax.random.split(jax.random.key(1), len(adapter))
  adapter = {
    m: {"ia3_l": t["ia3_l"] + 0.3 * jax.random.normal(k, t["ia3_l"].shape)} for k, (m, t) in zip(keys, adapter.items())
  }
  merged = core.merge(params, adapter, cfg, model_config=model_config)
  name = "model.layers.1.self_attn.v_proj"
  np.testing.assert_allclose(merged[name + ".bias"], params[name + ".bias"] * adapter[name]["ia3_l"][:, 0], rtol=1e-6)
  down = "model.layers.1.mlp.down_proj"
  np.testing.assert_array_equal(merged[down + ".bias"], params[down + ".bias"])
  batch = make_batch(1, 2, 12, VOCAB)
  ids, am = batch["input_ids"], batch["attention_mask"]
  adapted = forward(core.apply(params, adapter, cfg, model_config=model_config), model_config, ids, am)
  assert_close_to_scale(forward(merged, model_config, ids, am), adapted, SAME_FUNCTION_REL, what="ia3 merged logits")
  with pytest.raises(NotImplementedError, match="not additive"):
    core.unmerge(merged, adapter, cfg, model_config=model_config)


# ------------------------------------------------------------------------------------------------------------
# Bad input


def test_wrong_vector_shape_is_refused_by_name(plain_folder):
  model_config, params = load_model(plain_folder)
  cfg = _jpeft_config(**CONFIG_CASES["ff-subset"])
  adapter, _ = core.init(jax.random.key(0), params, cfg, model_config)
  down = "model.layers.0.mlp.down_proj"
  adapter[down] = {"ia3_l": jnp.ones((64, 1))}  # an output-scaling vector on the feed-forward down_proj
  with pytest.raises(AdapterCheckpointError, match=r"down_proj.*\(64, 1\).*feed-forward.*needs \(1, 128\)"):
    core.apply(params, adapter, cfg, model_config=model_config)
  adapter[down] = {"ia3_l.weight": jnp.ones((1, 128))}
  with pytest.raises(AdapterCheckpointError, match=r"down_proj.*\['ia3_l\.weight'\].*expected \['ia3_l'\]"):
    core.apply(params, adapter, cfg, model_config=model_config)


@pytest.mark.parametrize("target", ["embed_tokens", "input_layernorm"])
def test_unsupported_kinds_are_refused_as_peft_does(target, plain_folder):
  model = transformers.AutoModelForCausalLM.from_pretrained(plain_folder)
  with pytest.raises(ValueError, match="is not supported"):
    peft.get_peft_model(model, peft.IA3Config(target_modules=[target], feedforward_modules=[]))
  model_config, params = load_model(plain_folder)
  with pytest.raises(UnsupportedTargetError, match=f"{target}.*which IA3 does not support"):
    core.init(jax.random.key(0), params, _jpeft_config(target_modules=[target], feedforward_modules=[]), model_config)


def test_bad_fields_are_refused_by_name():
  with pytest.raises(ConfigTypeError, match="init_ia3_weights"):
    _jpeft_config(init_ia3_weights="yes")
  with pytest.raises(ConfigTypeError, match="feedforward_modules"):
    _jpeft_config(feedforward_modules=[1])
  with pytest.raises(InvalidConfigError, match="feedforward_modules.*not a valid regular expression"):
    _jpeft_config(feedforward_modules="(down")
  # PEFT's IA3Config has no layer filter: a constructor keyword error there, a named refusal here
  with pytest.raises(TypeError):
    peft.IA3Config(layers_to_transform=[0])
  with pytest.raises(InvalidConfigError, match="no field `layers_to_transform`"):
    ia3.IA3Config(layers_to_transform=(0,))
