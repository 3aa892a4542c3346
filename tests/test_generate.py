"""Generation: greedy tokens equal to transformers' generate; sampling is seeded; no per-token recompiles."""

import jax
import numpy as np
import pytest
import torch
import transformers

from backends.tiny import make_tiny_llama
from jpeft.generate import NEW_TOKEN_BUCKET, _generate, generate
from jpeft.models import load_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  folder = make_tiny_llama(str(tmp_path_factory.mktemp("gen")), initializer_range=0.1)
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
  config, params = load_model(folder)
  return model, config, params


def _prompts(vocab):
  rng = np.random.RandomState(1)
  ids = rng.randint(3, vocab, (4, 10))
  mask = np.ones_like(ids)
  mask[1, :4] = 0
  mask[2, :2] = 0
  ids[mask == 0] = 0
  return ids, mask


def test_greedy_equals_transformers(tiny):
  model, config, params = tiny
  ids, mask = _prompts(config.vocab_size)
  eos = 7  # a frequent-enough token so that some rows stop early on the random model
  out = generate(params, config, ids, mask, max_new_tokens=16, eos_token_id=eos, pad_token_id=0)
  with torch.no_grad():
    ref = model.generate(
      input_ids=torch.tensor(ids),
      attention_mask=torch.tensor(mask),
      max_new_tokens=16,
      do_sample=False,
      eos_token_id=eos,
      pad_token_id=0,
    )[:, ids.shape[1] :].numpy()
  ref = np.pad(ref, ((0, 0), (0, 16 - ref.shape[1])), constant_values=0)
  np.testing.assert_array_equal(out, ref)


def test_stops_at_eos_per_row(tiny):
  _, config, params = tiny
  ids, mask = _prompts(config.vocab_size)
  free = generate(params, config, ids, mask, max_new_tokens=12, eos_token_id=-5, pad_token_id=0)
  eos = int(free[0, 3])  # row 0 produces this token at step 3 -> it must stop there
  out = generate(params, config, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
  first = int(np.argmax(out[0] == eos))
  assert first <= 3 and (out[0, first + 1 :] == 0).all()


def test_sampling_is_seeded_and_top_p_small_is_greedy(tiny):
  _, config, params = tiny
  ids, mask = _prompts(config.vocab_size)
  a = generate(params, config, ids, mask, max_new_tokens=8, temperature=1.0, rng=jax.random.key(3))
  b = generate(params, config, ids, mask, max_new_tokens=8, temperature=1.0, rng=jax.random.key(3))
  c = generate(params, config, ids, mask, max_new_tokens=8, temperature=1.0, rng=jax.random.key(4))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  nucleus = generate(
    params, config, ids, mask, max_new_tokens=8, temperature=1.0, top_p=1e-6, rng=jax.random.key(5), eos_token_id=-5
  )
  greedy = generate(params, config, ids, mask, max_new_tokens=8, eos_token_id=-5)
  np.testing.assert_array_equal(nucleus, greedy)


def test_one_compile_for_any_number_of_new_tokens_in_a_bucket(tiny):
  """max_new_tokens is traced: 5, 9, 20 and 32 new tokens share one compile; 33 (the next bucket) compiles once more."""
  _, config, params = tiny
  ids, mask = _prompts(config.vocab_size)
  longest = generate(params, config, ids, mask, max_new_tokens=NEW_TOKEN_BUCKET, eos_token_id=-5)
  before = _generate._cache_size()
  for n in (5, 9, 20):
    out = generate(params, config, ids, mask, max_new_tokens=n, eos_token_id=-5)
    assert out.shape == (ids.shape[0], n)
    np.testing.assert_array_equal(out, longest[:, :n])  # greedy: a shorter run is a prefix of the longer one
  assert _generate._cache_size() == before
  beyond = generate(params, config, ids, mask, max_new_tokens=NEW_TOKEN_BUCKET + 1, eos_token_id=-5)
  np.testing.assert_array_equal(beyond[:, :NEW_TOKEN_BUCKET], longest)
  assert _generate._cache_size() == before + 1


def test_right_padding_is_rejected(tiny):
  _, config, params = tiny
  ids, mask = _prompts(config.vocab_size)
  with pytest.raises(ValueError, match="left-padded"):
    generate(params, config, ids, mask[:, ::-1], max_new_tokens=4)
