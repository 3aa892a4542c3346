"""The model families other than Llama (Qwen2, Qwen3, Mistral, Gemma 2, Gemma 3 text) against transformers and PEFT
on tiny random configs (``backends.tiny.make_tiny_model``): logits, greedy generation, module names, default
targets, a saved merged folder, LoRA parity both ways; and every method row of ``method_table`` on a tiny Qwen3.

The tiny configs (``backends.tiny.TINY_FAMILIES``) switch each family's differences on where a random model can show
them: sliding windows of 6 on 16-24-token rows (Mistral, both Gemmas), Gemma 2's soft-caps at 2 (scores) and 4
(logits), ``query_pre_attn_scalar`` 24 with ``head_dim`` 16, Qwen2's q/k/v biases drawn at 0.1, Gemma 3's local
RoPE base 10^4 against 10^6. ``test_each_difference_matters`` checks that turning one off moves the logits far
beyond the parity bound, so the parity checks do test it.
"""

import dataclasses
import json
import os

import jax
import numpy as np
import peft
import pytest
import torch
import transformers

from backends import get_backend
from backends.tiny import TINY_FAMILIES, make_batch, make_tiny_model
from jpeft import checkpoint, core, registry
from jpeft.generate import generate
from jpeft.models import CheckpointError, LlamaConfig, forward, load_model, module_kinds
from jpeft.models.llama import SUPPORTED_MODEL_TYPES, param_shapes
from method_table import METHODS, VOCAB
from numerics import EPS32, assert_close_to_scale, scaled_error
from test_parity import GRAD_REL, LOGIT_REL, LOSS_REL, MIN_EFFECT, _logit_rel, _perturbed, _same_adapter_on_both

FAMILIES = ("qwen2", "qwen3", "mistral", "gemma2", "gemma3_text")

# fp32 logits of two libraries that sum the same products in other orders: a few float32 epsilons of the largest
# logit per reduction. Measured on the real tokens, left-padded / right-padded: qwen2 7.0e-7 / 5.8e-7, qwen3 7.3e-7 /
# 7.7e-7, mistral 1.01e-6 / 9.95e-7, gemma2 6.2e-7 / 6.3e-7, gemma3_text 7.5e-7 / 5.0e-7; bound 1e-5 as for Llama
# (tests/test_llama.py).
LOGIT_BOUND = 1e-5
# Switching off one family difference (ABLATIONS) moves the logits by 0.100 (gemma2's query_pre_attn_scalar) to 1.23
# (mistral's sliding window) of their scale: ~10^5 parity bounds. Bound 0.05.
ABLATION_MIN = 5e-2


