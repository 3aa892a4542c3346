"""The training loop: an end-to-end tiny run, resume after SIGKILL, NaN handling, bounded compiles."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import _trainer_child as setup
from numerics import assert_close_to_scale
from jpeft.data import accuracy, make_split
from jpeft.trainer import NonFiniteLossError, TrainConfig, Trainer, batch_schedule, optimizer_kwargs

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


@pytest.fixture(scope="module")
def tiny():
  model_config, params = setup.make_model()
  train, valid, test = setup.make_data()
  return model_config, params, setup.make_tokenizer(), train, valid, test


def _host(tree):
  return jax.tree_util.tree_map(lambda x: np.array(x), tree)


@pytest.fixture(scope="module")
def reference(tiny):
  """The uninterrupted run of the child's configuration (lengths 161..298 pad to 192 or 256, capped)."""
  model_config, params, tok, train, valid, test = tiny
  before = _host(params)
  trainer = Trainer(model_config, params, setup.lora_config(), tok, train, valid, test, setup.train_config())
  expected_lengths = sorted({trainer.padded_length(b) for b in trainer.schedule()})
  return trainer, trainer.run(), before, expected_lengths


def test_tiny_run_end_to_end(tiny, reference):
  model_config, params, tok, train, valid, test = tiny
  trainer, result, before, expected_lengths = reference
  cfg = trainer.config

  for key in (
    "losses",
    "eval_metrics",
    "valid_accuracy",
    "test_accuracy",
    "train_time_s",
    "compile_time_s",
    "tokens_per_s",
    "num_trainable_params",
    "trainable",
  ):
    assert key in result, key
  assert len(result["losses"]) == cfg.max_steps
  assert all(math.isfinite(x) for x in result["losses"])
  assert [m["step"] for m in result["eval_metrics"]] == [4, 8]
  for m in result["eval_metrics"]:
    assert math.isfinite(m["train_loss"]) and m["elapsed_s"] > 0
  # the reported accuracy scores the trained adapter's own greedy outputs against the test references
  assert result["test_predictions"] == trainer.generate_texts([r["query"] for r in test], result["trainable"])
  assert result["test_accuracy"] == accuracy(result["test_predictions"], [r["response"] for r in test])
  valid_acc, _ = trainer.evaluate([(r["query"], r["response"]) for r in valid], result["trainable"])
  assert result["eval_metrics"][-1]["valid_accuracy"] == result["valid_accuracy"] == valid_acc
  assert result["compile_time_s"] > 0 and result["train_time_s"] > 0 and result["tokens_per_s"] > 0
  # r=4 LoRA on q (32x32), v (16x32), down (32x64) in the one layer
  assert result["num_trainable_params"] == 4 * ((32 + 32) + (32 + 16) + (64 + 32))
  assert set(result["trainable"]) == {
    f"model.layers.{i}.{m}" for i in range(1) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
  }
  # the adapter trained, the base did not move
  assert any(np.abs(np.asarray(ts["lora_B.weight"])).max() > 0 for ts in result["trainable"].values())
  after = _host(params)
  for name in before:
    np.testing.assert_array_equal(before[name], after[name], err_msg=name)
  # one compile per padded length (and per head variant: on the loss tokens, or on every position)
  assert len(expected_lengths) == 2
  assert result["padded_lengths"] == expected_lengths
  shapes = {(trainer.padded_length(b), "loss_positions" in trainer.make_batch(b)[0]) for b in trainer.schedule()}
  assert any(gathered for _, gathered in shapes)
  assert trainer.train_step._cache_size() == len(shapes) <= 2 * len(expected_lengths)


def test_a_learnable_task_goes_from_wrong_to_right(tiny):
  """Every answer is 7: the untrained model never says it, 60 LoRA steps teach it (test accuracy 1.0 measured).

  Scored twice: by the trainer (PEFT's rule) and here by a rule of its own, so a wrong denominator, predictions
  scored against the wrong references, or evaluation on the untrained weights all fail.
  """
  model_config, params, tok, *_ = tiny

  def records(split, n):
    return [{"query": r["question"], "response": "#### 7"} for r in make_split(split, n, seed=0)]

  def own_accuracy(predictions):
    return sum(p.rpartition("#### ")[2].strip(" .") == "7" for p in predictions) / len(predictions)

  results = {}
  for steps in (0, 60):
    trainer = Trainer(
      model_config,
      params,
      setup.lora_config(dropout=0.0),
      tok,
      records("train", 16),
      records("valid", 4),
      records("test", 8),
      setup.train_config(
        max_steps=steps,
        eval_steps=0,
        lr_scheduler="constant",
        max_new_tokens=8,
        optimizer_kwargs={"lr": 3e-2, "weight_decay": 0.0},
      ),
    )
    result = trainer.run()
    assert result["test_accuracy"] == own_accuracy(result["test_predictions"]), result["test_predictions"]
    results[steps] = result["test_accuracy"]
  assert results[0] == 0.0 and results[60] >= 0.75, results


