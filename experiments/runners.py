"""One experiment on one backend: the jax side is ``jpeft.trainer.Trainer``; the torch side drives transformers +
PEFT through ``backends.torch_backend.TorchBackend`` over the same tokenised examples and the same batch schedule.

Both runners go through the same phases (:meth:`Runner.run`):

1. forgetting loss before training, with the adapter disabled (the base model);
2. training, with validation accuracy every ``eval_steps`` and the test accuracy at the end (greedy generation,
   PEFT's accuracy rule);
3. forgetting loss after training;
4. the checkpoint (``adapter_model.safetensors`` as saved; full fine-tuning: estimated as PEFT does, unless a
   save folder is given);
5. generation speed of the base model, the adapted model unmerged, and merged, on a fixed prompt set;
6. peak memory and parameter counts.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import time
from typing import Any, Mapping, Sequence

import numpy as np
from absl import logging

from experiments import common


class Runner:
  """The phases shared by the backends; subclasses implement the hooks."""

  name = "base"

  def __init__(
    self, exp: common.Experiment, config, *, model_source: str, tokenizer_source: str, save_dir: str | None = None
  ):
    self.exp = exp
    self.config = config
    self.model_source = model_source
    self.tokenizer_source = tokenizer_source
    self.save_dir = save_dir
    self.tokenizer = None
    self.memory_baseline = None

  # -- hooks -------------------------------------------------------------------------------------------------
  def check_config(self) -> None:
    """Raise if this backend cannot run the experiment's adapter config (before anything is loaded)."""

  def load(self) -> None:
    raise NotImplementedError

  def setup(self, data: common.ExperimentData) -> None:
    raise NotImplementedError

  def forgetting_sums(self, batches, adapted: bool) -> tuple[float, int]:
    raise NotImplementedError

  def train(self, data: common.ExperimentData) -> dict:
    raise NotImplementedError

  def save(self, folder: str) -> tuple[int, bool, str]:
    """(file size in bytes, whether it is an estimate, the file) of the trained adapter saved into ``folder``."""
    raise NotImplementedError

  def generation_speeds(self, ids: np.ndarray, mask: np.ndarray, new_tokens: int) -> dict:
    raise NotImplementedError

  def peak_memory(self) -> tuple[int, str]:
    raise NotImplementedError

  def release_base(self) -> None:
    """Drop what is only needed for the base model's forgetting loss (called once that loss is known)."""

  def param_counts(self) -> tuple[int, int]:
    raise NotImplementedError

  def accelerator(self) -> str:
    return "cpu"

  def resolved_peft_config(self) -> dict | None:
    return self.exp.peft_config

  def backend_info(self) -> dict:
    return {}

  # -- the run -----------------------------------------------------------------------------------------------
  def load_tokenizer(self):
    from jpeft.models import load_tokenizer

    self.tokenizer = load_tokenizer(self.tokenizer_source)
    if self.tokenizer.eos_token_id is None:
      raise common.ExperimentError(f"the tokenizer of {self.tokenizer_source!r} has no eos_token_id")
    self.eos_id = int(self.tokenizer.eos_token_id)
    self.pad_id = common.pad_token_id(self.tokenizer)
    return self.tokenizer

  def forgetting(self, data: common.ExperimentData, adapted: bool) -> float | None:
    params = self.exp.params
    max_length = params.get("forgetting_max_length") or common.PEFT_FORGETTING_MAX_LENGTH
    batches = common.forgetting_batches(
      self.tokenizer,
      data.forgetting,
      batch_size=self.config.batch_size,
      max_length=max_length,
      pad_id=self.pad_id,
      multiple=self.config.pad_multiple,
    )
    if not batches:
      return None
    total, count = self.forgetting_sums(batches, adapted)
    return total / count if count else None

  def run(self, data: common.ExperimentData) -> dict:
    params = self.exp.params
    out: dict[str, Any] = {}
    t = time.perf_counter()
    data = common.drop_unlabelled(self.tokenizer, data, self.config)
    out["data_info"] = data.info
    self.setup(data)
    out["setup_time_s"] = time.perf_counter() - t

    t = time.perf_counter()
    before = self.forgetting(data, adapted=False)
    self.release_base()
    out["forgetting_before_time_s"] = time.perf_counter() - t

    out.update(self.train(data))
    # the peak of setup, training and evaluation; the phases below build extra copies (merged weights)
    out["peak_memory_bytes"], out["peak_memory_kind"] = self.peak_memory()

    t = time.perf_counter()
    after = self.forgetting(data, adapted=True)
    out["forgetting"] = {
      "loss_before": before,
      "loss_after": after,
      "delta": (after - before) if before is not None and after is not None else None,
      "texts": len(data.forgetting),
      "source": data.info["forgetting"]["source"],
      "time_s": out.pop("forgetting_before_time_s") + time.perf_counter() - t,
    }

    t = time.perf_counter()
    if self.save_dir:
      folder = os.path.join(self.save_dir, f"{self.exp.method}--{self.exp.name}--{self.name}")
      if os.path.isdir(folder):
        shutil.rmtree(folder)
      size, estimated, path = self.save(folder)
    else:
      with tempfile.TemporaryDirectory(prefix="jpeft-exp-") as tmp:
        size, estimated, path = self.save(tmp)
      path = None
    out["checkpoint"] = {"file_size": size, "estimated": estimated, "path": path, "time_s": time.perf_counter() - t}

    n_prompts = params.get("n_inference")
    n_prompts = 4 if n_prompts is None else n_prompts
    new_tokens = params.get("inference_max_new_tokens") or 32
    prompts = common.inference_prompts(data, n_prompts)
    t = time.perf_counter()
    if prompts:
      ids, mask = next(common.prompt_batches(self.tokenizer, prompts, self.config, self.pad_id, rows=len(prompts)))
      speeds = self.generation_speeds(ids, mask, new_tokens)
    else:
      speeds = {"base": None, "unmerged": None, "merged": None}
    out["inference"] = _inference_summary(speeds, len(prompts), new_tokens, time.perf_counter() - t)

    out["peak_memory_end_bytes"] = self.peak_memory()[0]
    out["num_trainable_params"], out["num_total_params"] = self.param_counts()
    return out


