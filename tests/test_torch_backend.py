"""The torch (transformers + PEFT) reference backend on a tiny random Llama."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import torch  # noqa: E402
import peft  # noqa: E402,F401
import transformers  # noqa: E402,F401

from backends import get_backend  # noqa: E402
from backends.tiny import make_batch, make_tiny_llama  # noqa: E402
from numerics import EPS32, assert_close_to_scale  # noqa: E402

VOCAB = 256
LORA = {
  "peft_type": "LORA",
  "r": 4,
  "lora_alpha": 8,
  "target_modules": ["q_proj", "v_proj"],
  "init_lora_weights": False,
}

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  return make_tiny_llama(str(tmp_path_factory.mktemp("tiny_llama")))


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
  return make_tiny_llama(str(tmp_path_factory.mktemp("tiny_llama_tied")), tie_word_embeddings=True, seed=1)


def _backend(folder, config=LORA, *, seed=0, dtype="float32"):
  backend = get_backend("torch")
  backend.load_base(folder, dtype=dtype)
  if config is not None:
    backend.attach_adapter(config, seed=seed)
  return backend


def _batch(seed=0, pad="right", batch=3, seq_len=12):
  return make_batch(seed, batch, seq_len, VOCAB, pad=pad)


def _base_weights(backend):
  """Every model tensor that is not part of the adapter, by live name."""
  return {name: t.detach().clone() for name, t in backend.model.state_dict().items() if "lora_" not in name}


def test_get_backend_names():
  assert get_backend("torch").name == "torch"
  with pytest.raises(ValueError, match="unknown backend"):
    get_backend("tensorflow")


def test_make_batch_layout():
  for pad in ("right", "left"):
    b = _batch(pad=pad, batch=4)
    ids, mask, labels = b["input_ids"], b["attention_mask"], b["labels"]
    assert ids.shape == mask.shape == labels.shape == (4, 12)
    assert mask[0].all() and not mask.all()
    assert (labels[mask == 0] == -100).all() and (ids[mask == 0] == 0).all()
    assert (ids[mask == 1] != 0).all()
    assert ((labels != -100).sum(axis=1) >= 1).all()
    assert ((labels == ids) | (labels == -100)).all()
    if pad == "left":
      assert mask[:, -1].all()
    else:
      assert mask[:, 0].all()


def test_logits_shape_and_padding_independence(tiny_dir):
  backend = _backend(tiny_dir)
  assert len(backend.adapter_state_dict()) == 8
  for pad in ("right", "left"):
    b = _batch(pad=pad)
    logits = backend.logits(b["input_ids"], b["attention_mask"])
    assert logits.shape == (3, 12, VOCAB) and logits.dtype == np.float32
    assert logits.std() > 0.5
    for row in range(3):
      keep = b["attention_mask"][row] == 1
      alone = backend.logits(b["input_ids"][row : row + 1, keep], np.ones((1, int(keep.sum())), np.int32))
      # the same sums over a different padded length: float32 rounding of the logits' scale
      assert_close_to_scale(logits[row, keep], alone[0], 1e-5, what=f"{pad}-padded row {row} vs alone")


def test_adapter_changes_logits_and_keys_are_peft_format(tiny_dir):
  plain = _backend(tiny_dir, config=None)
  lora = _backend(tiny_dir)
  b = _batch()
  diff = np.abs(plain.logits(b["input_ids"], b["attention_mask"]) - lora.logits(b["input_ids"], b["attention_mask"]))
  assert diff.max() > 1e-3
  keys = set(lora.adapter_state_dict())
  assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
  assert all(".default." not in k for k in keys)
  assert lora.num_trainable_params() == 2 * (4 * 64 + 64 * 4 + 4 * 64 + 32 * 4) and plain.num_trainable_params() == 0


def test_save_load_round_trip(tiny_dir, tmp_path):
  backend = _backend(tiny_dir, seed=3)
  b = _batch()
  before = backend.logits(b["input_ids"], b["attention_mask"])
  state = backend.adapter_state_dict()
  backend.save_adapter(str(tmp_path / "adapter"))
  assert os.path.isfile(tmp_path / "adapter" / "adapter_model.safetensors")
  with open(tmp_path / "adapter" / "adapter_config.json") as f:
    assert json.load(f)["peft_type"] == "LORA"

  other = _backend(tiny_dir, config=None)
  other.load_adapter(str(tmp_path / "adapter"))
  assert set(other.adapter_state_dict()) == set(state)
  for key, value in other.adapter_state_dict().items():
    np.testing.assert_array_equal(value, state[key])
  np.testing.assert_array_equal(other.logits(b["input_ids"], b["attention_mask"]), before)
  assert other.num_trainable_params() == backend.num_trainable_params()

  frozen = _backend(tiny_dir, seed=9)
  frozen.load_adapter(str(tmp_path / "adapter"), is_trainable=False)
  np.testing.assert_array_equal(frozen.logits(b["input_ids"], b["attention_mask"]), before)
  assert frozen.num_trainable_params() == 0


def test_load_adapter_rejects_extra_and_missing_keys(tiny_dir, tmp_path):
  from safetensors.numpy import load_file, save_file

  backend = _backend(tiny_dir)
  folder = tmp_path / "adapter"
  backend.save_adapter(str(folder))
  weights = load_file(str(folder / "adapter_model.safetensors"))
  extra_key = "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"
  save_file({**weights, extra_key: np.zeros((4, 64), np.float32)}, str(folder / "adapter_model.safetensors"))
  with pytest.raises(ValueError, match="k_proj.lora_A"):
    _backend(tiny_dir, config=None).load_adapter(str(folder))

  dropped = sorted(weights)[0]
  save_file({k: v for k, v in weights.items() if k != dropped}, str(folder / "adapter_model.safetensors"))
  with pytest.raises(ValueError, match=dropped.replace(".", r"\.")):
    _backend(tiny_dir, config=None).load_adapter(str(folder))


def test_set_adapter_state_dict_is_strict(tiny_dir):
  source = _backend(tiny_dir, seed=1)
  target = _backend(tiny_dir, seed=2)
  state = source.adapter_state_dict()
  target.set_adapter_state_dict(state)
  b = _batch()
  np.testing.assert_array_equal(
    target.logits(b["input_ids"], b["attention_mask"]), source.logits(b["input_ids"], b["attention_mask"])
  )

  missing_key = sorted(state)[-1]
  with pytest.raises(ValueError, match=missing_key.replace(".", r"\.")):
    target.set_adapter_state_dict({k: v for k, v in state.items() if k != missing_key})
  bogus = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
  with pytest.raises(ValueError, match=bogus.replace(".", r"\.")):
    target.set_adapter_state_dict({**state, bogus: np.zeros((4, 64), np.float32)})
  wrong_shape = dict(state)
  wrong_shape[missing_key] = np.zeros((3, 3), np.float32)
  with pytest.raises(ValueError, match="wrong shape"):
    target.set_adapter_state_dict(wrong_shape)


def test_loss_and_grads_match_finite_differences(tiny_dir):
  backend = _backend(tiny_dir)
  b = _batch()
  loss, grads = backend.loss_and_grads(b["input_ids"], b["attention_mask"], b["labels"])
  state = backend.adapter_state_dict()
  assert set(grads) == set(state)
  assert all(grads[k].shape == state[k].shape for k in state)
  assert np.isfinite(loss) and loss > 0

  logits = backend.logits(b["input_ids"], b["attention_mask"]).astype(np.float64)
  shifted, targets = logits[:, :-1], b["labels"][:, 1:]
  valid = targets != -100
  logz = np.log(np.exp(shifted - shifted.max(-1, keepdims=True)).sum(-1)) + shifted.max(-1)
  picked = np.take_along_axis(shifted, np.where(valid, targets, 0)[..., None], -1)[..., 0]
  np.testing.assert_allclose(loss, ((logz - picked) * valid).sum() / valid.sum(), rtol=1e-5)

  for key in (
    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
    "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight",
  ):
    index = np.unravel_index(np.argmax(np.abs(grads[key])), grads[key].shape)
    h = 5e-3
    values = []
    for sign in (1, -1):
      perturbed = {k: v.copy() for k, v in state.items()}
      perturbed[key][index] += sign * h
      backend.set_adapter_state_dict(perturbed)
      values.append(backend.loss_and_grads(b["input_ids"], b["attention_mask"], b["labels"])[0])
    numeric = (values[0] - values[1]) / (2 * h)
    # central differences: O(h²) truncation (bounded by 5e-3 relative; measured 2-3e-4 in all) plus the float32
    # rounding of two losses divided by 2h; the gradient must dwarf that rounding for the check to mean anything
    rounding = 2 * EPS32 * abs(loss) / (2 * h)
    assert abs(grads[key][index]) > 100 * rounding, (grads[key][index], rounding)
    assert abs(numeric - grads[key][index]) <= 5e-3 * abs(grads[key][index]) + rounding
  backend.set_adapter_state_dict(state)


def test_train_step_adamw_changes_only_adapter(tiny_dir):
  backend = _backend(tiny_dir)
  b = _batch()
  base_before = _base_weights(backend)
  adapter_before = backend.adapter_state_dict()
  backend.configure_optimizer(lr=1e-2, weight_decay=0.01, grad_norm_clip=1.0)
  losses = [backend.train_step(b["input_ids"], b["attention_mask"], b["labels"]) for _ in range(10)]
  assert losses[-1] < losses[0] - 0.5
  for name, tensor in _base_weights(backend).items():
    assert torch.equal(tensor, base_before[name]), name
  after = backend.adapter_state_dict()
  assert all(not np.array_equal(after[k], adapter_before[k]) for k in after)
  loss_now, _ = backend.loss_and_grads(b["input_ids"], b["attention_mask"], b["labels"])
  assert loss_now < losses[-1] + 1e-3


def test_train_step_without_optimizer_raises(tiny_dir):
  backend = _backend(tiny_dir)
  b = _batch()
  with pytest.raises(RuntimeError, match="configure_optimizer"):
    backend.train_step(b["input_ids"], b["attention_mask"], b["labels"])


def test_lora_fa_keeps_lora_a(tiny_dir):
  backend = _backend(tiny_dir)
  b = _batch()
  before = backend.adapter_state_dict()
  backend.configure_optimizer(lr=1e-2, optimizer_type="lora-fa")
  losses = [backend.train_step(b["input_ids"], b["attention_mask"], b["labels"]) for _ in range(3)]
  assert losses[-1] < losses[0]
  after = backend.adapter_state_dict()
  for key in after:
    if "lora_A" in key:
      np.testing.assert_array_equal(after[key], before[key])
    else:
      assert not np.array_equal(after[key], before[key])
  _, grads = backend.loss_and_grads(b["input_ids"], b["attention_mask"], b["labels"])
  assert set(grads) == set(after) and all(np.abs(g).max() > 0 for g in grads.values())


def test_loraplus_and_schedules(tiny_dir):
  backend = _backend(tiny_dir)
  backend.configure_optimizer(lr=1e-3, optimizer_type="lora+", loraplus_lr_ratio=16.0)
  np.testing.assert_allclose(sorted(set(backend.current_lr())), [1e-6, 1e-3, 1.6e-2])
  b = _batch()
  backend.train_step(b["input_ids"], b["attention_mask"], b["labels"])

  backend.configure_optimizer(lr=1e-3, warmup_steps=2, total_steps=6, lr_scheduler="cosine")
  seen = []
  for _ in range(6):
    seen.append(backend.current_lr()[0])
    backend.train_step(b["input_ids"], b["attention_mask"], b["labels"])
  expected = [0.0, 5e-4, 1e-3] + [1e-3 * 0.5 * (1 + np.cos(np.pi * k / 4)) for k in (1, 2, 3)]
  np.testing.assert_allclose(seen, expected, atol=1e-12)
  with pytest.raises(ValueError, match="total_steps"):
    backend.configure_optimizer(lr=1e-3, lr_scheduler="linear")
  with pytest.raises(ValueError, match="loraplus_lr_ratio"):
    backend.configure_optimizer(lr=1e-3, optimizer_type="lora+")


def test_full_finetuning(tied_dir, tmp_path):
  backend = _backend(tied_dir, config={"peft_type": "FULL"})
  state = backend.adapter_state_dict()
  assert "model.embed_tokens.weight" in state and "lm_head.weight" not in state
  assert backend.num_trainable_params() == sum(v.size for v in state.values())
  b = _batch()
  _, grads = backend.loss_and_grads(b["input_ids"], b["attention_mask"], b["labels"])
  assert set(grads) == set(state)
  backend.configure_optimizer(lr=1e-3)
  losses = [backend.train_step(b["input_ids"], b["attention_mask"], b["labels"]) for _ in range(3)]
  assert losses[-1] < losses[0]
  after = backend.adapter_state_dict()
  assert not np.array_equal(
    after["model.layers.0.self_attn.q_proj.weight"], state["model.layers.0.self_attn.q_proj.weight"]
  )

  backend.save_adapter(str(tmp_path / "full"))
  other = _backend(tied_dir, config=None)
  other.load_adapter(str(tmp_path / "full"))
  np.testing.assert_array_equal(
    other.logits(b["input_ids"], b["attention_mask"]), backend.logits(b["input_ids"], b["attention_mask"])
  )
  with pytest.raises(ValueError, match="lm_head"):
    other.set_adapter_state_dict({**after, "lm_head.weight": after["model.embed_tokens.weight"]})


@pytest.mark.parametrize(
  "config, no_grad_keys",
  [
    (
      {"peft_type": "LORA", "r": 4, "target_modules": ["embed_tokens", "q_proj"], "init_lora_weights": False},
      {"base_model.model.model.embed_tokens.base_layer.weight"},
    ),
    ({"peft_type": "VERA", "r": 4, "target_modules": ["q_proj", "o_proj"]}, {"base_model.vera_A", "base_model.vera_B"}),
    ({"peft_type": "IA3", "target_modules": ["v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}, set()),
    ({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3}, set()),
  ],
  ids=["lora-embedding", "vera", "ia3", "prompt-tuning"],
)
def test_other_methods_round_trip(tiny_dir, tmp_path, config, no_grad_keys):
  backend = _backend(tiny_dir, config=config)
  b = _batch()
  state = backend.adapter_state_dict()
  _, grads = backend.loss_and_grads(b["input_ids"], b["attention_mask"], b["labels"])
  assert set(grads) == set(state) - no_grad_keys
  logits = backend.logits(b["input_ids"], b["attention_mask"])
  assert logits.shape == (3, 12, VOCAB)
  backend.save_adapter(str(tmp_path / "adapter"))
  other = _backend(tiny_dir, config=None)
  other.load_adapter(str(tmp_path / "adapter"))
  np.testing.assert_array_equal(other.logits(b["input_ids"], b["attention_mask"]), logits)
  assert other.num_trainable_params() == backend.num_trainable_params() > 0
  other.configure_optimizer(lr=1e-2)
  first = other.train_step(b["input_ids"], b["attention_mask"], b["labels"])
  assert other.train_step(b["input_ids"], b["attention_mask"], b["labels"]) < first


def test_generate_is_greedy_decoding_and_matches_jpeft(tiny_dir):
  """backend.generate (transformers' cached generate under PEFT) against a cache-free greedy loop over
  backend.logits, and against jpeft's generate with the same (non-identity) adapter."""
  backend = _backend(tiny_dir)
  b = _batch(pad="left", seq_len=8)
  ids, mask = b["input_ids"], b["attention_mask"]
  out = backend.generate(ids, mask, max_new_tokens=5)
  assert out.shape == (3, 13)
  np.testing.assert_array_equal(out[:, :8], ids)

  cur_ids, cur_mask = ids, mask
  for _ in range(5):  # no KV cache: the full forward of the whole sequence at every step
    nxt = backend.logits(cur_ids, cur_mask)[:, -1].argmax(-1)
    cur_ids = np.concatenate([cur_ids, nxt[:, None]], axis=1)
    cur_mask = np.concatenate([cur_mask, np.ones_like(nxt)[:, None]], axis=1)
  np.testing.assert_array_equal(out, cur_ids)

  jx = get_backend("jax")
  jx.load_base(tiny_dir)
  jx.attach_adapter(LORA)
  jx.set_adapter_state_dict(backend.adapter_state_dict())
  np.testing.assert_array_equal(jx.generate(ids, mask, max_new_tokens=5), out)

  eos = int(out[0, 8])
  stopped = backend.generate(ids, mask, max_new_tokens=5, eos_token_id=eos)
  assert stopped.shape == (3, 13)
  assert (stopped[0, 8:] == eos).all()
  for row in range(1, 3):
    hits = np.flatnonzero(out[row, 8:] == eos)
    end = 8 + (hits[0] + 1 if hits.size else 5)
    np.testing.assert_array_equal(stopped[row, :end], out[row, :end])
    assert (stopped[row, end:] == eos).all()


def test_merge_keeps_outputs(tiny_dir):
  backend = _backend(tiny_dir)
  b = _batch()
  before = backend.logits(b["input_ids"], b["attention_mask"])
  backend.merge()
  # W + s·BA in one matrix rounds differently from the factored branch: float32 rounding of the logits' scale
  assert_close_to_scale(backend.logits(b["input_ids"], b["attention_mask"]), before, 1e-5, what="merged vs unmerged")
  assert backend.num_trainable_params() == 0
  assert "lora" not in type(backend.model).__name__.lower()
  with pytest.raises(RuntimeError, match="merged"):
    backend.adapter_state_dict()
  assert backend.peak_memory_bytes() > 0


def test_rope_scaling_variant(tmp_path):
  folder = make_tiny_llama(
    str(tmp_path / "llama3rope"),
    rope_scaling={
      "rope_type": "llama3",
      "factor": 8.0,
      "low_freq_factor": 1.0,
      "high_freq_factor": 4.0,
      "original_max_position_embeddings": 16,
    },
    max_position_embeddings=64,
    attention_bias=True,
    mlp_bias=True,
    num_hidden_layers=1,
  )
  with open(os.path.join(folder, "config.json")) as f:
    config = json.load(f)
  assert config["rope_parameters"]["rope_type"] == "llama3" and config["attention_bias"]
  backend = _backend(folder, config=None)
  assert backend.model.config.rope_parameters["factor"] == 8.0
  b = make_batch(0, 2, 40, VOCAB)
  assert np.isfinite(backend.logits(b["input_ids"], b["attention_mask"])).all()


def test_embedded_model_registry():
  from jpeft.models.loading import embedded_model_path

  path = embedded_model_path("smollm2-135m")
  assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.isfile(path)
  with pytest.raises(KeyError):
    embedded_model_path("no-such-model")