def test_head_on_loss_tokens_gives_the_same_loss_and_gradients(tiny):
  """The head run only where a label is (loss_positions) is the full-logits loss, to float rounding."""
  from jpeft import train
  from jpeft.models import loss_positions

  model_config, params, tok, train_data, _, _ = tiny
  trainer = Trainer(
    model_config,
    params,
    setup.lora_config(dropout=0.0),
    tok,
    train_data,
    config=setup.train_config(head_on_loss_tokens=False),
  )
  indices = trainer.schedule()[0]
  batch = {k: np.asarray(v) for k, v in trainer.make_batch(indices)[0].items()}
  assert "loss_positions" not in batch
  # a non-zero adapter, so that the gradients reach both LoRA factors
  adapter = jax.tree_util.tree_map(lambda x: x + 0.05, trainer.trainable)
  loss_fn = train.make_loss_fn(model_config, trainer.peft_config)
  full = jax.value_and_grad(loss_fn, has_aux=True)(adapter, trainer.params, batch)
  positions, targets = loss_positions(batch["labels"])
  # the filler rows of the batch have no label: all their slots are padding
  assert (targets[np.asarray(batch["attention_mask"]).sum(1) == 0] == -100).all()
  assert (targets != -100).sum() == (batch["labels"][:, 1:] != -100).sum() == int(full[0][1])
  gathered = jax.value_and_grad(loss_fn, has_aux=True)(
    adapter, trainer.params, dict(batch, loss_positions=positions, loss_targets=targets)
  )
  assert int(gathered[0][1]) == int(full[0][1])
  assert abs(float(gathered[0][0]) - float(full[0][0])) <= 1e-6 * abs(float(full[0][0]))
  # the gathered head sums the same terms in another order: each gradient within 1e-5 of its largest entry
  # (element-wise bounds fail on entries through zero when XLA picks other kernels on another CPU)
  for (path, g), f in zip(
    jax.tree_util.tree_leaves_with_path(gathered[1]), jax.tree_util.tree_leaves(full[1]), strict=True
  ):
    assert_close_to_scale(g, f, 1e-5, what=f"gradient {jax.tree_util.keystr(path)}")
  # a width below the longest row's label count cannot hold the row
  assert loss_positions(batch["labels"], width=int((targets != -100).sum(1).max()) - 1) is None


def test_head_on_loss_tokens_trains_the_same(tiny):
  model_config, params, tok, train_data, _, _ = tiny
  runs = {}
  for flag in (True, False):
    trainer = Trainer(
      model_config,
      params,
      setup.lora_config(dropout=0.0),
      tok,
      train_data,
      config=setup.train_config(head_on_loss_tokens=flag, max_steps=4, eval_steps=0),
    )
    runs[flag] = trainer.run()["losses"]
  np.testing.assert_allclose(runs[True], runs[False], rtol=1e-5)