def _inference_summary(speeds: dict, n_prompts: int, new_tokens: int, seconds: float) -> dict:
  base, unmerged, merged = speeds.get("base"), speeds.get("unmerged"), speeds.get("merged")

  def overhead(x):
    return (base / x - 1.0) if base and x else None

  return {
    "prompts": n_prompts,
    "new_tokens_per_prompt": new_tokens,
    "base_tokens_per_sec": base,
    "unmerged_tokens_per_sec": unmerged,
    "merged_tokens_per_sec": merged,
    "unmerged_overhead": overhead(unmerged),
    "merged_overhead": overhead(merged),
    "merge_error": speeds.get("merge_error"),
    "time_s": seconds,
  }


def _eval_entry(
  step, valid_acc, losses, prev_step, batch_size, train_time, eval_time, tokens_per_s, elapsed, peak_memory
):
  """One entry of PEFT's per-eval-step metrics."""
  return {
    "step": step,
    "valid accuracy": valid_acc,
    "train loss": float(np.mean(losses[prev_step:step])) if step > prev_step else None,
    "train samples": step * batch_size,
    "train time": train_time,
    "eval time": eval_time,
    "tokens / sec": tokens_per_s,
    "peak memory": peak_memory,
    "elapsed time": elapsed,
  }


# ------------------------------------------------------------------------------------------------------------
# jax


def describe_memory(prediction: dict) -> str:
  """One line of a ``Trainer.predict_memory`` result."""
  mib = lambda key: prediction[key] / 2**20  # noqa: E731
  return (
    f"predicted train-step memory {mib('peak_bytes'):.0f} MiB at padded length {prediction['padded_length']} "
    f"(arguments {mib('argument_bytes'):.0f} MiB: base params, adapter, optimizer state, batch; temporaries "
    f"{mib('temp_bytes'):.0f}; outputs {mib('output_bytes'):.0f}; donated -{mib('alias_bytes'):.0f}; "
    f"use_gc={prediction['use_gc']}, accum_steps={prediction['accum_steps']})"
  )


