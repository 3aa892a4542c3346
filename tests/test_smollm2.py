"""The embedded SmolLM2-135M-Instruct (GGUF, dequantised to fp32): logits and greedy generation vs transformers."""

import jax
import numpy as np
import pytest
import torch

from jpeft.generate import generate
from numerics import scaled_error
from jpeft.models import forward, from_transformers, load_model, load_tokenizer, load_torch_model

PROMPTS = [
  "Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
  "How many clips did Natalia sell altogether in April and May? Weng earns $12 an hour for babysitting. "
  "Yesterday, she just did 50 minutes of babysitting. How much did she earn? Think step by step.\nAnswer:",
  "The history of the Roman Empire spans many centuries, from the founding of the city on the banks of the "
  "Tiber to the fall of Constantinople in 1453. Historians divide it into periods: the kingdom, the republic, "
  "the principate and the dominate. In this essay we discuss how trade, roads and law held it together,",
  'def fibonacci(n):\n    """Return the n-th Fibonacci number, computed iteratively so that large values '
  'of n do not overflow the recursion limit of the Python interpreter."""\n    if n < 0:\n        raise '
  "ValueError('n must be non-negative')\n    a, b = 0, 1\n",
  "Paris is the capital of France. Berlin is the capital of Germany. Madrid is the capital of Spain. Rome is "
  "the capital of Italy. Athens is the capital of Greece. Dublin is the capital of Ireland. Lisbon is the capital of Portugal. Vienna is the capital of Austria. Warsaw is the "
  "capital of Poland. Prague is the capital of",
]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
  model = load_torch_model("smollm2-135m").eval()
  tokenizer = load_tokenizer("smollm2-135m")
  tokenizer.padding_side = "left"
  config, params = from_transformers(model)
  enc = tokenizer(PROMPTS, return_tensors="np", padding=True)
  return model, config, params, enc["input_ids"], enc["attention_mask"]


def test_loads_from_registry_name_like_transformers(smollm2):
  _, config, params = smollm2[:3]
  config2, params2 = load_model("smollm2-135m")
  assert config2 == config
  np.testing.assert_array_equal(
    np.asarray(params2["model.layers.3.mlp.up_proj.weight"]), np.asarray(params["model.layers.3.mlp.up_proj.weight"])
  )


def test_logits_match_transformers(smollm2):
  model, config, params, ids, mask = smollm2
  lengths = mask.sum(1)
  assert len(PROMPTS) >= 4 and lengths.min() >= 64 and lengths.min() < lengths.max()  # a padded batch
  positions = np.maximum(mask.cumsum(-1) - 1, 0)
  with torch.no_grad():
    ref = model(
      input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions)
    ).logits.numpy()
  out = np.asarray(jax.jit(forward, static_argnums=1)(params, config, ids, mask))
  err = float(np.abs(ref - out)[mask.astype(bool)].max())
  ratio = scaled_error(out, ref, mask=mask.astype(bool))
  print(f"SmolLM2 fp32 max |logit diff| over {mask.sum()} tokens: {err:.3g} ({ratio:.3g} of the largest logit)")
  # 30 layers of float32 in two libraries: measured 3.5e-6 of the largest logit (~41); bounded at 2e-5, about the
  # former absolute 1e-3
  assert ratio < 2e-5


def test_greedy_generation_identical(smollm2):
  model, config, params, ids, mask = smollm2
  out = generate(params, config, ids, mask, max_new_tokens=32)
  with torch.no_grad():
    ref = model.generate(
      input_ids=torch.tensor(ids),
      attention_mask=torch.tensor(mask),
      max_new_tokens=32,
      do_sample=False,
      pad_token_id=config.pad_token_id,
    )[:, ids.shape[1] :].numpy()
  ref = np.pad(ref, ((0, 0), (0, 32 - ref.shape[1])), constant_values=config.pad_token_id)
  np.testing.assert_array_equal(out, ref)


def test_gguf_path_loads_the_same_weights(smollm2):
  from jpeft.models.loading import embedded_model_path

  _, config, params = smollm2[:3]
  config2, params2 = load_model(embedded_model_path("smollm2-135m"))
  assert config2 == config
  for name in ("model.embed_tokens.weight", "model.layers.29.mlp.down_proj.weight"):
    np.testing.assert_array_equal(np.asarray(params2[name]), np.asarray(params[name]))