@pytest.mark.parametrize("head_on_loss_tokens", [True, False])
def test_gradient_accumulation_equals_the_full_batch(tiny, head_on_loss_tokens):
  """Micro-batches weighted by their share of the loss tokens give the full batch's loss and gradient."""
  from jpeft import train
  from jpeft.models import loss_positions

  model_config, params, tok, train_data, _, _ = tiny
  cfg = setup.train_config(batch_size=4, head_on_loss_tokens=False, max_steps=4)
  trainer = Trainer(model_config, params, setup.lora_config(dropout=0.0), tok, train_data, config=cfg)
  batch = {k: np.asarray(v) for k, v in trainer.make_batch(trainer.schedule()[0])[0].items()}
  if head_on_loss_tokens:  # the head on the loss tokens only: the micro-batches split the gathered positions too
    batch["loss_positions"], batch["loss_targets"] = loss_positions(batch["labels"])
  adapter = jax.tree_util.tree_map(lambda x: x + 0.05, trainer.trainable)  # non-zero: both factors get gradients
  grad = train.value_and_grad(train.make_loss_fn(model_config, trainer.peft_config), trainer.peft_config)
  (full_loss, full_n), full_grads = jax.jit(grad)(adapter, trainer.params, batch)
  for k in (2, 4):
    (loss, n), grads = jax.jit(train.accumulate(grad, k))(adapter, trainer.params, batch)
    assert int(n) == int(full_n)
    # the same per-token terms summed in another grouping: float32 rounding only
    assert abs(float(loss) - float(full_loss)) <= 1e-6 * abs(float(full_loss)), (k, float(loss), float(full_loss))
    for (path, g), f in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(full_grads)):
      assert_close_to_scale(g, f, 1e-5, what=f"accum {k} gradient {jax.tree_util.keystr(path)}")
  with pytest.raises(ValueError, match="does not split into 3 equal micro-batches"):
    train.accumulate(grad, 3)(adapter, trainer.params, batch)


def test_accumulated_training_follows_the_full_batch_run(tiny):
  model_config, params, tok, train_data, _, _ = tiny
  losses = {}
  for k in (1, 2):
    cfg = setup.train_config(batch_size=4, max_steps=4, eval_steps=0, accum_steps=k)
    trainer = Trainer(model_config, params, setup.lora_config(dropout=0.0), tok, train_data, config=cfg)
    losses[k] = trainer.run()["losses"]
  # four AdamW steps from the same init on the same batches; the gradients differ by float rounding only
  np.testing.assert_allclose(losses[2], losses[1], rtol=1e-5)


def test_memory_is_predicted_before_the_first_step_and_fitted_to_a_budget(tiny, reference):
  model_config, params, tok, train_data, valid, test = tiny
  _, expected, _, _ = reference
  trainer = Trainer(model_config, params, setup.lora_config(), tok, train_data, valid, test, setup.train_config())
  prediction = trainer.predict_memory()
  assert prediction["padded_length"] == max(trainer.padded_length(b) for b in trainer.schedule())
  base_bytes = sum(np.asarray(v).nbytes for v in jax.tree_util.tree_leaves(trainer.params))
  assert prediction["argument_bytes"] > base_bytes and prediction["temp_bytes"] > 0
  assert prediction["peak_bytes"] == (
    prediction["argument_bytes"] + prediction["output_bytes"] + prediction["temp_bytes"] - prediction["alias_bytes"]
  )
  assert prediction["alias_bytes"] > 0  # the adapter and the optimizer state are donated
  # the executable compiled for the prediction is the one the run uses: the same losses as the reference run
  result = trainer.run()
  np.testing.assert_allclose(result["losses"], expected["losses"], rtol=1e-6, atol=0)

  cfg = setup.train_config(batch_size=4, max_steps=4, eval_steps=0)
  trainer = Trainer(model_config, params, setup.lora_config(dropout=0.0), tok, train_data, config=cfg)
  first = trainer.predict_memory()
  # a budget just under the plain step: remat, then micro-batches, until the prediction fits
  fitted, tried = trainer.fit_memory(first["peak_bytes"] - 1)
  assert tried[0]["peak_bytes"] == first["peak_bytes"] and len(tried) >= 2
  assert fitted is not None and fitted["peak_bytes"] < first["peak_bytes"] and fitted is tried[-1]
  assert (
    (trainer.config.use_gc, trainer.config.accum_steps)
    == (fitted["use_gc"], fitted["accum_steps"])
    != (
      False,
      1,
    )
  )
  assert all(t["peak_bytes"] > first["peak_bytes"] - 1 for t in tried[:-1])  # it stopped at the first that fits
  fitted_losses = trainer.run()["losses"]
  plain = Trainer(model_config, params, setup.lora_config(dropout=0.0), tok, train_data, config=cfg).run()["losses"]
  np.testing.assert_allclose(fitted_losses, plain, rtol=1e-5)
  # nothing fits one byte: the answer says so
  fitted, tried = trainer.fit_memory(1)
  assert fitted is None and all(t["peak_bytes"] > 1 for t in tried)