class JaxRunner(Runner):
  """jpeft: the adapter config through ``jpeft.config``; training through ``jpeft.trainer.Trainer``."""

  name = "jax"

  def __init__(
    self,
    *args,
    checkpoint_dir: str | None = None,
    memory_budget: float | None = None,
    fit_memory: bool = False,
    **kwargs,
  ):
    super().__init__(*args, **kwargs)
    self.checkpoint_dir = checkpoint_dir
    self.memory_budget = memory_budget  # GiB
    self.fit_memory = fit_memory
    self.jpeft_config = None
    self.predicted_memory = None

  def check_config(self) -> None:
    from jpeft import registry

    # PEFT's switches: use_gc, use_amp, autocast_adapter_dtype are honoured by jpeft.trainer, compile is always
    # on (jit); attn_implementation and init_kv_cache_prefix only where jpeft implements what they say
    problems = self.config.jax_unsupported()
    if problems:
      raise common.ExperimentError(f"{self.exp.experiment_name} on jax: {'; '.join(problems)}")
    if self.exp.peft_config is not None:
      self.jpeft_config = registry.config_from_dict(self.exp.peft_config)  # UnsupportedConfigError

  def resolved_peft_config(self):
    from jpeft import config as config_lib

    return None if self.jpeft_config is None else config_lib.config_to_dict(self.jpeft_config)

  def accelerator(self) -> str:
    import jax

    dev = jax.devices()[0]
    return f"{dev.platform}:{getattr(dev, 'device_kind', '')}"

  def backend_info(self) -> dict:
    import jax

    return {"jax_backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()]}

  def load(self) -> None:
    import jax.numpy as jnp

    from jpeft.models import load_model

    self.load_tokenizer()
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[
      common.model_dtype(self.exp.params)
    ]
    self.model_config, self.base_params = load_model(self.model_source, dtype=dtype)

  def setup(self, data) -> None:
    from jpeft.trainer import Trainer

    self.trainer = Trainer(
      self.model_config,
      self.base_params,
      self.jpeft_config,
      self.tokenizer,
      {"query": [q for q, _ in data.train], "response": [r for _, r in data.train]},
      _columns(data.valid),
      _columns(data.test),
      self.config,
    )
    self.schedule = self.trainer.schedule()
    self._base_count = core_num_params(self.base_params)
    self.predicted_memory = self._predict_memory()

  def _predict_memory(self) -> dict | None:
    """The compiled step's memory, printed before the first step; ``memory_budget``/``fit_memory`` act on it."""
    prediction = self.trainer.predict_memory()
    if prediction is None:
      return None
    print(f"{self.exp.experiment_name} [jax]: {describe_memory(prediction)}", flush=True)
    out = dict(prediction, budget_bytes=None, tried=None)
    if self.memory_budget is None:
      return out
    budget = int(self.memory_budget * 2**30)
    out["budget_bytes"] = budget
    if prediction["peak_bytes"] <= budget:
      return out
    over = f"the predicted train step ({prediction['peak_bytes'] / 2**30:.2f} GiB) exceeds --memory_budget={self.memory_budget:g} GiB"
    if not self.fit_memory:
      raise common.ExperimentError(f"{over}; pass --fit_memory to turn on remat or micro-batches until it fits")
    fitted, tried = self.trainer.fit_memory(budget)
    for t in tried[1:]:
      print(
        f"  tried use_gc={t['use_gc']} accum_steps={t['accum_steps']}: {t['peak_bytes'] / 2**30:.3f} GiB", flush=True
      )
    if fitted is None:
      raise common.ExperimentError(
        f"{over}, and no setting fits (tried remat and up to {tried[-1]['accum_steps']} micro-batches; the smallest "
        f"is {min(t['peak_bytes'] for t in tried) / 2**30:.2f} GiB)"
      )
    print(
      f"  fits with use_gc={fitted['use_gc']} accum_steps={fitted['accum_steps']} (same effective batch and loss)",
      flush=True,
    )
    return dict(
      fitted, budget_bytes=budget, tried=[{k: t[k] for k in ("use_gc", "accum_steps", "peak_bytes")} for t in tried]
    )

  def release_base(self) -> None:
    # full fine-tuning trains the trainer's own copy; the loaded weights would only add to the peak memory
    if self.jpeft_config is None:
      self.base_params = None

  def _nll_sums(self, params, batches) -> tuple[float, int]:
    import jax.numpy as jnp

    total, count = 0.0, 0
    rows = self.config.batch_size
    for ids, mask, labels in batches:
      if len(ids) < rows:  # one shape for every batch: filler rows repeat row 0 and score nothing
        fill = rows - len(ids)
        ids = np.concatenate([ids, np.repeat(ids[:1], fill, 0)])
        mask = np.concatenate([mask, np.repeat(mask[:1], fill, 0)])
        labels = np.concatenate([labels, np.full((fill, labels.shape[1]), -100, labels.dtype)])
      s, n = _nll_sum_fn()(
        params,
        jnp.asarray(ids),
        jnp.asarray(mask),
        jnp.asarray(labels),
        config=self.model_config,
        compute_dtype=self.config.compute_dtype,
      )
      total += float(s)
      count += int(n)
    return total, count

  def _merged(self):
    """The trained model as plain params (merged adapter), or None where the method cannot merge."""
    from jpeft import core

    if self.jpeft_config is None:
      return self.trainer.trainable
    if not hasattr(self, "_merged_params"):
      try:
        self._merged_params, self._merge_error = (
          core.merge(self.trainer.params, self.trainer.trainable, self.jpeft_config),
          None,
        )
      except Exception as exc:  # a method without a merge: measure unmerged only
        self._merged_params, self._merge_error = None, f"{type(exc).__name__}: {exc}"
    return self._merged_params

  def forgetting_sums(self, batches, adapted):
    if not adapted:
      return self._nll_sums(self.base_params, batches)
    # merged params share the base model's compiled forward; numerically the unmerged model's loss
    merged = self._merged()
    return self._nll_sums(merged if merged is not None else self.trainer.model_params(), batches)

  def train(self, data) -> dict:
    result = self.trainer.run()
    entries, prev_step, prev_time = [], 0, 0.0
    for m in result["eval_metrics"]:
      entries.append(
        _eval_entry(
          m["step"],
          m["valid_accuracy"],
          result["losses"],
          prev_step,
          self.config.batch_size,
          m["train_time_s"] - prev_time,
          m["eval_time_s"],
          m["tokens_per_s"],
          m["elapsed_s"],
          self.peak_memory()[0],
        )
      )
      prev_step, prev_time = m["step"], m["train_time_s"]
    return {
      "losses": result["losses"],
      "eval_metrics": entries,
      "test_accuracy": result["test_accuracy"],
      "valid_accuracy": result["valid_accuracy"],
      "test_predictions": result["test_predictions"],
      "train_time_s": result["train_time_s"],
      "compile_time_s": result["compile_time_s"],
      "eval_time_s": result["eval_time_s"],
      "tokens_per_s": result["tokens_per_s"],
      "total_tokens": result["total_tokens"],
      "padded_lengths": result["padded_lengths"],
      "resumed_from": result["resumed_from"],
      "schedule_sha256": common.schedule_digest(self.schedule),
      "predicted_memory": self.predicted_memory,
    }

  def save(self, folder):
    from jpeft import checkpoint

    if self.jpeft_config is None:
      if not self.save_dir:
        return _full_size_estimate(self.trainer.trainable), True, None
      checkpoint.save_merged_model(folder, self.trainer.trainable, self.model_config)
      path = os.path.join(folder, "model.safetensors")
      return os.path.getsize(path), False, path
    path = checkpoint.save_pretrained(
      folder, self.trainer.trainable, self.jpeft_config, self.trainer.params, opt_state=self.trainer.opt_state
    )
    return os.path.getsize(path), False, path

  def generation_speeds(self, ids, mask, new_tokens) -> dict:
    import jax

    from jpeft.generate import generate

    def tokens_per_s(params):
      kw = dict(
        max_new_tokens=new_tokens, eos_token_id=(), pad_token_id=self.pad_id, compute_dtype=self.config.compute_dtype
      )
      generate(params, self.model_config, ids, mask, **kw)  # compile and warm up
      t = time.perf_counter()
      out = generate(params, self.model_config, ids, mask, **kw)
      jax.block_until_ready(out)
      return ids.shape[0] * new_tokens / (time.perf_counter() - t)

    if self.jpeft_config is None:
      trained = tokens_per_s(self.trainer.trainable)
      return {"base": trained, "unmerged": trained, "merged": trained}
    base = tokens_per_s(self.base_params)
    unmerged = tokens_per_s(self.trainer.model_params())
    merged_params = self._merged()
    merged = tokens_per_s(merged_params) if merged_params is not None else None
    return {"base": base, "unmerged": unmerged, "merged": merged, "merge_error": self._merge_error}

  def peak_memory(self):
    import jax

    dev = jax.devices()[0]
    if dev.platform != "cpu":
      stats = dev.memory_stats() or {}
      return int(stats.get("peak_bytes_in_use", 0)), f"{dev.platform}_peak_bytes_in_use"
    return common.peak_rss_bytes(), "cpu_peak_rss"

  def param_counts(self):
    from backends.base import normalize_optimizer_type

    base = self._base_count
    if self.jpeft_config is None:
      return base, base
    trainable = self.trainer.num_trainable_params
    if normalize_optimizer_type(self.config.optimizer_type) == "lora-fa":
      # as PEFT counts after creating the optimizer: LoRA-FA freezes lora_A
      trainable -= sum(
        int(v.size) for ts in self.trainer.trainable.values() for t, v in ts.items() if t.startswith("lora_A")
      )
    return trainable, base + core_num_params(self.trainer.trainable)


_NLL_SUM = []


def _nll_sum_fn():
  """The jitted (sum of token losses, token count) of a batch; one function, so runs in a process share
  its compilations."""
  if not _NLL_SUM:
    import jax

    from jpeft.models import causal_lm_loss, forward

    def fn(params, ids, mask, labels, *, config, compute_dtype):
      loss, n = causal_lm_loss(forward(params, config, ids, mask, compute_dtype=compute_dtype), labels)
      return loss * n, n

    _NLL_SUM.append(jax.jit(fn, static_argnames=("config", "compute_dtype")))
  return _NLL_SUM[0]


def core_num_params(tree) -> int:
  from jpeft import core

  return core.num_params(tree)


def _columns(records: Sequence[tuple[str, str]]):
  if not records:
    return None
  return {"query": [q for q, _ in records], "response": [r for _, r in records]}


def _full_size_estimate(params) -> int:
  """PEFT's estimate for a fully fine-tuned model: parameters x bytes per parameter."""
  import jax

  return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params)))


