"""The training loop of the method comparison: tokenise, bucket, train, evaluate by generation, checkpoint.

One run is :func:`train` (or ``Trainer(...).run()``) with a :class:`TrainConfig` whose fields carry PEFT's
``default_training_params.json`` names. What it does, in order:

* Tokenise every train example once (``jpeft.data.tokenize_example``: the loss is on answer tokens only)
  and fix the whole batch schedule up front: ``bucket_batches`` with seed ``seed + epoch`` for each epoch.
  The schedule depends on the seed and the tokenised lengths only, so a resumed run sees the same batches.
* Each batch is padded to ``batch_size`` rows and to a length from ``padded_length_choices`` (a multiple of
  ``pad_multiple`` capped at ``max_seq_length``), so the jitted step compiles once per padded length.
* The step is ``jpeft.train.make_train_step`` (adapter and optimizer state donated) with
  ``jpeft.optim.make_optimizer`` (AdamW + schedule + grad-norm clipping by default). Dropout keys come from
  one stream, ``key(seed + 1)`` split once per step; the adapter is initialised from ``key(seed)``.
* Every ``eval_steps`` steps: validation accuracy by batched greedy generation on left-padded prompts with
  the adapter applied unmerged, scored with ``jpeft.data.accuracy`` (PEFT's rule); at the end, test accuracy.
* Time: the first step of each padded length is compile time; the others are train time (evaluation and
  checkpointing excluded); tokens/s counts non-pad tokens of the timed steps.
* With ``checkpoint_dir``, orbax checkpoints of the trainable state (adapter, or all params for full
  fine-tuning; never the base), the optimizer state, the rng and the run's logs every ``checkpoint_every``
  steps and at the end, keeping the last ``keep_checkpoints``. A run that finds a checkpoint there continues
  from it and produces exactly the losses of an uninterrupted run.
* A non-finite loss or gradient norm stops the run with :class:`NonFiniteLossError`; the bad state is never
  saved, so the last checkpoint on disk is the last good one.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jpeft import core, optim
from jpeft import sharding as sharding_lib
from jpeft import train as train_lib
from jpeft.data import loaders as data_lib
from jpeft.generate import generate
from jpeft.models.llama import LlamaConfig, loss_positions

# Keys of PEFT's training params that describe the model (read by whoever loads it): accepted, not used here.
_IGNORED_KEYS = ("model_id", "dtype")
# What ``attn_implementation`` may say here: jpeft's attention is one plain softmax attention
# (``softmax(q k^T / sqrt(d) + mask) v``, scores and softmax in float32), which is the math of transformers' "eager"
# and "sdpa" alike; None is transformers' default. Anything else (flash_attention_2, flex_attention, ...) is refused.
ATTN_IMPLEMENTATIONS = (None, "eager", "sdpa")
# The compute dtype of the train step under ``use_amp`` (torch.autocast's bfloat16).
AMP_DTYPE = jnp.bfloat16
_BOOL_FIELDS = ("use_gc", "use_amp", "autocast_adapter_dtype", "compile")
# optimizer_kwargs that PEFT passes to its LoRA-FA factory; jpeft reads rank and alpha from the adapter config.
_IGNORED_OPTIMIZER_KWARGS = ("r", "lora_alpha")
_OPTIMIZER_KWARGS = (
  "lr",
  "weight_decay",
  "betas",
  "eps",
  "loraplus_lr_ratio",
  "loraplus_lr_embedding",
  "loraplus_weight_decay",
)
TORCH_ADAMW_WEIGHT_DECAY = 0.01
# Fields that change the data order or the optimisation: a checkpoint written under other values is refused.
_RESUME_FIELDS = (
  "batch_size",
  "max_steps",
  "max_seq_length",
  "seed",
  "grad_norm_clip",
  "optimizer_type",
  "optimizer_kwargs",
  "lr_scheduler",
  "warmup_steps",
  "query_template",
  "pad_multiple",
  "pad_powers_of_two",
  "bucket_factor",
  "mask_prompt",
  "use_amp",
  "autocast_adapter_dtype",
)


def enable_compilation_cache(path: str | None = None) -> str:
  """Keep XLA's compiled executables on disk (jax's persistent compilation cache), so that a second run of the same
  experiment loads its train step instead of compiling it again. Returns the folder: ``path``, else
  ``$JAX_COMPILATION_CACHE_DIR``, else ``<jpeft cache>/xla`` (``$JPEFT_CACHE``, default ``~/.cache/jpeft``).

  Every executable is kept, however quickly it compiled (jax's default keeps only those over a second).
  """
  from jpeft.models.loading import cache_dir

  path = path or os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(cache_dir(), "xla")
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path


class NonFiniteLossError(FloatingPointError):
  """The loss (or gradient norm) became NaN/inf; the state of that step was not saved."""

  def __init__(self, step: int, value: float, last_checkpoint_step: int | None, losses=(), what="loss"):
    self.step = step
    self.value = value
    self.last_checkpoint_step = last_checkpoint_step
    self.losses = list(losses)
    where = (
      f"the last good checkpoint is step {last_checkpoint_step}"
      if last_checkpoint_step is not None
      else "no checkpoint was saved"
    )
    super().__init__(
      f"non-finite {what} ({value}) at step {step}; training stopped and this state was not saved; {where}"
    )


@dataclasses.dataclass
class TrainConfig:
  """Training parameters; the first block uses the names of PEFT's ``default_training_params.json``.

  Attributes:
    batch_size: train rows per step.
    batch_size_eval: prompts per generation batch.
    max_steps: optimizer steps.
    eval_steps: validate every this many steps (0 or None: only the final test).
    max_seq_length: train examples are cut to this many tokens (prompts too, for generation).
    seed: adapter init ``key(seed)``, dropout ``key(seed + 1)``, data order ``seed + epoch``.
    grad_norm_clip: global-norm clipping (None or 0: off).
    optimizer_type: ``AdamW``, ``lora-fa`` or ``lora+``.
    optimizer_kwargs: ``lr``, ``weight_decay`` and optionally ``betas``, ``eps``, ``loraplus_*``. For AdamW a
      missing ``weight_decay`` is torch's default 0.01, as in PEFT's runs where an experiment's
      ``optimizer_kwargs`` replace the defaults' whole dict.
    lr_scheduler: ``constant``, ``linear`` or ``cosine`` (to 0 at ``max_steps``).
    warmup_steps: linear warmup steps (PEFT's key ``warmup``/``warmup_steps``; 0 unless given).
    query_template: the prompt template.
    max_new_tokens: generation budget per prompt (PEFT's ``generation_kwargs.max_new_tokens``).
    pad_multiple, pad_powers_of_two: the padded lengths (``jpeft.data.padded_length_choices``).
    bucket_factor: batches per length bucket (PEFT's 20).
    mask_prompt: loss on answer tokens only.
    compute_dtype: matmul dtype of the model (None: the params' dtype).
    checkpoint_dir: where orbax checkpoints go (None: no checkpoints).
    checkpoint_every: steps between checkpoints (None: ``eval_steps``, else only at the end).
    keep_checkpoints: how many checkpoints to keep.
    async_checkpointing: write checkpoints in the background (orbax's default).
    progress: show a tqdm bar.
    log_every: absl-log the loss every this many steps.
    head_on_loss_tokens: run the LM head only on positions that carry a label (``jpeft.models.loss_positions``,
      K = half the padded length, or every position when a row has more labels than that); same loss and
      gradients, fewer FLOPs and a smaller logits tensor. At most two compiled steps per padded length.
    max_eval_examples, max_test_examples: cap the evaluation sets (None: all).
    use_gc: PEFT's gradient checkpointing: the train step recomputes each decoder layer in the backward pass
      (``jax.checkpoint``, ``make_train_step(..., remat=True)``) instead of keeping its activations.
    accum_steps: split every batch into this many micro-batches of its rows, computed one after the other
      (``make_train_step(..., accum_steps=)``): the same loss and update as the whole batch with one micro-batch's
      activations in memory (dropout then draws per micro-batch). jax only; set by ``fit_memory``.
    use_amp: PEFT's mixed precision: the train step's forward and backward compute in bfloat16 (``AMP_DTYPE``)
      while the adapter (the master copy the optimizer updates), the gradients and the loss stay float32, as
      under ``torch.autocast(dtype=torch.bfloat16)``. Evaluation and generation keep ``compute_dtype`` (PEFT
      autocasts the train forward only).
    autocast_adapter_dtype: PEFT's ``get_peft_model`` argument: True keeps a fresh adapter in float32 over a
      bfloat16/float16 base; False keeps it in the base dtype.
    compile: accepted either way: jpeft always compiles (every step and generation is ``jax.jit``-ed).
    attn_implementation: None, ``"eager"`` or ``"sdpa"`` (the same math here, see ``ATTN_IMPLEMENTATIONS``);
      any other value is refused.
    init_kv_cache_prefix: must be None: jpeft has no prefix-tuning/cartridge method whose KV prefix it would
      initialise.
  """

  batch_size: int = 4
  batch_size_eval: int = 50
  max_steps: int = 5000
  eval_steps: int | None = 250
  max_seq_length: int = 768
  seed: int = 0
  grad_norm_clip: float | None = 1.0
  optimizer_type: str = "AdamW"
  optimizer_kwargs: dict = dataclasses.field(default_factory=lambda: {"lr": 1e-4, "weight_decay": 0.1})
  lr_scheduler: str = "cosine"
  warmup_steps: int = 0
  query_template: str = data_lib.DEFAULT_QUERY_TEMPLATE
  max_new_tokens: int = 300
  pad_multiple: int = 64
  pad_powers_of_two: bool = False
  bucket_factor: int = data_lib.PEFT_BUCKET_FACTOR
  mask_prompt: bool = True
  compute_dtype: Any = None
  checkpoint_dir: str | None = None
  checkpoint_every: int | None = None
  keep_checkpoints: int = 2
  async_checkpointing: bool = True
  progress: bool = True
  log_every: int = 50
  head_on_loss_tokens: bool = True
  max_eval_examples: int | None = None
  max_test_examples: int | None = None
  use_gc: bool = False
  accum_steps: int = 1
  use_amp: bool = False
  autocast_adapter_dtype: bool = True
  compile: bool = False
  attn_implementation: str | None = None
  init_kv_cache_prefix: str | None = None

  @classmethod
  def from_dict(cls, params: Mapping[str, Any], **overrides) -> "TrainConfig":
    """From PEFT's training-params dict (``default_training_params.json`` merged with an experiment's).

    ``generation_kwargs.max_new_tokens`` and ``warmup``/``warmup_steps`` are mapped; ``model_id`` and ``dtype``
    (read by whoever loads the model) are accepted and ignored; PEFT's switches (``use_gc``, ``use_amp``,
    ``autocast_adapter_dtype``, ``compile``, ``attn_implementation``, ``init_kv_cache_prefix``) are fields; any
    other unknown key is an error. ``overrides`` replace fields after mapping.
    """
    params = dict(params)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    gen = params.pop("generation_kwargs", None) or {}
    if "max_new_tokens" in gen:
      kwargs["max_new_tokens"] = int(gen["max_new_tokens"])
    if "warmup" in params:
      kwargs["warmup_steps"] = int(params.pop("warmup") or 0)
    unknown = []
    for key, value in params.items():
      if key in _IGNORED_KEYS:
        continue
      if key in fields:
        kwargs[key] = value
      else:
        unknown.append(key)
    if unknown:
      raise ValueError(
        f"unknown training params {sorted(unknown)}; known: {sorted(fields)} (ignored: {list(_IGNORED_KEYS)})"
      )
    kwargs.update(overrides)
    return cls(**kwargs)

  def jax_unsupported(self) -> list[str]:
    """Why jpeft cannot run these training params as they say (one message per key); empty when it can."""
    problems = []
    for key in _BOOL_FIELDS:
      if not isinstance(getattr(self, key), bool):
        problems.append(f"{key} must be true or false, got {getattr(self, key)!r}")
    if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
      problems.append(
        f"attn_implementation {self.attn_implementation!r} is not implemented by jpeft, whose attention is a plain "
        f"softmax attention (the math of 'eager' and 'sdpa'); use one of {list(ATTN_IMPLEMENTATIONS)}"
      )
    if self.init_kv_cache_prefix is not None:
      problems.append(
        "init_kv_cache_prefix is not supported by jpeft (it initialises a PREFIX_TUNING/CARTRIDGE adapter's KV "
        "prefix, and jpeft has neither method); use null"
      )
    return problems

  def resume_fingerprint(self) -> dict:
    return {k: _jsonable(getattr(self, k)) for k in _RESUME_FIELDS}


def _jsonable(value):
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  return value


# ------------------------------------------------------------------------------------------------------------
# data


def _records(data) -> list[tuple[str, str]]:
  """(query, response) pairs from a ``datasets.Dataset``, a dict of columns or a list of records."""
  if data is None:
    return []
  if isinstance(data, Mapping):
    columns = data
  elif hasattr(data, "column_names"):
    columns = {c: data[c] for c in data.column_names}
  else:
    rows = list(data)
    if not rows:
      return []
    columns = {k: [r[k] for r in rows] for k in rows[0]}
  for q, r in (("query", "response"), ("question", "answer")):
    if q in columns and r in columns:
      return list(zip(columns[q], columns[r]))
  raise ValueError(f"dataset needs query/response (or question/answer) columns, found {sorted(columns)}")


def batch_schedule(
  lengths: Sequence[int],
  batch_size: int,
  num_steps: int,
  *,
  seed: int,
  bucket_factor: int = data_lib.PEFT_BUCKET_FACTOR,
  pad_to_multiple: int | None = None,
  start_step: int = 0,
) -> list[list[int]]:
  """Example indices of every step's batch: epoch ``e`` is ``bucket_batches`` with seed ``seed + e``.

  A function of its arguments only, so a resumed run recomputes exactly the same order.
  """
  if not len(lengths):
    raise ValueError("the training set is empty")
  out: list[list[int]] = []
  epoch = 0
  while len(out) < num_steps:
    for batch in data_lib.bucket_batches(
      lengths, batch_size, seed=seed + epoch, bucket_factor=bucket_factor, pad_to_multiple=pad_to_multiple
    ):
      out.append(batch)
      if len(out) == num_steps:
        break
    epoch += 1
  return out[start_step:]


# ------------------------------------------------------------------------------------------------------------
# helpers


def optimizer_kwargs(c: TrainConfig) -> dict:
  """The keyword arguments of ``jpeft.optim.make_optimizer`` for these training params."""
  given = dict(c.optimizer_kwargs or {})
  for key in _IGNORED_OPTIMIZER_KWARGS:
    given.pop(key, None)
  unknown = sorted(set(given) - set(_OPTIMIZER_KWARGS))
  if unknown:
    raise ValueError(f"unsupported optimizer_kwargs {unknown}; supported: {list(_OPTIMIZER_KWARGS)}")
  if "lr" not in given:
    raise ValueError("optimizer_kwargs needs 'lr'")
  kind = c.optimizer_type.lower().replace("_", "-")
  if kind in ("lora+", "loraplus"):
    given.setdefault("loraplus_weight_decay", given.get("weight_decay", 0.0))
  if kind in ("lora-fa", "lorafa"):
    given.setdefault("eps", 1e-6)  # PEFT's LoRA-FA default
  if kind in ("adamw", "adam-w"):
    # PEFT replaces the whole optimizer_kwargs dict of the defaults with an experiment's, and
    # torch.optim.AdamW then decays with its own default
    given.setdefault("weight_decay", TORCH_ADAMW_WEIGHT_DECAY)
  if kind not in ("lora+", "loraplus"):
    for key in ("loraplus_lr_ratio", "loraplus_lr_embedding", "loraplus_weight_decay"):
      given.pop(key, None)
  if "betas" in given:
    given["betas"] = tuple(given["betas"])
  return dict(
    given,
    optimizer_type=c.optimizer_type,
    grad_norm_clip=c.grad_norm_clip or None,
    lr_scheduler=c.lr_scheduler,
    warmup_steps=c.warmup_steps,
    total_steps=max(c.max_steps, 1),
  )


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


class Trainer:
  """One training run; see the module docstring. ``run()`` returns the result dict.

  Args:
    model_config: the model's :class:`LlamaConfig`.
    params: base params (never modified; PiSSA/OLoRA-style methods train against their own residual copy).
    peft_config: a jpeft method config, or None for full fine-tuning.
    tokenizer: a Hugging Face-style tokenizer (``__call__``, ``decode``, ``eos_token_id``).
    train_data, valid_data, test_data: datasets with ``query``/``response`` (or ``question``/``answer``).
    config: a :class:`TrainConfig`.
    mesh: an optional ``(data, fsdp)`` mesh (:func:`jpeft.sharding.make_mesh`).
    adapter: a starting adapter instead of a fresh ``core.init``.
    on_step: ``on_step(step, loss, metrics)`` after every step (0-based ``step``), before any eval/save.
  """

  def __init__(
    self,
    model_config: LlamaConfig,
    params,
    peft_config,
    tokenizer,
    train_data,
    valid_data=None,
    test_data=None,
    config: TrainConfig | None = None,
    *,
    mesh=None,
    adapter=None,
    on_step: Callable[[int, float, dict], None] | None = None,
  ):
    self.model_config = model_config
    self.peft_config = peft_config
    self.tokenizer = tokenizer
    self.config = c = config or TrainConfig()
    self.mesh = mesh
    self.on_step = on_step
    if c.max_steps < 0:
      raise ValueError(f"max_steps must be >= 0, got {c.max_steps}")
    problems = c.jax_unsupported()
    if problems:
      raise ValueError("; ".join(problems))
    if mesh is not None and c.batch_size % int(mesh.shape[sharding_lib.DATA]):
      raise ValueError(
        f"batch_size {c.batch_size} is not divisible by the mesh's data size {mesh.shape[sharding_lib.DATA]}"
      )
    if tokenizer.eos_token_id is None:
      raise ValueError("the tokenizer has no eos_token_id")
    self.eos_token_id = int(tokenizer.eos_token_id)
    pad = getattr(tokenizer, "pad_token_id", None)
    self.pad_token_id = int(pad) if pad is not None else self.eos_token_id

    # model and trainable state
    if peft_config is None:
      self.params = {}  # full fine-tuning: the step reads the trainable copy only
      trainable = jax.tree_util.tree_map(jnp.copy, dict(params))
    elif adapter is not None:
      self.params, trainable = dict(params), jax.tree_util.tree_map(jnp.copy, adapter)
    else:
      trainable, self.params = core.init(jax.random.key(c.seed), params, peft_config, model_config)
      if not c.autocast_adapter_dtype:
        trainable = train_lib.adapter_in_base_dtype(trainable, self.params)
    self.num_trainable_params = self._count_trainable(trainable)

    self.optimizer = optim.make_optimizer(trainable, peft_config, **optimizer_kwargs(c))
    # use_amp: the train step alone computes in bfloat16 (PEFT autocasts the train forward, not evaluation)
    self.train_compute_dtype = AMP_DTYPE if c.use_amp else c.compute_dtype
    # executables compiled ahead by predict_memory, by batch shape (and the seconds that took)
    self._aot: dict[tuple[int, bool], Any] = {}
    self._aot_compile_s = 0.0
    if mesh is None:
      # everything committed to one device, as restored checkpoints are: fresh and resumed runs then
      # lower to the same programs
      self.device = jax.devices()[0]
      self.params = jax.device_put(self.params, self.device)
      self.trainable = jax.device_put(trainable, self.device)
      self.opt_state = jax.device_put(jax.jit(self.optimizer.init)(self.trainable), self.device)
    else:
      self.params = sharding_lib.shard_params(self.params, mesh)
      if peft_config is None:
        self.trainable_shardings = sharding_lib.param_shardings(trainable, mesh)
      else:
        self.trainable_shardings = sharding_lib.adapter_shardings(trainable, self.params, mesh, peft_config)
      self.trainable = jax.device_put(trainable, self.trainable_shardings)
      abstract_opt = jax.eval_shape(self.optimizer.init, self.trainable)
      self.opt_shardings = sharding_lib.tree_shardings_like(
        abstract_opt, self.trainable, self.trainable_shardings, mesh
      )
      self.opt_state = jax.jit(self.optimizer.init, out_shardings=self.opt_shardings)(self.trainable)
    self.train_step = self._build_train_step()
    self.rng = self._place_rng(jax.random.key(c.seed + 1))

    # data
    self.train_examples = [
      data_lib.tokenize_example(
        tokenizer, q, r, c.query_template, max_length=c.max_seq_length, mask_prompt=c.mask_prompt
      )
      for q, r in _records(train_data)
    ]
    self.valid_records = _records(valid_data)[: c.max_eval_examples]
    self.test_records = _records(test_data)[: c.max_test_examples]
    self.padded_length_choices = data_lib.padded_length_choices(
      c.max_seq_length, multiple=c.pad_multiple, powers_of_two=c.pad_powers_of_two
    )

  # -- setup helpers -----------------------------------------------------------------------------------------
  def _build_train_step(self):
    c, mesh = self.config, self.mesh
    step_fn = train_lib.make_train_step(
      self.model_config,
      self.peft_config,
      self.optimizer,
      compute_dtype=self.train_compute_dtype,
      donate=mesh is None,
      remat=c.use_gc,
      accum_steps=c.accum_steps,
    )
    self._aot, self._aot_compile_s = {}, 0.0
    if mesh is None:
      return step_fn
    params_shardings = jax.tree_util.tree_map(lambda x: x.sharding, self.params)
    repl = sharding_lib.replicated(mesh)
    return jax.jit(
      step_fn,
      in_shardings=(
        self.trainable_shardings,
        self.opt_shardings,
        params_shardings,
        sharding_lib.batch_sharding(mesh),
        repl,
      ),
      out_shardings=(self.trainable_shardings, self.opt_shardings, repl),
      donate_argnums=(0, 1),
    )

  def _largest_batch(self):
    """The schedule's batch with the longest padded length (the step's largest shapes), built as the run builds it."""
    schedule = self.schedule()
    if not schedule:
      return None
    return self.make_batch(max(schedule, key=self.padded_length))

  def predict_memory(self) -> dict | None:
    """The compiled train step's memory at the schedule's longest padded length, before any step runs.

    XLA's buffer assignment of the step (``compiled.memory_analysis()``): ``argument_bytes`` (base params, adapter,
    optimizer state, batch), ``output_bytes``, ``temp_bytes`` (activations kept for the backward pass and every other
    intermediate) and ``alias_bytes`` (outputs written into donated inputs); ``peak_bytes`` = arguments + outputs +
    temporaries - aliases is what the step needs on the device at once. The executable is kept and used by
    :meth:`run` for that shape, so the prediction costs no second compilation. None without a schedule (0 steps).
    """
    built = self._largest_batch()
    if built is None:
      return None
    batch, length, _ = built
    t = time.perf_counter()
    compiled = self.train_step.lower(self.trainable, self.opt_state, self.params, batch, self.rng).compile()
    seconds = time.perf_counter() - t
    self._aot[(length, "loss_positions" in batch)] = compiled
    self._aot_compile_s += seconds
    out = train_lib.memory_stats(compiled)
    out.update(
      padded_length=length,
      batch_size=self.config.batch_size,
      use_gc=self.config.use_gc,
      accum_steps=self.config.accum_steps,
      compile_time_s=seconds,
    )
    return out

  def fit_memory(self, budget_bytes: int) -> tuple[dict | None, list[dict]]:
    """Turn on remat (``use_gc``), then split each batch into 2, 4, ... micro-batches, until the predicted step fits
    ``budget_bytes``; the effective batch, the data order and the loss stay the same.

    Returns ``(the prediction that fits, every prediction tried)``; the first is None when nothing fits (the trainer
    is then left at the last setting tried). Only settings that fit are worth a run, so each try compiles the step.
    """
    tried = []
    options = [(self.config.use_gc, self.config.accum_steps), (True, self.config.accum_steps)]
    k = self.config.accum_steps * 2
    while k <= self.config.batch_size:
      if self.config.batch_size % k == 0:
        options.append((True, k))
      k *= 2
    seen = set()
    for use_gc, accum in options:
      if (use_gc, accum) in seen:
        continue
      seen.add((use_gc, accum))
      if accum > 1 and core.batch_coupled(self.peft_config):
        break
      if (use_gc, accum) != (self.config.use_gc, self.config.accum_steps):
        self.config = dataclasses.replace(self.config, use_gc=use_gc, accum_steps=accum)
        self.train_step = self._build_train_step()
      prediction = self.predict_memory()
      if prediction is None:
        return None, tried
      tried.append(prediction)
      if prediction["peak_bytes"] <= budget_bytes:
        return prediction, tried
    return None, tried

  def _place_rng(self, key):
    if self.mesh is not None:
      return jax.device_put(key, sharding_lib.replicated(self.mesh))
    return jax.device_put(key, self.device)

  def _count_trainable(self, trainable) -> int:
    if self.peft_config is None:
      return core.num_params(trainable)
    mask = core.trainable_mask(trainable, self.peft_config)
    return int(sum(v.size for m, ts in trainable.items() for t, v in ts.items() if mask[m][t]))

  def lr_at(self, step: int) -> float:
    c = self.config
    return optim.lr_at(
      {
        "lr": c.optimizer_kwargs["lr"],
        "lr_scheduler": c.lr_scheduler,
        "warmup_steps": c.warmup_steps,
        "total_steps": max(c.max_steps, 1),
      },
      step,
    )

  # -- batches -----------------------------------------------------------------------------------------------
  def padded_length(self, indices: Sequence[int]) -> int:
    c = self.config
    longest = max(len(self.train_examples[i]["input_ids"]) for i in indices)
    return data_lib.choose_padded_length(
      longest, multiple=c.pad_multiple, max_length=c.max_seq_length, powers_of_two=c.pad_powers_of_two
    )

  def make_batch(self, indices: Sequence[int]) -> tuple[dict, int, int]:
    """The device batch for these examples, its padded length and its number of non-pad tokens."""
    c = self.config
    length = self.padded_length(indices)
    # a batch-coupled method (Lily) must see the batch PEFT sees: no filler rows, and an adapted head on every position
    coupled = core.batch_coupled(self.peft_config)
    batch = data_lib.collate(
      [self.train_examples[i] for i in indices],
      pad_token_id=self.pad_token_id,
      length=length,
      batch_size=None if coupled else c.batch_size,
    )
    tokens = int(batch["attention_mask"].sum())
    if c.head_on_loss_tokens and not (coupled and "lm_head" in (self.trainable or {})):
      gathered = loss_positions(batch["labels"], width=max(length // 2, 1))
      if gathered is not None:
        batch["loss_positions"], batch["loss_targets"] = gathered
    if self.mesh is not None:
      return sharding_lib.shard_batch(batch, self.mesh), length, tokens
    return jax.device_put(batch, self.device), length, tokens

  def schedule(self, start_step: int = 0) -> list[list[int]]:
    c = self.config
    lengths = [len(ex["input_ids"]) for ex in self.train_examples]
    return batch_schedule(
      lengths,
      c.batch_size,
      c.max_steps,
      seed=c.seed,
      bucket_factor=c.bucket_factor,
      pad_to_multiple=None if c.pad_powers_of_two else c.pad_multiple,
      start_step=start_step,
    )

  # -- evaluation --------------------------------------------------------------------------------------------
  def model_params(self, trainable=None):
    """Params for inference: the adapter applied unmerged (or the trained params for full fine-tuning)."""
    trainable = self.trainable if trainable is None else trainable
    if self.peft_config is None:
      return trainable
    return core.apply(self.params, trainable, self.peft_config, model_config=self.model_config)

  def generate_texts(self, queries: Sequence[str], trainable=None) -> list[str]:
    """Greedy completions of the formatted prompts, in batches of ``batch_size_eval`` left-padded rows."""
    c = self.config
    if not queries:
      return []
    model_params = self.model_params(trainable)
    prompts = [
      data_lib.tokenize_prompt(self.tokenizer, q, c.query_template, max_length=c.max_seq_length) for q in queries
    ]
    rows = max(1, min(c.batch_size_eval, len(prompts)))
    texts: list[str] = []
    for start in range(0, len(prompts), rows):
      chunk = prompts[start : start + rows]
      # filler rows (one compiled shape for every chunk) must hold a real last token; none for a batch-coupled
      # method (Lily), whose outputs they would change
      filled = chunk if core.batch_coupled(self.peft_config) else chunk + [chunk[0]] * (rows - len(chunk))
      length = data_lib.choose_padded_length(
        max(len(p) for p in filled), multiple=c.pad_multiple, powers_of_two=c.pad_powers_of_two
      )
      ids = np.full((len(filled), length), self.pad_token_id, np.int32)
      mask = np.zeros((len(filled), length), np.int32)
      for i, p in enumerate(filled):
        ids[i, length - len(p) :] = p
        mask[i, length - len(p) :] = 1
      new = generate(
        model_params,
        self.model_config,
        ids,
        mask,
        max_new_tokens=c.max_new_tokens,
        eos_token_id=self.eos_token_id,
        pad_token_id=self.pad_token_id,
        compute_dtype=c.compute_dtype,
      )
      for row in new[: len(chunk)]:
        row = [int(t) for t in row]
        if self.eos_token_id in row:
          row = row[: row.index(self.eos_token_id)]
        texts.append(self.tokenizer.decode(row, skip_special_tokens=True))
    return texts

  def evaluate(self, records: Sequence[tuple[str, str]], trainable=None) -> tuple[float | None, list[str]]:
    """(accuracy by PEFT's rule, predictions) of greedy generation on (query, response) records."""
    if not records:
      return None, []
    predictions = self.generate_texts([q for q, _ in records], trainable)
    return data_lib.accuracy(predictions, [r for _, r in records]), predictions

  # -- checkpoints -------------------------------------------------------------------------------------------
  def _manager(self):
    import orbax.checkpoint as ocp

    c = self.config
    options = ocp.CheckpointManagerOptions(
      max_to_keep=c.keep_checkpoints,
      create=True,
      enable_async_checkpointing=c.async_checkpointing,
      cleanup_tmp_directories=True,
    )
    return ocp.CheckpointManager(os.path.abspath(c.checkpoint_dir), options=options)

  def _arrays(self) -> dict:
    return {"trainable": self.trainable, "opt_state": self.opt_state, "rng": jax.random.key_data(self.rng)}

  def _save(self, manager, step: int, log: dict) -> None:
    import orbax.checkpoint as ocp

    finite = bool(_all_finite(self.trainable))
    if not finite:
      manager.wait_until_finished()
      raise NonFiniteLossError(step, float("nan"), manager.latest_step(), log["losses"], what="trainable parameters")
    # A deep copy: the write is asynchronous, and the loop goes on appending to the log's lists, so a meta that
    # shared them could be serialised with the next step's loss beside this step's state (a run resumed one step
    # late, on the wrong batches and learning rates).
    meta = _jsonable(dict(log, step=step, fingerprint=self.config.resume_fingerprint()))
    # A snapshot of its own for the asynchronous save: the next train step donates the adapter's and the optimizer
    # state's buffers, and on a CPU a background write from a zero-copy host view of a buffer that the step then
    # reuses in place would mix two steps. It costs one extra copy of what is saved until the write is done.
    snapshot = jax.block_until_ready(jax.tree_util.tree_map(jnp.copy, self._arrays()))
    manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(snapshot), meta=ocp.args.JsonSave(meta)),
      force=True,
    )

  def _restore(self, manager) -> dict | None:
    import orbax.checkpoint as ocp

    step = manager.latest_step()
    if step is None:
      return None
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, self._arrays())
    restored = manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
    )
    meta = restored["meta"]
    saved, now = meta.get("fingerprint", {}), self.config.resume_fingerprint()
    diff = sorted(k for k in now if k in saved and _jsonable(saved[k]) != now[k])
    if diff:
      raise ValueError(
        f"checkpoint {self.config.checkpoint_dir!r} step {step} was written with other training "
        f"params: {[(k, saved[k], now[k]) for k in diff]}; use another checkpoint_dir"
      )
    losses = meta.get("losses", [])
    if len(losses) != step or [m["step"] for m in meta.get("eval_metrics", []) if m["step"] > step]:
      raise ValueError(
        f"checkpoint {self.config.checkpoint_dir!r} step {step} is inconsistent: its log holds {len(losses)} "
        f"losses (expected {step}); it was written by a faulty save, use another checkpoint_dir"
      )
    state = restored["state"]
    self.trainable, self.opt_state = state["trainable"], state["opt_state"]
    self.rng = self._place_rng(jax.random.wrap_key_data(state["rng"]))
    logging.info("resumed from %s at step %d", self.config.checkpoint_dir, step)
    return meta

  # -- the loop ----------------------------------------------------------------------------------------------
  def run(self) -> dict:
    c = self.config
    wall0 = time.perf_counter()
    log = {
      "losses": [],
      "eval_metrics": [],
      "train_time_s": 0.0,
      "compile_time_s": 0.0,
      "eval_time_s": 0.0,
      "checkpoint_time_s": 0.0,
      "timed_tokens": 0,
      "total_tokens": 0,
      "elapsed_s": 0.0,
    }
    manager = self._manager() if c.checkpoint_dir else None
    every = c.checkpoint_every if c.checkpoint_every else (c.eval_steps or 0)
    resumed_from = None
    bar = None
    try:
      if manager is not None:
        meta = self._restore(manager)
        if meta is not None:
          resumed_from = int(meta["step"])
          log.update({k: meta[k] for k in log if k in meta})
      start = len(log["losses"])
      log["compile_time_s"] += self._aot_compile_s  # predict_memory's compilation serves this run
      self._aot_compile_s = 0.0
      elapsed0 = log["elapsed_s"]
      compiled: set[tuple[int, bool]] = set()
      schedule = self.schedule(start)
      bar = _progress(c.max_steps, start, c.progress)
      next_batch = self.make_batch(schedule[0]) if schedule else None
      for i, step in enumerate(range(start, c.max_steps)):
        batch, length, tokens = next_batch
        self.rng, sub = jax.random.split(self.rng)
        t0 = time.perf_counter()
        shape = (length, "loss_positions" in batch)
        step_fn = self._aot.get(shape, self.train_step)
        self.trainable, self.opt_state, metrics = step_fn(self.trainable, self.opt_state, self.params, batch, sub)
        next_batch = self.make_batch(schedule[i + 1]) if i + 1 < len(schedule) else None
        loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
        dt = time.perf_counter() - t0
        if shape in self._aot and shape not in compiled:
          compiled.add(shape)  # compiled ahead (predict_memory): this step is a timed one
        if shape in compiled:
          log["train_time_s"] += dt
          log["timed_tokens"] += tokens
        else:
          compiled.add(shape)
          log["compile_time_s"] += dt
          logging.info(
            "step %d: compiled the train step for padded length %d%s in %.2fs",
            step,
            length,
            " (head on loss tokens)" if shape[1] else "",
            dt,
          )
        log["total_tokens"] += tokens
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
          bad, what = (loss, "loss") if not math.isfinite(loss) else (grad_norm, "gradient norm")
          last = None
          if manager is not None:
            manager.wait_until_finished()
            last = manager.latest_step()
          raise NonFiniteLossError(step, bad, last, log["losses"], what=what)
        log["losses"].append(loss)
        if self.on_step is not None:
          self.on_step(step, loss, {"grad_norm": grad_norm, "padded_length": length, "tokens": tokens})
        tok_s = _rate(log) or 0.0
        if bar is not None:
          bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.lr_at(step):.2e}", tok_s=f"{tok_s:.0f}", refresh=False)
          bar.update(1)
        if c.log_every and (step + 1) % c.log_every == 0:
          logging.info(
            "step %d/%d loss %.4f lr %.3e grad_norm %.3f tokens/s %.0f",
            step + 1,
            c.max_steps,
            loss,
            self.lr_at(step),
            grad_norm,
            tok_s,
          )
        done = step + 1
        if c.eval_steps and done % c.eval_steps == 0 and self.valid_records:
          t = time.perf_counter()
          acc, _ = self.evaluate(self.valid_records)
          eval_time = time.perf_counter() - t
          log["eval_time_s"] += eval_time
          prev = log["eval_metrics"][-1]["step"] if log["eval_metrics"] else 0
          entry = {
            "step": done,
            "valid_accuracy": acc,
            "train_loss": float(np.mean(log["losses"][prev:done])),
            "train_samples": done * c.batch_size,
            "train_time_s": log["train_time_s"],
            "eval_time_s": eval_time,
            "tokens_per_s": _rate(log),
            "elapsed_s": elapsed0 + time.perf_counter() - wall0,
          }
          log["eval_metrics"].append(entry)
          logging.info("step %d: valid accuracy %.4f, train loss %.4f", done, acc, entry["train_loss"])
        if manager is not None and ((every and done % every == 0) or done == c.max_steps):
          t = time.perf_counter()
          log["elapsed_s"] = elapsed0 + time.perf_counter() - wall0
          self._save(manager, done, log)
          log["checkpoint_time_s"] += time.perf_counter() - t
      t = time.perf_counter()
      test_acc, test_predictions = self.evaluate(self.test_records)
      log["eval_time_s"] += time.perf_counter() - t
      if manager is not None:
        manager.wait_until_finished()
    finally:
      if bar is not None:
        bar.close()
      if manager is not None:
        manager.close()
    log["elapsed_s"] = elapsed0 + time.perf_counter() - wall0
    valid = [m["valid_accuracy"] for m in log["eval_metrics"]]
    return {
      "losses": list(log["losses"]),
      "eval_metrics": list(log["eval_metrics"]),
      "valid_accuracy": valid[-1] if valid else None,
      "test_accuracy": test_acc,
      "test_predictions": test_predictions,
      "train_time_s": log["train_time_s"],
      "compile_time_s": log["compile_time_s"],
      "eval_time_s": log["eval_time_s"],
      "checkpoint_time_s": log["checkpoint_time_s"],
      "elapsed_s": log["elapsed_s"],
      "tokens_per_s": _rate(log),
      "total_tokens": log["total_tokens"],
      "num_trainable_params": self.num_trainable_params,
      "padded_lengths": sorted({length for length, _ in compiled}),
      "resumed_from": resumed_from,
      "trainable": self.trainable,
      "opt_state": self.opt_state,
    }


def _rate(log) -> float | None:
  return log["timed_tokens"] / log["train_time_s"] if log["train_time_s"] > 0 else None


def _progress(total: int, initial: int, enabled: bool):
  if not enabled:
    return None
  from tqdm.auto import tqdm

  return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)


def train(
  model_config: LlamaConfig,
  params,
  peft_config,
  tokenizer,
  train_data,
  valid_data=None,
  test_data=None,
  config: TrainConfig | None = None,
  **kwargs,
) -> dict:
  """``Trainer(...).run()``: see :class:`Trainer` for the arguments and the module docstring for the loop."""
  return Trainer(
    model_config, params, peft_config, tokenizer, train_data, valid_data, test_data, config, **kwargs
  ).run()