def test_batch_schedule_is_a_function_of_seed_and_lengths():
  lengths = [5, 9, 3, 7, 1, 8, 2, 4, 6]
  a = batch_schedule(lengths, 2, 12, seed=3, bucket_factor=1)
  assert a == batch_schedule(lengths, 2, 12, seed=3, bucket_factor=1)
  assert a[4:] == batch_schedule(lengths, 2, 12, seed=3, bucket_factor=1, start_step=4)
  assert a != batch_schedule(lengths, 2, 12, seed=4, bucket_factor=1)
  assert a[:5] != a[5:10]  # each epoch has its own order
  assert sorted(i for b in a[:5] for i in b) == list(range(9))  # one epoch = every example once


def test_from_dict_reads_peft_training_params():
  params = {
    "model_id": "meta-llama/Llama-3.2-3B",
    "dtype": "bfloat16",
    "max_seq_length": 768,
    "batch_size": 4,
    "batch_size_eval": 50,
    "max_steps": 5000,
    "eval_steps": 250,
    "compile": False,
    "use_gc": False,
    "seed": 0,
    "grad_norm_clip": 1.0,
    "optimizer_type": "AdamW",
    "optimizer_kwargs": {"lr": 1e-4, "weight_decay": 0.1},
    "lr_scheduler": "cosine",
    "use_amp": False,
    "autocast_adapter_dtype": True,
    "attn_implementation": None,
    "generation_kwargs": {"max_length": 800, "max_new_tokens": 300},
    "query_template": "Question: {query} Think step by step.\nAnswer:",
    "init_kv_cache_prefix": None,
  }
  cfg = TrainConfig.from_dict(params, max_steps=10)
  assert (cfg.batch_size, cfg.max_steps, cfg.max_new_tokens, cfg.warmup_steps) == (4, 10, 300, 0)
  assert optimizer_kwargs(cfg)["weight_decay"] == 0.1
  # an experiment's optimizer_kwargs replace the defaults' dict in PEFT: torch's AdamW decay applies
  cfg = TrainConfig.from_dict(dict(params, optimizer_kwargs={"lr": 1e-3}))
  assert optimizer_kwargs(cfg)["weight_decay"] == 0.01
  cfg = TrainConfig.from_dict(dict(params, optimizer_type="lora-fa", optimizer_kwargs={"r": 32, "lr": 1e-4}))
  assert optimizer_kwargs(cfg)["eps"] == 1e-6 and "r" not in optimizer_kwargs(cfg)
  with pytest.raises(ValueError, match="unknown training params"):
    TrainConfig.from_dict({"batch_sise": 4})
  with pytest.raises(ValueError, match="unsupported optimizer_kwargs"):
    optimizer_kwargs(TrainConfig(optimizer_kwargs={"lr": 1e-3, "momentum": 0.9}))


def _read_losses(path):
  """{step: loss} from the child's file (a later line for a step wins); a torn last line is skipped."""
  out, resumed = {}, None
  with open(path) as f:
    text = f.read()
  for line in text.split("\n")[:-1]:
    a, b = line.split()
    if a == "resumed":
      resumed = int(b)
    else:
      out[int(a)] = float(b)
  return out, resumed


def _child(out_dir, *args):
  # both children share a persistent compilation cache: the restarted one reuses the first one's executables
  env = dict(
    os.environ,
    PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    JAX_PLATFORMS="cpu",
    JAX_COMPILATION_CACHE_DIR=os.path.join(str(out_dir), "xla_cache"),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
  )
  return subprocess.Popen(
    [sys.executable, os.path.join(HERE, "_trainer_child.py"), str(out_dir), *args],
    env=env,
    cwd=ROOT,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
  )