# ------------------------------------------------------------------------------------------------------------
# torch


class TorchRunner(Runner):
  """transformers + PEFT: any adapter config PEFT accepts, trained over the jax trainer's batch schedule.

  PEFT's switches as PEFT's method_comparison applies them: ``attn_implementation`` goes to ``from_pretrained``,
  ``use_gc`` / ``use_amp`` / ``compile`` to ``TorchBackend.set_training_options``, ``autocast_adapter_dtype`` to
  ``get_peft_model``, ``init_kv_cache_prefix`` to ``peft.initialize_kv_prefix_from_text`` after the optimizer.
  """

  name = "torch"
  # transformers' attention implementations this runner is meant for (flash/flex attention need kernels that a
  # CPU install lacks); None is transformers' default
  ATTN_IMPLEMENTATIONS = (None, "eager", "sdpa")

  def __init__(self, *args, device: str | None = None, **kwargs):
    super().__init__(*args, **kwargs)
    self.device = device
    self.backend = None

  def check_config(self) -> None:
    if self.config.accum_steps != 1:
      raise common.ExperimentError(
        f"{self.exp.experiment_name} on torch: accum_steps={self.config.accum_steps} (micro-batches) is a jax "
        "trainer option; PEFT's training loop has none"
      )
    attn = self.config.attn_implementation
    if attn not in self.ATTN_IMPLEMENTATIONS:
      raise common.ExperimentError(
        f"{self.exp.experiment_name} on torch: attn_implementation {attn!r} is not supported here; use one of "
        f"{list(self.ATTN_IMPLEMENTATIONS)} (null: transformers' default)"
      )
    if self.exp.peft_config is None:
      return
    from peft import PeftConfig

    config = dict(self.exp.peft_config)
    if config.get("task_type") is None:
      config["task_type"] = "CAUSAL_LM"
    try:
      PeftConfig.from_peft_type(**config)
    except Exception as exc:
      raise common.ExperimentError(
        f"{self.exp.path}/{common.ADAPTER_CONFIG_NAME}: PEFT does not accept this config: {type(exc).__name__}: {exc}"
      ) from None

  def resolved_peft_config(self):
    return getattr(self, "_peft_config_dict", None)

  def accelerator(self) -> str:
    import torch

    if self.backend is not None and self.backend.device.type == "cuda":
      return f"cuda:{torch.cuda.get_device_name(self.backend.device)}"
    return "cpu"

  def backend_info(self) -> dict:
    import torch

    return {"torch_num_threads": torch.get_num_threads(), "pytorch_info": torch.__config__.show()}

  def load(self) -> None:
    from backends import get_backend

    self.load_tokenizer()
    self.backend = get_backend("torch", device=self.device)
    self.backend.load_base(
      self.model_source, dtype=common.model_dtype(self.exp.params), attn_implementation=self.config.attn_implementation
    )

  def setup(self, data) -> None:
    c = self.config
    self.examples = common.tokenize_train(self.tokenizer, data.train, c)
    self.schedule = common.train_schedule(self.examples, c)
    peft_config = self.exp.peft_config if self.exp.peft_config is not None else {"peft_type": "FULL"}
    self.backend.attach_adapter(peft_config, seed=c.seed, autocast_adapter_dtype=c.autocast_adapter_dtype)
    self.backend.set_training_options(gradient_checkpointing=c.use_gc, amp=c.use_amp, compile=c.compile)
    if self.backend.is_peft:
      config = self.backend.peft_config.to_dict()
      self._peft_config_dict = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
      # PEFT records the folder the model was read from (here the cache folder of a registry name); the result
      # names the model as the experiment did
      self._peft_config_dict["base_model_name_or_path"] = portable_model_name(self.model_source)
    self.backend.configure_optimizer(**common.optimizer_settings(c))
    if c.init_kv_cache_prefix is not None:  # after the optimizer, as PEFT's run.py (the prefix is set in place)
      self.backend.init_kv_cache_prefix(self.tokenizer, c.init_kv_cache_prefix)
    # counted after the optimizer is made (it may freeze tensors, as LoRA-FA does), before any merge
    self._counts = (self.backend.num_trainable_params(), int(sum(p.numel() for p in self.backend.model.parameters())))

  @contextlib.contextmanager
  def _adapter_disabled(self):
    if self.backend.is_peft:
      with self.backend.model.disable_adapter():
        yield
    else:
      yield

  def forgetting_sums(self, batches, adapted):
    import torch

    total, count = 0.0, 0
    with contextlib.ExitStack() as stack:
      if not adapted:
        stack.enter_context(self._adapter_disabled())
      for ids, mask, labels in batches:
        logits = torch.from_numpy(self.backend.logits(ids, mask))
        targets = torch.from_numpy(labels[:, 1:].astype(np.int64))
        loss = torch.nn.functional.cross_entropy(
          logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total += float(loss)
        count += int((targets != -100).sum())
    return total, count

  def _generate_texts(self, queries: Sequence[str]) -> list[str]:
    texts = []
    for ids, mask in common.prompt_batches(self.tokenizer, queries, self.config, self.pad_id):
      out = self.backend.generate(ids, mask, max_new_tokens=self.config.max_new_tokens, eos_token_id=self.eos_id)
      texts += common.decode_new_tokens(self.tokenizer, out[:, ids.shape[1] :], self.eos_id)
    return texts

  def _evaluate(self, records) -> tuple[float | None, list[str]]:
    from jpeft.data import accuracy

    if not records:
      return None, []
    predictions = self._generate_texts([q for q, _ in records])
    return accuracy(predictions, [r for _, r in records]), predictions

  def train(self, data) -> dict:
    from jpeft.trainer import NonFiniteLossError

    c = self.config
    wall0 = time.perf_counter()
    losses, entries = [], []
    train_time = eval_time = compile_time = 0.0
    tokens_total = timed_tokens = 0
    prev_step, prev_time = 0, 0.0
    bar = None
    if c.progress:
      from tqdm.auto import tqdm

      bar = tqdm(total=c.max_steps, desc="train (torch)", dynamic_ncols=True)
    try:
      for step, indices in enumerate(self.schedule):
        batch, tokens = common.train_batch(self.examples, indices, c, self.pad_id)
        t = time.perf_counter()
        loss = self.backend.train_step(batch["input_ids"], batch["attention_mask"], batch["labels"])
        if c.compile and step == 0:  # torch.compile compiles (dynamic shapes) at the first step: as jax's
          compile_time += time.perf_counter() - t
        else:
          train_time += time.perf_counter() - t
          timed_tokens += tokens
        tokens_total += tokens
        if not math.isfinite(loss):
          raise NonFiniteLossError(step, loss, None, losses)
        losses.append(loss)
        rate = timed_tokens / train_time if train_time > 0 else None
        if bar is not None:
          bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate or 0:.0f}", refresh=False)
          bar.update(1)
        if c.log_every and (step + 1) % c.log_every == 0:
          logging.info("step %d/%d loss %.4f tokens/s %.0f", step + 1, c.max_steps, loss, rate or 0)
        done = step + 1
        if c.eval_steps and done % c.eval_steps == 0 and data.valid:
          t = time.perf_counter()
          acc, _ = self._evaluate(data.valid)
          dt = time.perf_counter() - t
          eval_time += dt
          entries.append(
            _eval_entry(
              done,
              acc,
              losses,
              prev_step,
              c.batch_size,
              train_time - prev_time,
              dt,
              rate,
              time.perf_counter() - wall0,
              self.peak_memory()[0],
            )
          )
          logging.info("step %d: valid accuracy %.4f, train loss %.4f", done, acc, entries[-1]["train loss"])
          prev_step, prev_time = done, train_time
      t = time.perf_counter()
      test_acc, predictions = self._evaluate(data.test)
      eval_time += time.perf_counter() - t
    finally:
      if bar is not None:
        bar.close()
    valid = [e["valid accuracy"] for e in entries]
    lengths = sorted(
      {int(common.train_batch(self.examples, b, c, self.pad_id)[0]["input_ids"].shape[1]) for b in self.schedule}
    )
    return {
      "losses": losses,
      "eval_metrics": entries,
      "test_accuracy": test_acc,
      "valid_accuracy": valid[-1] if valid else None,
      "test_predictions": predictions,
      "train_time_s": train_time,
      "compile_time_s": compile_time,
      "eval_time_s": eval_time,
      "tokens_per_s": timed_tokens / train_time if train_time > 0 else None,
      "total_tokens": tokens_total,
      "padded_lengths": lengths,
      "resumed_from": None,
      "schedule_sha256": common.schedule_digest(self.schedule),
    }

  def save(self, folder):
    if self.exp.peft_config is None and not self.save_dir:
      model = self.backend.base_model()
      size = sum(p.numel() * p.element_size() for p in model.parameters())
      return int(size), True, None
    self.backend.save_adapter(folder)
    name = "model.safetensors" if self.exp.peft_config is None else common.ADAPTER_WEIGHTS_NAME
    path = os.path.join(folder, name)
    return os.path.getsize(path), False, path

  def generation_speeds(self, ids, mask, new_tokens) -> dict:
    def tokens_per_s():
      self.backend.generate(ids, mask, max_new_tokens=new_tokens, eos_token_id=None)  # warm up
      t = time.perf_counter()
      self.backend.generate(ids, mask, max_new_tokens=new_tokens, eos_token_id=None)
      return ids.shape[0] * new_tokens / (time.perf_counter() - t)

    if not self.backend.is_peft:
      trained = tokens_per_s()
      return {"base": trained, "unmerged": trained, "merged": trained}
    with self._adapter_disabled():
      base = tokens_per_s()
    unmerged = tokens_per_s()
    merged, error = None, None
    try:
      self.backend.merge()
    except Exception as exc:  # a method PEFT cannot merge
      error = f"{type(exc).__name__}: {exc}"
    else:
      merged = tokens_per_s()
    return {"base": base, "unmerged": unmerged, "merged": merged, "merge_error": error}

  def peak_memory(self):
    kind = "cuda_max_memory_allocated" if self.backend.device.type == "cuda" else "cpu_peak_rss"
    return self.backend.peak_memory_bytes(), kind

  def param_counts(self):
    return self._counts


