"""What converting a trained adapter to LoRA costs on the task: rank vs relative error vs test accuracy.

For each saved adapter (``python -m experiments.run ... --save_dir=D`` keeps one), convert it to LoRA at each rank
(``jpeft.convert``) and score the source adapter and every conversion by greedy generation on the experiment's own
test set (the comparison's data, rule and generation settings)::

  python -m tools.convert_eval --experiment=experiments/oft/smollm2-rank32 \
      --adapter=D/oft--smollm2-rank32--jax --ranks=8,32,128 --out=conversion_oft.json

It prints a table (rank, relative Frobenius error, probe-batch logit error, test accuracy and its change) and
writes the rows as JSON.
"""

from __future__ import annotations

import json
import os
import tempfile

from absl import app, flags

FLAGS = flags.FLAGS


def _trainer(exp, config, model_config, params, peft_config, tokenizer, data):
  from experiments.runners import _columns
  from jpeft.trainer import Trainer

  return Trainer(
    model_config,
    params,
    peft_config,
    tokenizer,
    _columns(data.train),
    _columns(data.valid),
    _columns(data.test),
    config,
  )


def evaluate_conversions(
  experiment: str, adapter_dir: str, ranks, *, overrides=None, model=None, tokenizer=None, progress=True
):
  """Rows ``{rank, rel_error, logit_rel_error, test_accuracy, accuracy_change, lora_parameters, predictions}``; rank
  None is the source adapter itself. ``overrides`` replace training-params keys, as ``experiments.run``'s flags."""
  from experiments import common
  from jpeft import checkpoint, convert
  from jpeft.models import load_model, load_tokenizer

  exp = common.load_experiment(experiment, dict(overrides or {}))
  config = common.make_train_config(exp, progress=progress)
  source = model or exp.params.get("model_id")
  model_config, base = load_model(source)
  tok = load_tokenizer(tokenizer or source)
  data = common.load_data(exp.params)
  peft_config, adapter, params = checkpoint.load_pretrained(adapter_dir, base, model_config)
  acc, predictions = _trainer(exp, config, model_config, params, peft_config, tok, data).evaluate(data.test, adapter)
  rows = [
    {
      "rank": None,
      "method": peft_config.peft_type,
      "rel_error": 0.0,
      "logit_rel_error": 0.0,
      "test_accuracy": acc,
      "accuracy_change": 0.0,
      "predictions": predictions,
    }
  ]
  for rank in ranks:
    conv = convert.to_lora(base, params, adapter, peft_config, model_config, rank=rank, progress=progress)
    probe = convert.logit_error(base, params, adapter, peft_config, conv, model_config)
    trainer = _trainer(exp, config, model_config, base, conv.config, tok, data)
    lora_acc, lora_predictions = trainer.evaluate(data.test, conv.adapter)
    with tempfile.TemporaryDirectory() as tmp:
      checkpoint.save_pretrained(tmp, conv.adapter, conv.config, base)
      size = os.path.getsize(os.path.join(tmp, checkpoint.ADAPTER_WEIGHTS))
    rows.append(
      {
        "rank": rank,
        "method": peft_config.peft_type,
        "rel_error": conv.report["rel_error"],
        "logit_rel_error": probe["logit_rel_error"],
        "test_accuracy": lora_acc,
        "accuracy_change": lora_acc - acc,
        "lora_parameters": conv.report["lora_parameters"],
        "file_bytes": size,
        "predictions": lora_predictions,
      }
    )
  return {"experiment": experiment, "adapter": adapter_dir, "n_test": len(data.test), "rows": rows}


def table(result: dict) -> str:
  lines = [
    f"{result['rows'][0]['method']} ({result['experiment']}, {result['n_test']} test prompts)",
    "| rank | rel. Frobenius error | logit error | test accuracy | change | LoRA params |",
    "|---|---|---|---|---|---|",
  ]
  for r in result["rows"]:
    if r["rank"] is None:
      lines.append(f"| source | - | - | {r['test_accuracy']:.3f} | - | - |")
    else:
      lines.append(
        f"| {r['rank']} | {r['rel_error']:.3f} | {r['logit_rel_error']:.2e} | {r['test_accuracy']:.3f} | "
        f"{r['accuracy_change']:+.3f} | {r['lora_parameters']:,} |"
      )
  return "\n".join(lines)


def main(argv):
  del argv
  result = evaluate_conversions(
    FLAGS.experiment,
    FLAGS.adapter,
    [int(r) for r in FLAGS.ranks],
    model=FLAGS.model,
    tokenizer=FLAGS.tokenizer,
    progress=FLAGS.progress,
  )
  print(table(result))
  if FLAGS.out:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2)
      f.write("\n")


if __name__ == "__main__":
  flags.DEFINE_string("experiment", None, "the experiment folder the adapter was trained with")
  flags.DEFINE_string("adapter", None, "the saved adapter folder (experiments.run --save_dir)")
  flags.DEFINE_list("ranks", ["8", "32", "128"], "LoRA ranks to convert at")
  flags.DEFINE_string("model", None, "model source (default: the experiment's model_id)")
  flags.DEFINE_string("tokenizer", None, "tokenizer source (default: the model's)")
  flags.DEFINE_string("out", None, "write the rows as JSON here")
  flags.DEFINE_bool("progress", True, "tqdm bars")
  flags.mark_flags_as_required(["experiment", "adapter"])
  app.run(main)