def test_resume_after_sigkill_matches_uninterrupted_run(reference, tmp_path):
  _, reference, _, _ = reference
  steps = 8

  losses_file = tmp_path / "losses.txt"
  proc = _child(tmp_path, "--steps", str(steps), "--checkpoint_every", "2")
  deadline = time.time() + 120
  try:
    while True:
      if losses_file.exists() and 5 in _read_losses(losses_file)[0]:
        break
      if proc.poll() is not None:
        pytest.fail(f"the child ended before step 5: {proc.stderr.read().decode()[-3000:]}")
      if time.time() > deadline:
        pytest.fail("the child did not reach step 5 in time")
      time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  first, _ = _read_losses(losses_file)
  assert not (tmp_path / "result.json").exists()
  written_before_kill = max(first)

  proc = _child(tmp_path, "--steps", str(steps), "--checkpoint_every", "2")
  _, err = proc.communicate(timeout=180)
  assert proc.returncode == 0, err.decode()[-3000:]
  combined, resumed = _read_losses(losses_file)
  result = json.loads((tmp_path / "result.json").read_text())

  # resumed from a checkpoint written before the kill, not from scratch
  assert resumed is not None and resumed > 0 and resumed % 2 == 0 and resumed <= written_before_kill + 1
  assert result["resumed_from"] == resumed
  assert sorted(combined) == list(range(steps))
  np.testing.assert_allclose([combined[i] for i in range(steps)], reference["losses"], rtol=1e-6, atol=0)
  # the restored run carries the whole loss log and the earlier evaluations
  np.testing.assert_allclose(result["losses"], reference["losses"], rtol=1e-6, atol=0)
  assert [m["step"] for m in result["eval_metrics"]] == [m["step"] for m in reference["eval_metrics"]]