RUNNERS = {"jax": JaxRunner, "torch": TorchRunner}


def portable_model_name(source: str | None) -> str | None:
  """How a result names a model: as given (a registry name such as ``smollm2-135m``, a hub id, a relative path),
  with an absolute path inside the project made relative to it; never the cache folder a registry name resolves to.
  """
  if not source or not os.path.isabs(source):
    return source
  root = os.path.dirname(common.EXPERIMENTS_DIR)
  path = os.path.abspath(source)
  return os.path.relpath(path, root) if os.path.commonpath([path, root]) == root else source


# ------------------------------------------------------------------------------------------------------------
# one run, start to end


def get_runner(backend: str):
  if backend not in RUNNERS:
    raise ValueError(f"unknown backend {backend!r}; expected one of {sorted(RUNNERS)}")
  return RUNNERS[backend]


def run_experiment(
  path: str,
  backend: str = "jax",
  *,
  overrides: Mapping[str, Any] | None = None,
  model: str | None = None,
  tokenizer: str | None = None,
  results_dir: str | None = None,
  save_dir: str | None = None,
  checkpoint_dir: str | None = None,
  progress: bool = True,
  lr: float | None = None,
  write: bool = True,
  memory_budget: float | None = None,
  fit_memory: bool = False,
) -> tuple[dict, str | None]:
  """Run one experiment; returns (result dict, path of the written result file or None).

  Args:
    path: the experiment folder.
    backend: ``jax`` or ``torch``.
    overrides: training-params keys to replace (shallow; ``max_new_tokens`` goes into ``generation_kwargs``).
    model, tokenizer: sources instead of the params' ``model_id``.
    results_dir: where to write the result (default ``experiments/results``).
    save_dir: keep the trained adapter there.
    checkpoint_dir: jax only: orbax checkpoints (resume).
    progress: tqdm bars.
    lr: replaces ``optimizer_kwargs["lr"]`` (keeping the other optimizer kwargs).
    write: write the result file.
    memory_budget: jax only: GiB the compiled train step may take (its prediction, before the first step); a run
      predicted above it stops before training, unless ``fit_memory``.
    fit_memory: jax only: over the budget, turn on remat, then micro-batches (same effective batch), until it fits.
  """
  tic = time.perf_counter()
  created = common.now_iso()
  overrides = dict(overrides or {})
  if lr is not None:
    probe = common.load_experiment(path, overrides)
    overrides["optimizer_kwargs"] = dict(probe.params.get("optimizer_kwargs") or {}, lr=float(lr))
  exp = common.load_experiment(path, overrides)
  fixed: dict[str, Any] = {"progress": progress}
  if checkpoint_dir:
    if backend != "jax":
      raise common.ExperimentError("checkpoint_dir (resume) is supported on the jax backend only")
    fixed["checkpoint_dir"] = checkpoint_dir
  config = common.make_train_config(exp, **fixed)
  model_source = model or exp.params.get("model_id")
  if not model_source:
    raise common.ExperimentError("no model: set model_id in the training params or pass --model")
  # the adapter config (errors name its file) and its target modules vs the model's config, before any weight loads
  common.check_adapter_targets(exp, model_source, backend)
  runner_cls = get_runner(backend)
  if backend != "jax" and (memory_budget is not None or fit_memory):
    raise common.ExperimentError("memory_budget and fit_memory need the jax backend (XLA's prediction of the step)")
  if fit_memory and memory_budget is None:
    raise common.ExperimentError("fit_memory needs a memory_budget (GiB)")
  if memory_budget is not None and not memory_budget > 0:
    raise common.ExperimentError(f"memory_budget must be a positive number of GiB, got {memory_budget!r}")
  kwargs = (
    {"checkpoint_dir": checkpoint_dir, "memory_budget": memory_budget, "fit_memory": fit_memory}
    if backend == "jax"
    else {}
  )
  runner = runner_cls(
    exp, config, model_source=model_source, tokenizer_source=tokenizer or model_source, save_dir=save_dir, **kwargs
  )
  runner.check_config()
  data = common.load_data(exp.params)
  logging.info(
    "%s on %s: %d train / %d valid / %d test rows, %d forgetting texts",
    exp.experiment_name,
    backend,
    len(data.train),
    len(data.valid),
    len(data.test),
    len(data.forgetting),
  )

  memory_baseline = common.current_rss_bytes()
  t = time.perf_counter()
  runner.load()
  load_time = time.perf_counter() - t
  try:
    out = runner.run(data)
  except Exception as exc:
    # PEFT keeps a record of runs that failed during training (its cancelled_results/); so does this runner
    if write:
      failed = {
        "run_info": {
          "created_at": created,
          "total_time": time.perf_counter() - tic,
          "experiment_name": exp.experiment_name,
          "backend": backend,
          "train_config": dict(exp.params, model_id=portable_model_name(model_source)),
          "peft_config": exp.peft_config,
          "error_msg": f"{type(exc).__name__}: {exc}",
        },
        "train_info": {"status": "canceled", "metrics": []},
        "meta_info": {"package_info": common.package_info()},
      }
      common.write_result(
        failed, os.path.join(results_dir or common.DEFAULT_RESULTS_DIR, "cancelled"), exp.result_filename(backend)
      )
    raise
  out["load_time_s"] = load_time
  result = build_result(
    exp,
    runner,
    config,
    data,
    out,
    created=created,
    total_time=time.perf_counter() - tic,
    model_source=model_source,
    tokenizer_source=tokenizer or model_source,
    memory_baseline=memory_baseline,
  )
  path_out = None
  if write:
    path_out = common.write_result(result, results_dir or common.DEFAULT_RESULTS_DIR, exp.result_filename(backend))
    logging.info("wrote %s", path_out)
  return result, path_out