def _tiny_kwargs(family):
  # Qwen2 gets its q/k/v biases from its own class; Gemma ties its head as its checkpoints do.
  return dict(initializer_range=0.1, tie_word_embeddings=family.startswith("gemma"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  return {f: make_tiny_model(str(tmp_path_factory.mktemp(f)), f, **_tiny_kwargs(f)) for f in FAMILIES}


@pytest.fixture(scope="module")
def models(folders):
  out = {}
  for family, folder in folders.items():
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    config, params = load_model(folder)
    out[family] = (torch_model, config, params)
  return out


def _left_padded(vocab, rows=3, length=20, seed=0):
  rng = np.random.RandomState(seed)
  ids = rng.randint(3, vocab, (rows, length))
  mask = np.ones_like(ids)
  mask[1, :7] = 0
  if rows > 2:
    mask[2, :3] = 0
  ids[mask == 0] = 0
  return ids, mask


def _torch_logits(model, ids, mask):
  positions = np.where(mask == 1, mask.cumsum(-1) - 1, 1)  # transformers' generate: padding at position 1
  with torch.no_grad():
    return model(
      input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions)
    ).logits.numpy()


_jit_forward = jax.jit(forward, static_argnums=1)


def test_every_family_is_supported():
  assert set(FAMILIES) | {"llama"} == set(SUPPORTED_MODEL_TYPES) == set(TINY_FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_config_reads_the_family(family, models):
  _, config, _ = models[family]
  assert config.model_type == family
  expect = {
    "qwen2": dict(qkv_bias=True, attention_bias=False, sliding_window=None),
    "qwen3": dict(qk_norm=True, qkv_bias=False, sliding_window=None),
    "mistral": dict(sliding_window=6, layer_types=("sliding_attention",) * 2),
    "gemma2": dict(
      norm_offset=True,
      scale_embeddings=True,
      sandwich_norms=True,
      hidden_act="gelu_pytorch_tanh",
      query_pre_attn_scalar=24,
      attn_logit_softcapping=2.0,
      final_logit_softcapping=4.0,
      sliding_window=6,
      layer_types=("sliding_attention", "full_attention"),
      qk_norm=False,
    ),
    "gemma3_text": dict(
      norm_offset=True,
      qk_norm=True,
      rope_theta=1e6,
      rope_local_theta=1e4,
      attn_logit_softcapping=None,
      final_logit_softcapping=None,
      layer_types=("sliding_attention", "full_attention"),
    ),
  }[family]
  assert {k: getattr(config, k) for k in expect} == expect


@pytest.mark.parametrize("family", FAMILIES)
def test_config_json_dict_reads_as_the_config_object(family, folders, models):
  """A raw ``config.json`` dict goes through transformers' config class: the same config as the loaded folder's."""
  _, config, _ = models[family]
  assert LlamaConfig.from_hf(json.load(open(os.path.join(folders[family], "config.json")))) == config


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(family, models):
  torch_model, config, params = models[family]
  ids, mask = _left_padded(config.vocab_size)
  ref = _torch_logits(torch_model, ids, mask)
  out = np.asarray(_jit_forward(params, config, ids, mask))
  assert np.isfinite(out).all()
  assert_close_to_scale(out, ref, LOGIT_BOUND, mask=mask.astype(bool), what=f"{family}: left-padded logits")
  right_mask = mask[:, ::-1].copy()
  right_ids = np.where(right_mask == 1, ids[:, ::-1], 0)
  assert_close_to_scale(
    np.asarray(_jit_forward(params, config, right_ids, right_mask)),
    _torch_logits(torch_model, right_ids, right_mask),
    LOGIT_BOUND,
    mask=right_mask.astype(bool),
    what=f"{family}: right-padded logits",
  )


# One family difference switched off at a time (config fields, or the biases dropped from the params).
ABLATIONS = {
  "qwen2": {"no q/k/v biases": "drop-biases"},
  "qwen3": {"no q/k norms": dict(qk_norm=False)},
  "mistral": {"no sliding window": dict(sliding_window=None)},
  "gemma2": {
    "no sliding window": dict(sliding_window=None),
    "no attention soft-cap": dict(attn_logit_softcapping=None),
    "no final soft-cap": dict(final_logit_softcapping=None),
    "head_dim scale": dict(query_pre_attn_scalar=None),
    "no embedding scale": dict(scale_embeddings=False),
    "plain norms": dict(norm_offset=False),
    "silu": dict(hidden_act="silu"),
  },
  "gemma3_text": {
    "no sliding window": dict(sliding_window=None),
    "global rope everywhere": dict(rope_local_theta=None),
    "no q/k norms": dict(qk_norm=False),
    "head_dim scale": dict(query_pre_attn_scalar=None),
  },
}


@pytest.mark.parametrize(
  "family,ablation", [(f, a) for f in FAMILIES for a in ABLATIONS[f]], ids=lambda x: x.replace(" ", "-")
)
def test_each_difference_matters(family, ablation, models):
  """Each family difference changes the logits by far more than the parity bound: the parity checks test it."""
  torch_model, config, params = models[family]
  change = ABLATIONS[family][ablation]
  if change == "drop-biases":
    params = {k: v for k, v in params.items() if not k.endswith(".bias")}
  else:
    config = dataclasses.replace(config, **change)
  ids, mask = _left_padded(config.vocab_size)
  off = scaled_error(
    np.asarray(forward(params, config, ids, mask)), _torch_logits(torch_model, ids, mask), mask=mask > 0
  )
  assert off >= ABLATION_MIN, f"{family} with {ablation}: only {off:.3g} from transformers"


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_qwen_sliding_window_layers(family, tmp_path):
  """Qwen with ``use_sliding_window``: layers from ``max_window_layers`` on slide. Measured 7.4e-7 (qwen2) / 6.3e-7
  (qwen3) of the largest logit (bound LOGIT_BOUND); all layers full instead: 0.56 / 0.44."""
  folder = make_tiny_model(
    str(tmp_path), family, initializer_range=0.1, use_sliding_window=True, sliding_window=6, max_window_layers=1
  )
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
  config, params = load_model(folder)
  assert config.sliding_window == 6 and config.layer_types == ("full_attention", "sliding_attention")
  ids, mask = _left_padded(config.vocab_size)
  ref = _torch_logits(torch_model, ids, mask)
  out = np.asarray(_jit_forward(params, config, ids, mask))
  assert_close_to_scale(out, ref, LOGIT_BOUND, mask=mask.astype(bool), what=f"{family} sliding: logits")
  full = np.asarray(forward(params, dataclasses.replace(config, sliding_window=None), ids, mask))
  assert scaled_error(full, ref, mask=mask > 0) >= ABLATION_MIN


@pytest.mark.parametrize("family", FAMILIES)
def test_module_kinds_follow_named_modules(family, models):
  torch_model, config, _ = models[family]
  kinds = module_kinds(config)
  expected = {}
  for name, module in torch_model.named_modules():
    if isinstance(module, torch.nn.Embedding):
      expected[name] = "embedding"
    elif isinstance(module, torch.nn.Linear):
      expected[name] = "linear"
    elif type(module).__name__.endswith("RMSNorm"):
      expected[name] = "norm"
  assert list(kinds.items()) == list(expected.items())
  state = {k for k in torch_model.state_dict() if not (config.tie_word_embeddings and k == "lm_head.weight")}
  assert set(param_shapes(config)) == state


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_equals_transformers(family, models):
  torch_model, config, params = models[family]
  ids, mask = _left_padded(config.vocab_size, rows=3, length=10, seed=1)
  mask[2, :5] = 0  # three prompt lengths: 10, 3, 5
  ids[mask == 0] = 0
  new = 14  # 10 + 14 tokens: past the sliding window of 6 in prefill and in decoding
  out = generate(params, config, ids, mask, max_new_tokens=new, eos_token_id=-5, pad_token_id=0)
  with torch.no_grad():
    ref = torch_model.generate(
      input_ids=torch.tensor(ids),
      attention_mask=torch.tensor(mask),
      max_new_tokens=new,
      min_new_tokens=new,
      do_sample=False,
      pad_token_id=0,
    )[:, ids.shape[1] :].numpy()
  assert ref.shape == (3, new)
  np.testing.assert_array_equal(out, ref)
  assert len(np.unique(out)) > 3  # the random model does not just repeat one token


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("peft_type", ["LORA", "IA3"])
def test_default_targets_are_peft(family, peft_type, models):
  """``target_modules: null`` resolves to PEFT's table for the family, and to the modules PEFT adapts."""
  torch_model, config, _ = models[family]
  table = {
    "LORA": peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    "IA3": peft.utils.constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
  }[peft_type]
  peft_config = registry.config_from_dict({"peft_type": peft_type, "target_modules": None})
  resolution = core.resolve(peft_config, config)
  assert set(resolution.target_modules) == set(table[family])
  fields = {"peft_type": peft_type, "task_type": "CAUSAL_LM"}
  torch_peft = peft.get_peft_model(
    transformers.AutoModelForCausalLM.from_config(torch_model.config), peft.PeftConfig.from_peft_type(**fields)
  )
  assert sorted(resolution.targets) == sorted(torch_peft.targeted_module_names)


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_merged_model_reloads_in_transformers(family, models, tmp_path):
  torch_model, config, params = models[family]
  folder = checkpoint.save_merged_model(str(tmp_path / "merged"), params, config)
  saved = json.load(open(os.path.join(folder, "config.json")))
  assert saved["model_type"] == family and saved["architectures"] == [type(torch_model).__name__]
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
  assert type(reloaded) is type(torch_model)
  ids, mask = _left_padded(config.vocab_size)
  # the same weights through the same transformers code: equal to the last bit
  np.testing.assert_array_equal(_torch_logits(reloaded, ids, mask), _torch_logits(torch_model, ids, mask))
  assert load_model(folder)[0] == config


def test_unknown_architecture_is_refused(tmp_path):
  folder = tmp_path / "gpt2"
  folder.mkdir()
  (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
  with pytest.raises(CheckpointError, match=r"model_type='gpt2'.*supports \['gemma2', 'gemma3_text', 'llama'"):
    load_model(str(folder))


# ----------------------------------------------------------------------------------------------------------------
# PEFT parity through the backends (tests/test_parity.py's helpers and bounds).


@pytest.fixture(scope="module")
def backends(folders):
  out = {}
  for family, folder in folders.items():
    out[family] = {}
    for name in ("jax", "torch", "plain"):
      b = get_backend("torch" if name == "plain" else name)
      b.load_base(folder)
      out[family][name] = b
  return out


def _assert_adapter_matters(adapted, plain, mask, what):
  effect = scaled_error(plain, adapted, mask=mask)
  assert effect >= MIN_EFFECT, f"{what}: the adapter changes the logits by only {effect:.3g} of their scale"


def _both_directions(bk, method, tmp_path, batch, what, rel):
  jx, pt, plain = bk["jax"], bk["torch"], bk["plain"]
  mask = batch["attention_mask"].astype(bool)
  args = (batch["input_ids"], batch["attention_mask"])
  # jpeft -> save -> PEFT
  jx.attach_adapter(METHODS[method], seed=1)
  jx.set_adapter_state_dict(_perturbed(jx.adapter_state_dict(), 0, method))
  jx.save_adapter(str(tmp_path / "jpeft"))
  pt.load_adapter(str(tmp_path / "jpeft"))
  assert set(pt.adapter_state_dict()) == set(jx.adapter_state_dict())
  ref = pt.logits(*args)
  assert_close_to_scale(jx.logits(*args), ref, rel, mask=mask, what=f"{what}: jpeft adapter in PEFT")
  base = plain.logits(*args)
  _assert_adapter_matters(ref, base, mask, what)
  # PEFT -> save -> jpeft
  pt.attach_adapter(METHODS[method], seed=2)
  pt.set_adapter_state_dict(_perturbed(pt.adapter_state_dict(), 1, method))
  pt.save_adapter(str(tmp_path / "peft"))
  jx.load_adapter(str(tmp_path / "peft"))
  state_pt, state_jx = pt.adapter_state_dict(), jx.adapter_state_dict()
  assert set(state_pt) == set(state_jx)
  for k in state_pt:
    np.testing.assert_array_equal(state_pt[k], state_jx[k])
  ref = pt.logits(*args)
  assert_close_to_scale(jx.logits(*args), ref, rel, mask=mask, what=f"{what}: PEFT adapter in jpeft")
  _assert_adapter_matters(ref, base, mask, what)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_parity_with_peft(family, backends, tmp_path):
  # all-linear LoRA (Qwen2's biased q/k/v included), every tensor perturbed (B != 0). Bound LOGIT_REL (32 eps = 3.8e-6,
  # tests/test_parity.py); measured both ways at most 8.4e-7 (qwen3), 5.2e-7 at least (gemma3_text).
  batch = make_batch(0, 3, 20, VOCAB, pad="left")
  _both_directions(backends[family], "lora-all-linear", tmp_path, batch, f"lora-all-linear/{family}", LOGIT_REL)


# HRA with Gram-Schmidt, PEFT's adapter in jpeft: 3.96e-6 = 33 eps on Qwen3 (1.7e-6 on the tiny Llama with the same
# tensors). Against a float64 PEFT run of the same adapter jpeft is 1.40e-6 off and PEFT's own float32 run 2.78e-6:
# the excess is PEFT's float32 Gram-Schmidt rounding carried through the q/k norms. Bound 64 eps = 7.6e-6.
ROW_REL = {"hra-gs": 64 * EPS32}


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_gradients_match_peft(family, backends):
  # Bounds of tests/test_parity.py (LOSS_REL 16 eps = 1.9e-6, GRAD_REL 1e-5 of each tensor's largest gradient).
  # Measured: loss at most 1.6e-7 (gemma2); worst gradient 2.2e-6 (qwen3, mistral), 1.4e-6 at least (gemma3_text).
  jx, pt = _same_adapter_on_both(backends[family], "lora-all-linear", seed=3, perturb_seed=2)
  b = make_batch(5, 3, 20, VOCAB)
  loss_pt, g_pt = pt.loss_and_grads(b["input_ids"], b["attention_mask"], b["labels"])
  loss_jx, g_jx = jx.loss_and_grads(b["input_ids"], b["attention_mask"], b["labels"])
  assert_close_to_scale(np.float64(loss_jx), np.float64(loss_pt), LOSS_REL, what=f"{family}: loss")
  assert set(g_pt) == set(g_jx) and g_pt
  for k in g_pt:
    assert np.abs(g_pt[k]).max() > 0, k
    assert_close_to_scale(g_jx[k], g_pt[k], GRAD_REL, what=f"{family}: gradient {k}")


# Every method row once on a tiny Qwen3 (q/k norms between the adapted q/k projections and RoPE), both directions.
# Bounds as in tests/test_parity.py. Measured both ways: at most 1.11e-6 (bound 3.8e-6) except hra-gs (above) and the
# residual rows (PiSSA 8.7e-6, OLoRA 8.7e-7; bound 3.05e-5).
@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_table_on_qwen3(method, backends, tmp_path):
  batch = make_batch(0, 3, 16, VOCAB, pad="left")
  rel = ROW_REL.get(method, _logit_rel(method))
  _both_directions(backends["qwen3"], method, tmp_path, batch, f"{method}/qwen3", rel)
