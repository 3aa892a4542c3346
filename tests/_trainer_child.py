"""A tiny, fully deterministic training setup for the trainer tests, and a child process for the kill test.

``python tests/_trainer_child.py OUT_DIR [--steps N] [--checkpoint_every K]`` trains the tiny setup with
checkpoints in ``OUT_DIR/ckpt`` and appends ``"<step> <loss>"`` lines to ``OUT_DIR/losses.txt`` as it goes
(and ``"resumed <step>"`` at the end when it continued from a checkpoint); the final result goes to
``OUT_DIR/result.json``. Everything is built from fixed seeds, with no torch or transformers import.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 320


class TinyTokenizer:
  """A byte-level BPE from the ``tokenizers`` library behind the small interface the trainer uses."""

  def __init__(self, tok):
    self._tok = tok
    self.eos_token_id = tok.token_to_id("<eos>")
    self.pad_token_id = None

  def __call__(self, text, add_special_tokens=True):
    return {"input_ids": self._tok.encode(text, add_special_tokens=add_special_tokens).ids}

  def decode(self, ids, skip_special_tokens=True):
    return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


def make_tokenizer() -> TinyTokenizer:
  from backends.tiny import train_tiny_tokenizer

  tok = train_tiny_tokenizer(VOCAB)
  return TinyTokenizer(tok)


def make_model(seed: int = 0, vocab_size: int = VOCAB):
  import jax

  from jpeft.models.llama import LlamaConfig, init_params

  config = LlamaConfig(
    vocab_size=vocab_size,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=1024,
    bos_token_id=None,
    eos_token_id=0,
  )
  return config, init_params(jax.random.key(seed), config, std=0.1)


def make_data(n_train: int = 12, n_valid: int = 2, n_test: int = 2):
  from jpeft.data import make_split

  def records(split, n):
    return [{"query": r["question"], "response": r["answer"]} for r in make_split(split, n, seed=0)]

  return records("train", n_train), records("valid", n_valid), records("test", n_test)


def lora_config(dropout: float = 0.1):
  from jpeft import registry

  return registry.config_from_dict(
    {
      "peft_type": "LORA",
      "r": 4,
      "lora_alpha": 8,
      "lora_dropout": dropout,
      "target_modules": ["q_proj", "v_proj", "down_proj"],
    }
  )


def train_config(**overrides):
  from jpeft.trainer import TrainConfig

  base = dict(
    batch_size=2,
    batch_size_eval=2,
    max_steps=8,
    eval_steps=4,
    max_seq_length=256,
    seed=0,
    grad_norm_clip=1.0,
    optimizer_type="AdamW",
    optimizer_kwargs={"lr": 1e-2, "weight_decay": 0.1},
    lr_scheduler="cosine",
    max_new_tokens=8,
    pad_multiple=64,
    progress=False,
    log_every=0,
  )
  base.update(overrides)
  return TrainConfig(**base)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument("out")
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument("--checkpoint_every", type=int, default=2)
  args = parser.parse_args(argv)

  import jax

  jax.config.update("jax_default_matmul_precision", "highest")
  from jpeft.trainer import Trainer

  model_config, params = make_model()
  train, valid, test = make_data()
  losses_path = os.path.join(args.out, "losses.txt")
  out = open(losses_path, "a")

  def on_step(step, loss, metrics):
    out.write(f"{step} {loss!r}\n")
    out.flush()

  cfg = train_config(
    max_steps=args.steps, checkpoint_dir=os.path.join(args.out, "ckpt"), checkpoint_every=args.checkpoint_every
  )
  trainer = Trainer(model_config, params, lora_config(), make_tokenizer(), train, valid, test, cfg, on_step=on_step)
  result = trainer.run()
  if result["resumed_from"] is not None:
    out.write(f"resumed {result['resumed_from']}\n")
  out.close()
  with open(os.path.join(args.out, "result.json"), "w") as f:
    json.dump(
      {"losses": result["losses"], "resumed_from": result["resumed_from"], "eval_metrics": result["eval_metrics"]}, f
    )
  return 0


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  sys.exit(main())