def build_result(
  exp, runner, config, data, out, *, created, total_time, model_source, tokenizer_source, memory_baseline
) -> dict:
  """PEFT's result layout, plus the measurements PEFT does not make (see experiments/README.md)."""
  import dataclasses

  losses = out["losses"]
  window = config.eval_steps or len(losses)
  final = {
    "step": len(losses),
    "test accuracy": out["test_accuracy"],
    "train loss": float(sum(losses[-window:]) / len(losses[-window:])) if losses else None,
    "train samples": len(losses) * config.batch_size,
    "train total tokens": out["total_tokens"],
    "forgetting": out["forgetting"]["delta"],
  }
  model_source, tokenizer_source = portable_model_name(model_source), portable_model_name(tokenizer_source)
  train_config = dict(exp.params, model_id=model_source)
  resolved = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("compute_dtype",)}
  backend_info = runner.backend_info()
  return {
    "run_info": {
      "created_at": created,
      "total_time": total_time,
      "experiment_name": exp.experiment_name,
      "backend": runner.name,
      "peft_branch": None,
      "train_config": train_config,
      "resolved_train_config": resolved,
      "peft_config": runner.resolved_peft_config(),
      "peft_type": exp.peft_type,
      "tokenizer": tokenizer_source,
      "error_msg": "",
    },
    "train_info": {
      # PEFT's keys (memory: the peak of the whole run; no average/percentile is sampled here)
      "accelerator_memory_reserved_avg": None,
      "accelerator_memory_max": out["peak_memory_bytes"],
      "accelerator_memory_reserved_99th": None,
      "train_time": out["train_time_s"],
      "file_size": out["checkpoint"]["file_size"],
      "num_trainable_params": out["num_trainable_params"],
      "num_total_params": out["num_total_params"],
      "status": "success",
      "metrics": out["eval_metrics"] + [final],
      # additions
      "test_accuracy": out["test_accuracy"],
      "valid_accuracy": out["valid_accuracy"],
      "peak_memory_bytes": out["peak_memory_bytes"],
      "peak_memory_kind": out["peak_memory_kind"],
      "peak_memory_end_bytes": out["peak_memory_end_bytes"],
      "memory_baseline_bytes": memory_baseline,
      "compile_time": out["compile_time_s"],
      "eval_time": out["eval_time_s"],
      "load_time": out["load_time_s"],
      "setup_time": out["setup_time_s"],
      "tokens_per_sec": out["tokens_per_s"],
      "train_total_tokens": out["total_tokens"],
      "file_size_estimated": out["checkpoint"]["estimated"],
      "checkpoint_path": out["checkpoint"]["path"],
      "forgetting": out["forgetting"],
      "inference": out["inference"],
      "losses": losses,
      "padded_lengths": out["padded_lengths"],
      "batch_schedule_sha256": out["schedule_sha256"],
      "resumed_from": out["resumed_from"],
      "predicted_memory": out.get("predicted_memory"),
      "test_predictions_sample": out["test_predictions"][:3],
    },
    "meta_info": {
      "model_info": {"model_id": model_source, "sha": None, "created_at": None},
      "dataset_info": out["data_info"],
      "package_info": common.package_info(),
      "system_info": common.system_info(runner.accelerator()),
      "pytorch_info": backend_info.pop("pytorch_info", None),
      "backend_info": backend_info,
    },
  }