def _checkpoints(folder):
  import orbax.checkpoint as ocp

  with ocp.CheckpointManager(str(folder), options=ocp.CheckpointManagerOptions(read_only=True)) as mngr:
    steps = sorted(mngr.all_steps())
    meta = None
    if steps:
      meta = mngr.restore(steps[-1], args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  return steps, meta


def test_an_asynchronous_save_keeps_the_log_of_its_own_step(tiny, tmp_path):
  # the loop appends to the log while the write is in flight: the checkpoint must hold the log as it was
  model_config, params, tok, train, valid, test = tiny
  cfg = setup.train_config(checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=2)
  trainer = Trainer(model_config, params, setup.lora_config(), tok, train, None, None, cfg)
  log = {"losses": [1.0, 2.0], "eval_metrics": []}
  manager = trainer._manager()
  try:
    trainer._save(manager, 2, log)
    log["losses"].extend([3.0, 4.0])
    log["eval_metrics"].append({"step": 4})
    manager.wait_until_finished()
  finally:
    manager.close()
  steps, meta = _checkpoints(tmp_path / "ckpt")
  assert steps == [2] and meta["losses"] == [1.0, 2.0] and meta["eval_metrics"] == []


def test_a_checkpoint_whose_log_does_not_fit_its_step_is_refused(tiny, tmp_path):
  model_config, params, tok, train, valid, test = tiny
  cfg = setup.train_config(checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=2, async_checkpointing=False)
  trainer = Trainer(model_config, params, setup.lora_config(), tok, train, None, None, cfg)
  manager = trainer._manager()
  try:
    trainer._save(manager, 2, {"losses": [1.0, 2.0, 3.0], "eval_metrics": []})
  finally:
    manager.close()
  trainer = Trainer(model_config, params, setup.lora_config(), tok, train, None, None, cfg)
  with pytest.raises(ValueError, match=r"step 2 is inconsistent: its log holds 3 losses \(expected 2\)"):
    trainer.run()


def test_nan_loss_from_huge_lr_stops_and_keeps_last_good_checkpoint(tiny, tmp_path):
  # full fine-tuning at lr=1e30: the first update blows the weights up, the next loss or gradient is NaN
  model_config, params, tok, train, valid, test = tiny
  before = _host(params)
  cfg = setup.train_config(
    max_steps=6,
    eval_steps=None,
    optimizer_kwargs={"lr": 1e30},
    checkpoint_dir=str(tmp_path / "ckpt"),
    checkpoint_every=1,
  )
  trainer = Trainer(model_config, params, None, tok, train, None, None, cfg)
  with pytest.raises(NonFiniteLossError, match=r"non-finite (loss|gradient norm) \(nan\) at step \d+") as info:
    trainer.run()
  err = info.value
  steps, meta = _checkpoints(tmp_path / "ckpt")
  assert steps and steps[-1] == err.last_checkpoint_step == err.step
  assert f"checkpoint is step {err.last_checkpoint_step}" in str(err)
  assert all(math.isfinite(x) for x in meta["losses"]) and len(meta["losses"]) == steps[-1]
  assert len(err.losses) == err.step
  for name in before:  # full fine-tuning trains a copy
    np.testing.assert_array_equal(before[name], np.asarray(params[name]), err_msg=name)


def test_poisoned_step_raises_and_leaves_the_last_good_checkpoint(tiny, tmp_path):
  model_config, params, tok, train, valid, test = tiny
  cfg = setup.train_config(
    max_steps=8, eval_steps=None, checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=2, async_checkpointing=False
  )
  holder = {}

  def poison(step, loss, metrics):
    if step == 2:  # the state after step 2 turns NaN: step 3's loss is NaN, before the save at 4
      t = holder["trainer"]
      t.trainable = jax.tree_util.tree_map(lambda x: x * np.float32("nan"), t.trainable)

  trainer = holder["trainer"] = Trainer(
    model_config, params, setup.lora_config(dropout=0.0), tok, train, None, None, cfg, on_step=poison
  )
  with pytest.raises(NonFiniteLossError) as info:
    trainer.run()
  assert info.value.step == 3 and info.value.last_checkpoint_step == 2
  assert "at step 3" in str(info.value) and "checkpoint is step 2" in str(info.value)
  steps, meta = _checkpoints(tmp_path / "ckpt")
  assert steps == [2] and len(meta["losses"]) == 2


def test_non_finite_state_is_never_saved(tiny, tmp_path):
  model_config, params, tok, train, valid, test = tiny
  cfg = setup.train_config(checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=2)
  trainer = Trainer(model_config, params, setup.lora_config(), tok, train, None, None, cfg)
  log = {"losses": [1.0, 1.0]}
  manager = trainer._manager()
  try:
    trainer._save(manager, 2, log)
    manager.wait_until_finished()
    trainer.trainable = jax.tree_util.tree_map(lambda x: x * np.float32("nan"), trainer.trainable)
    with pytest.raises(NonFiniteLossError, match="trainable parameters") as info:
      trainer._save(manager, 4, dict(log, losses=[1.0] * 4))
    assert info.value.last_checkpoint_step == 2
  finally:
    manager.close()
  assert _checkpoints(tmp_path / "ckpt")[0] == [2]


def test_batch_coupled_method_sees_the_batch_peft_sees(tiny, monkeypatch):
  """Lily's router averages over the batch: a short batch gets no filler rows, an adapted head every position, and
  a short generation chunk no filler prompts (LoRA keeps them: one compiled shape)."""
  import jpeft.trainer as trainer_lib
  from jpeft import registry

  model_config, params, tok, train, valid, test = tiny
  lily = registry.config_from_dict(dict(peft_type="LILY", r=4, target_modules=["q_proj", "lm_head"]))
  cfg = setup.train_config(batch_size=4, max_steps=1, batch_size_eval=2, max_new_tokens=2)
  trainer = Trainer(model_config, params, lily, tok, train, valid, test, cfg)
  batch, _, _ = trainer.make_batch([0, 1, 2])
  assert batch["input_ids"].shape[0] == 3 and "loss_positions" not in batch
  lora = Trainer(model_config, params, setup.lora_config(), tok, train, valid, test, cfg)
  batch, _, _ = lora.make_batch([0, 1, 2])
  assert batch["input_ids"].shape[0] == 4 and "loss_positions" in batch

  rows = []
  real = trainer_lib.generate

  def recording(model_params, config, ids, mask, **kw):
    rows.append(ids.shape[0])
    return real(model_params, config, ids, mask, **kw)

  monkeypatch.setattr(trainer_lib, "generate", recording)
  queries = [q for q, _ in test] + [q for q, _ in valid][:1]  # 3 prompts in chunks of 2
  assert len(trainer.generate_texts(queries)) == 3 and rows == [2, 1]
  rows.clear()
  assert len(lora.generate_texts(queries)) == 3 and rows == [2, 2]


def test_compilation_cache_keeps_executables_for_the_next_run(tmp_path):
  code = (
    "import jax, jax.numpy as jnp\n"
    "from jpeft.trainer import enable_compilation_cache\n"
    "print(enable_compilation_cache())\n"
    "print(float(jax.jit(lambda x: jnp.tanh(x @ x).sum())(jnp.ones((8, 8)))))\n"
  )
  env = dict(os.environ, JPEFT_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  folder = out.stdout.split("\n")[0]
  assert folder == str(tmp_path / "cache" / "xla")
  # a millisecond compile is kept too (jax's default keeps only those over a second)
  assert os.listdir(folder), "no executable was written"
