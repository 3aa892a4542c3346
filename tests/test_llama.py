"""The Flax-side Llama against transformers on tiny random configs; loading errors."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from backends.tiny import make_tiny_llama
from jpeft.models import CheckpointError, LlamaConfig, causal_lm_loss, forward, load_model
from jpeft.models.llama import param_shapes
from numerics import assert_close_to_scale

LLAMA3_ROPE = {
  "rope_type": "llama3",
  "factor": 8.0,
  "low_freq_factor": 1.0,
  "high_freq_factor": 4.0,
  "original_max_position_embeddings": 16,
}

CONFIGS = {
  "gqa-untied": dict(num_key_value_heads=2),
  "mha-tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
  "gqa-llama3-rope": dict(num_key_value_heads=2, rope_scaling=LLAMA3_ROPE),
  "mqa-tied-llama3-bias": dict(
    num_key_value_heads=1, tie_word_embeddings=True, rope_scaling=LLAMA3_ROPE, attention_bias=True, mlp_bias=True
  ),
}


def _batch(vocab, pad):
  rng = np.random.RandomState(0)
  ids = rng.randint(0, vocab, (3, 24))
  mask = np.ones_like(ids)
  if pad == "left":
    mask[1, :7] = 0
    mask[2, :3] = 0
  else:
    mask[1, 17:] = 0
    mask[2, 10:] = 0
  return ids, mask


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def tiny(request, tmp_path_factory):
  folder = make_tiny_llama(str(tmp_path_factory.mktemp(request.param)), initializer_range=0.1, **CONFIGS[request.param])
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
  return folder, model


@pytest.mark.parametrize("pad", ["left", "right"])
def test_logits_match_transformers(tiny, pad):
  folder, model = tiny
  config, params = load_model(folder)
  ids, mask = _batch(config.vocab_size, pad)
  positions = np.where(mask == 1, mask.cumsum(-1) - 1, 1)  # transformers' generate: padding at position 1
  with torch.no_grad():
    ref = model(
      input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions)
    ).logits.numpy()
  out = np.asarray(jax.jit(forward, static_argnums=1)(params, config, ids, mask))
  # two libraries, two orders of float32 sums: a few epsilons of the largest logit per reduction step
  assert_close_to_scale(out, ref, 1e-5, mask=mask.astype(bool), what=f"{pad}-padded logits vs transformers")
  # padded positions too (a left-padding query attends to nothing: 0, as SDPA gives it): Lily's router averages over
  # every position of the batch. Measured 1.7e-7 (left) / 5.6e-7 (right); attending uniformly instead is 1.08 away.
  assert_close_to_scale(out, ref, 1e-5, what=f"{pad}-padded logits vs transformers, padding included")
  assert np.isfinite(out).all()


def test_padding_does_not_change_real_tokens(tiny):
  folder, _ = tiny
  config, params = load_model(folder)
  ids, _ = _batch(config.vocab_size, "left")
  row = ids[:1, 5:]
  alone = forward(params, config, row, np.ones_like(row))
  padded = forward(params, config, ids[:1], np.concatenate([np.zeros((1, 5)), np.ones_like(row)], 1))
  assert_close_to_scale(np.asarray(padded)[:, 5:], np.asarray(alone), 1e-5, what="left-padded vs alone")


def test_loss_matches_transformers(tiny):
  folder, model = tiny
  config, params = load_model(folder)
  ids, mask = _batch(config.vocab_size, "right")
  labels = np.where(mask.astype(bool), ids, -100)
  labels[:, :4] = -100
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels)).loss.item()
  loss, n = causal_lm_loss(forward(params, config, ids, mask), jnp.asarray(labels))
  assert abs(float(loss) - ref) <= 1e-6 * abs(ref)  # a mean of ~40 float32 terms: a few epsilons of the loss
  assert int(n) == int((labels[:, 1:] != -100).sum())


def test_bfloat16_params_run_close_to_float32(tiny):
  folder, _ = tiny
  config, params = load_model(folder)
  _, params16 = load_model(folder, dtype=jnp.bfloat16)
  assert params16["model.norm.weight"].dtype == jnp.bfloat16
  ids, mask = _batch(config.vocab_size, "right")
  ref = np.asarray(forward(params, config, ids, mask))
  out = np.asarray(forward(params16, config, ids, mask))
  assert out.dtype == np.float32
  # bf16 keeps 8 mantissa bits (eps 2^-8 = 3.9e-3): the mean logit error measured 2.1-2.5e-3 of the largest logit
  # over the four configs. It must stay within 4 eps of that scale, and be visibly non-zero (the weights really
  # are bf16, not silently float32).
  m = mask.astype(bool)
  ratio = np.abs(out - ref)[m].mean() / np.abs(ref)[m].max()
  assert 0.1 * 2**-8 < ratio < 4 * 2**-8, ratio


def test_config_rejects_other_architectures():
  with pytest.raises(ValueError, match="model_type='gpt2'"):
    LlamaConfig.from_hf({"model_type": "gpt2", "hidden_act": "gelu"})


def test_missing_folder_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    load_model(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="not found"):
    load_model(str(tmp_path / "nope"))


def test_checkpoint_shape_mismatch_names_tensor(tmp_path):
  folder = make_tiny_llama(str(tmp_path / "m"))
  cfg = json.load(open(os.path.join(folder, "config.json")))
  cfg["intermediate_size"] = 96
  json.dump(cfg, open(os.path.join(folder, "config.json"), "w"))
  with pytest.raises(CheckpointError, match=r"model.layers.0.mlp.gate_proj.weight.*\(128, 64\).*\(96, 64\)"):
    load_model(folder)


def test_checkpoint_missing_tensor(tmp_path):
  from safetensors.numpy import load_file, save_file

  folder = make_tiny_llama(str(tmp_path / "m"))
  path = os.path.join(folder, "model.safetensors")
  state = load_file(path)
  del state["model.layers.1.self_attn.k_proj.weight"]
  save_file(state, path)
  with pytest.raises(CheckpointError, match="model.layers.1.self_attn.k_proj.weight"):
    load_model(folder)


def test_sharded_checkpoint(tmp_path):
  folder = make_tiny_llama(str(tmp_path / "m"))
  model = transformers.AutoModelForCausalLM.from_pretrained(folder)
  sharded = str(tmp_path / "sharded")
  model.save_pretrained(sharded, max_shard_size="100KB")
  assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
  c1, p1 = load_model(folder)
  c2, p2 = load_model(sharded)
  assert c1 == c2 and set(p1) == set(p2) == set(param_shapes(c1))
  for k in p1:
    np.testing.assert_array_equal(np.asarray(p1[k]), np.asarray(p2[k]))


def test_hub_id_downloads_then_loads_the_folder(tmp_path, monkeypatch):
  import huggingface_hub

  folder = make_tiny_llama(str(tmp_path / "snapshot"))
  calls = []

  def fake_snapshot_download(repo_id, **kwargs):
    calls.append((repo_id, kwargs))
    return folder

  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
  config, params = load_model("some-org/tiny-llama")
  assert calls and calls[0][0] == "some-org/tiny-llama"
  assert "*.safetensors" in calls[0][1]["allow_patterns"]
  assert set(params) == set(param_shapes(config))
