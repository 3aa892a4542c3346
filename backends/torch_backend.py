"""The reference backend: transformers models with Hugging Face PEFT adapters, on torch."""

from __future__ import annotations

import contextlib
import glob
import os
import resource
import sys
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from backends.base import (
  LR_SCHEDULERS,
  Backend,
  check_state_keys,
  is_full_finetuning,
  normalize_optimizer_type,
)
from jpeft.models.loading import resolve_source as _resolve_model_source

_DTYPES = {
  "float32": torch.float32,
  "fp32": torch.float32,
  "bfloat16": torch.bfloat16,
  "bf16": torch.bfloat16,
  "float16": torch.float16,
  "fp16": torch.float16,
}


_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq")


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
  if isinstance(dtype, torch.dtype):
    return dtype
  try:
    return _DTYPES[str(dtype).lower()]
  except KeyError:
    raise ValueError(f"unsupported dtype {dtype!r}; expected one of {sorted(_DTYPES)}") from None


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
  tensor = tensor.detach()
  if tensor.dtype in (torch.bfloat16,):
    tensor = tensor.float()
  return tensor.cpu().clone().numpy()


def _is_checkpointing(model) -> bool:
  """transformers' ``is_activation_checkpointing`` (``is_gradient_checkpointing`` before 5.x)."""
  if hasattr(type(model), "is_activation_checkpointing"):
    return bool(model.is_activation_checkpointing)
  return bool(model.is_gradient_checkpointing)


def resolve_source(source: str) -> str:
  """Map an embedded-model registry name to its converted local folder; anything else unchanged."""
  return _resolve_model_source(source)


class TorchBackend(Backend):
  """transformers ``AutoModelForCausalLM`` + PEFT; one adapter (named ``"default"``) at a time."""

  name = "torch"
  adapter_name = "default"

  def __init__(self, device: str | None = None):
    if device is None:
      device = "cuda" if torch.cuda.is_available() else "cpu"
    self.device = torch.device(device)
    self.model: torch.nn.Module | None = None
    self.source: str | None = None
    self.dtype: torch.dtype = torch.float32
    self._full = False
    self._merged = False
    self._optimizer: torch.optim.Optimizer | None = None
    self._scheduler = None
    self._grad_norm_clip: float | None = None
    self._trainable_ids: set[int] = set()
    self.attn_implementation: str | None = None
    # set_training_options (PEFT's use_gc, use_amp, compile); kept across load_base / attach_adapter
    self.gradient_checkpointing = False
    self.amp = False
    self.compile = False

  # ------------------------------------------------------------------ model state

  def _require_model(self) -> torch.nn.Module:
    if self.model is None:
      raise RuntimeError("no base model loaded; call load_base first")
    return self.model

  @property
  def is_peft(self) -> bool:
    from peft import PeftModel

    return isinstance(self.model, PeftModel)

  @property
  def peft_config(self):
    """The attached adapter's ``PeftConfig``, or ``None``."""
    return self.model.peft_config[self.adapter_name] if self.is_peft else None

  def base_model(self) -> torch.nn.Module:
    """The transformers model underneath any adapter."""
    model = self._require_model()
    return model.get_base_model() if self.is_peft else model

  def _remember_trainable(self) -> None:
    """Record which parameters the adapter trains, before any optimizer freezes some of them."""
    self._trainable_ids = {id(p) for p in self._require_model().parameters() if p.requires_grad}

  def _reset_training(self) -> None:
    self._optimizer = None
    self._scheduler = None
    self._grad_norm_clip = None

  def _detach_adapter(self) -> torch.nn.Module:
    """Remove any adapter (without merging) and return the plain transformers model."""
    model = self._require_model()
    if self.is_peft:
      config = self.peft_config
      init = getattr(config, "init_lora_weights", None)
      rewrites_base = isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS)
      if (rewrites_base or getattr(config, "modules_to_save", None)) and self.source:
        # These initialisations rewrite the base weights, which unloading does not undo; and
        # unloading a modules_to_save adapter leaves the trained copy in the base model.
        self.load_base(self.source, dtype=self.dtype, attn_implementation=self.attn_implementation)
        return self.model
      model = model.get_base_model() if config.is_prompt_learning else model.unload()
    for param in model.parameters():
      param.requires_grad_(False)
    self.model = model
    self._full = False
    self._trainable_ids = set()
    self._reset_training()
    return model

  def load_base(self, source: str, *, dtype: str = "float32", attn_implementation: str | None = None) -> None:
    from transformers import AutoModelForCausalLM

    torch_dtype = _torch_dtype(dtype)
    path = resolve_source(source)
    kwargs = {"dtype": torch_dtype}
    if attn_implementation is not None:  # None: transformers' default (sdpa where available)
      kwargs["attn_implementation"] = attn_implementation
    if path.lower().endswith(".gguf"):
      if not os.path.isfile(path):
        raise FileNotFoundError(path)
      folder, filename = os.path.split(os.path.abspath(path))
      model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, **kwargs)
    else:
      model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.to(self.device)
    for param in model.parameters():
      param.requires_grad_(False)
    model.eval()
    self.model = model
    self.source = path
    self.dtype = torch_dtype
    self.attn_implementation = attn_implementation
    self._full = False
    self._merged = False
    self._reset_training()
    self._apply_training_options()

  def attach_adapter(self, peft_config: dict, *, seed: int = 0, autocast_adapter_dtype: bool = True) -> None:
    from peft import PeftConfig, get_peft_model

    base = self._detach_adapter()
    torch.manual_seed(seed)
    if torch.cuda.is_available():
      torch.cuda.manual_seed_all(seed)
    if is_full_finetuning(peft_config):
      for param in base.parameters():
        param.requires_grad_(True)
      self._full = True
      self._remember_trainable()
      self._apply_training_options()
      return
    config_dict = dict(peft_config)
    if config_dict.get("task_type") is None:
      config_dict["task_type"] = "CAUSAL_LM"
    config = PeftConfig.from_peft_type(**config_dict)
    self.model = get_peft_model(
      base, config, adapter_name=self.adapter_name, autocast_adapter_dtype=autocast_adapter_dtype
    )
    self._remember_trainable()
    self._apply_training_options()

  # ------------------------------------------------------------------ training options

  def set_training_options(self, *, gradient_checkpointing: bool = False, amp: bool = False, compile: bool = False):
    """PEFT's method_comparison switches: ``gradient_checkpointing`` (``use_gc``) is transformers' activation
    checkpointing with ``use_reentrant=False`` (plus ``enable_input_require_grads``, as PEFT's suite calls it);
    ``amp`` (``use_amp``) runs the train forward under ``torch.autocast(<device>, dtype=torch.bfloat16)`` (no
    gradient scaler: bfloat16 has float32's exponent range); ``compile`` compiles the model in place
    (``nn.Module.compile(dynamic=True)``, PEFT's ``torch.compile(model, dynamic=True)``), lazily at its first call.
    """
    self.gradient_checkpointing, self.amp, self.compile = bool(gradient_checkpointing), bool(amp), bool(compile)
    if self.model is not None:
      self._apply_training_options()

  @property
  def is_compiled(self) -> bool:
    return getattr(self.model, "_compiled_call_impl", None) is not None

  def _apply_training_options(self) -> None:
    model = self._require_model()
    base = self.base_model()
    if self.gradient_checkpointing:
      if not _is_checkpointing(base):
        if hasattr(base, "activation_checkpointing_enable"):
          base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:  # transformers < 5.x
          base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
      if not getattr(base, "_require_grads_hooks", None):
        base.enable_input_require_grads()
    elif _is_checkpointing(base):
      if hasattr(base, "activation_checkpointing_disable"):
        base.activation_checkpointing_disable()
      else:
        base.gradient_checkpointing_disable()
      base.disable_input_require_grads()
    if model is not base and getattr(base, "_compiled_call_impl", None) is not None:
      base._compiled_call_impl = None  # compiled as a full fine-tuning model; now the adapter model is compiled
    if self.compile and not self.is_compiled:
      model.compile(dynamic=True)
    elif not self.compile and self.is_compiled:
      model._compiled_call_impl = None

  def _autocast(self):
    if not self.amp:
      return contextlib.nullcontext()
    return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

  def init_kv_cache_prefix(self, tokenizer, text: str) -> None:
    """PEFT's ``initialize_kv_prefix_from_text``: the base model's KV cache of ``text`` becomes the prefix of the
    attached PREFIX_TUNING / CARTRIDGE adapter (PEFT's method_comparison ``init_kv_cache_prefix``)."""
    from peft import initialize_kv_prefix_from_text

    if not self.is_peft:
      raise ValueError("init_kv_cache_prefix needs a PREFIX_TUNING or CARTRIDGE adapter; none is attached")
    initialize_kv_prefix_from_text(self.model, tokenizer, text=text)

  # ------------------------------------------------------------------ adapter tensors

  @contextlib.contextmanager
  def _without_base_name(self) -> Iterator[None]:
    """Hide ``base_model_name_or_path`` so PEFT does not look the base model up on the hub.

    PEFT only uses it to detect a resized vocabulary, which this backend never does.
    """
    config = self.peft_config
    saved = config.base_model_name_or_path
    config.base_model_name_or_path = None
    try:
      yield
    finally:
      config.base_model_name_or_path = saved

  def _peft_state_dict(self) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    with self._without_base_name():
      return get_peft_model_state_dict(self.model, adapter_name=self.adapter_name)

  def _require_adapter(self) -> None:
    self._require_model()
    if not (self._full or self.is_peft):
      what = "the adapter was merged" if self._merged else "no adapter attached"
      raise RuntimeError(f"{what}; call attach_adapter or load_adapter first")

  def _live_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.nn.Parameter]]:
    """The adapter tensors keyed in saved format, and the parameters behind those keys that have one."""
    self._require_adapter()
    if self._full:
      params = dict(self.model.named_parameters())
      return dict(params), params
    state = self._peft_state_dict()
    by_storage = {(p.data_ptr(), tuple(p.shape), p.dtype): p for p in self.model.parameters()}
    params: dict[str, torch.nn.Parameter] = {}
    for key, value in state.items():
      param = by_storage.get((value.data_ptr(), tuple(value.shape), value.dtype))
      if param is None and self.peft_config.is_prompt_learning and key == "prompt_embeddings":
        encoder = self.model.prompt_encoder[self.adapter_name]
        weight = getattr(getattr(encoder, "embedding", None), "weight", None)
        if weight is not None and tuple(weight.shape) == tuple(value.shape):
          param = weight
      if param is not None:
        params[key] = param
    return state, params

  def adapter_state_dict(self) -> dict[str, np.ndarray]:
    state, _ = self._live_tensors()
    return {key: _to_numpy(value) for key, value in state.items()}

  def set_adapter_state_dict(self, state: dict[str, np.ndarray]) -> None:
    current, params = self._live_tensors()
    check_state_keys(current, state)
    if self._full:
      with torch.no_grad():
        for key, param in params.items():
          param.copy_(torch.as_tensor(np.asarray(state[key])).to(param.dtype))
      return
    from peft import set_peft_model_state_dict

    tensors = {
      key: torch.as_tensor(np.array(state[key])).to(device=current[key].device, dtype=current[key].dtype)
      for key in current
    }
    result = set_peft_model_state_dict(self.model, tensors, adapter_name=self.adapter_name)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if self.peft_config.is_prompt_learning:
      # PEFT loads this one into the prompt encoder separately, after reporting it as unexpected.
      unexpected = [k for k in unexpected if k != "prompt_embeddings"]
    if unexpected:
      raise ValueError(f"PEFT did not use these adapter keys: {sorted(unexpected)}")
    loaded = self._peft_state_dict()
    stale = [k for k in tensors if not torch.equal(loaded[k].detach().cpu(), tensors[k].cpu())]
    if stale:
      raise ValueError(f"adapter keys were accepted but not loaded into the model: {sorted(stale)}")

  def _save_embedding_layers(self) -> bool:
    from peft import get_peft_model_state_dict

    with_auto = set(self._peft_state_dict())
    without = set(get_peft_model_state_dict(self.model, adapter_name=self.adapter_name, save_embedding_layers=False))
    return with_auto != without

  def save_adapter(self, folder: str) -> None:
    self._require_adapter()
    os.makedirs(folder, exist_ok=True)
    if self._full:
      self.model.save_pretrained(folder, safe_serialization=True)
      return
    self.model.save_pretrained(
      folder,
      selected_adapters=[self.adapter_name],
      safe_serialization=True,
      save_embedding_layers=self._save_embedding_layers(),
    )

  def load_adapter(self, folder: str, *, is_trainable: bool = True) -> None:
    from peft import PeftConfig, PeftModel
    from peft.utils import load_peft_weights

    is_full_checkpoint = os.path.isdir(folder) and not os.path.isfile(os.path.join(folder, "adapter_config.json"))
    if is_full_checkpoint:
      self._load_full(folder, is_trainable=is_trainable)
      return
    config = PeftConfig.from_pretrained(folder)
    file_state = load_peft_weights(folder, device="cpu")
    base = self._detach_adapter()
    # PEFT refuses to load prompt-learning adapters as trainable; load them frozen and unfreeze
    # the prompt encoder, which is what get_peft_model would have left trainable.
    unfreeze_prompt = bool(config.is_prompt_learning and is_trainable)
    self.model = PeftModel.from_pretrained(
      base, folder, adapter_name=self.adapter_name, is_trainable=is_trainable and not unfreeze_prompt
    )
    if unfreeze_prompt:
      self.peft_config.inference_mode = False
      for param in self.model.prompt_encoder.parameters():
        param.requires_grad_(True)
    self._remember_trainable()
    try:
      check_state_keys(self._peft_state_dict(), file_state, what=f"adapter weights in {folder}")
    except ValueError:
      self._detach_adapter()
      raise
    self._apply_training_options()

  def _load_full(self, folder: str, *, is_trainable: bool) -> None:
    from safetensors.torch import load_file

    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
      raise FileNotFoundError(f"{folder} has neither adapter_config.json nor *.safetensors weights")
    state: dict[str, np.ndarray] = {}
    for file in files:
      state.update({k: _to_numpy(v) for k, v in load_file(file).items()})
    base = self._detach_adapter()
    for param in base.parameters():
      param.requires_grad_(True)
    self._full = True
    self.set_adapter_state_dict(state)
    if not is_trainable:
      for param in base.parameters():
        param.requires_grad_(False)
    self._remember_trainable()
    self._apply_training_options()

  # ------------------------------------------------------------------ forward passes

  def _inputs(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> dict[str, torch.Tensor]:
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long, device=self.device)
    mask = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long, device=self.device)
    if ids.shape != mask.shape or ids.ndim != 2:
      raise ValueError(f"input_ids {tuple(ids.shape)} and attention_mask {tuple(mask.shape)} must be equal (B, T)")
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids}

  def _forward(self, input_ids, attention_mask, labels=None):
    inputs = self._inputs(input_ids, attention_mask)
    if self.is_peft and self.peft_config.is_prompt_learning:
      # PEFT ignores position ids for prompt-learning methods (it numbers virtual tokens first).
      del inputs["position_ids"]
    if labels is not None:
      inputs["labels"] = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=self.device)
    return self.model(**inputs, use_cache=False)

  def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    model = self._require_model()
    model.eval()
    with torch.no_grad():
      out = self._forward(input_ids, attention_mask)
    logits = out.logits
    # Prompt tuning / P-tuning prepend virtual tokens; only the positions of the input are returned.
    logits = logits[:, logits.shape[1] - np.shape(input_ids)[1] :]
    return logits.float().cpu().numpy()

  def loss_and_grads(
    self, input_ids: np.ndarray, attention_mask: np.ndarray, labels: np.ndarray
  ) -> tuple[float, dict[str, np.ndarray]]:
    _, params = self._live_tensors()
    params = {key: p for key, p in params.items() if id(p) in self._trainable_ids}
    model = self.model
    saved_flags = {id(p): p.requires_grad for p in model.parameters()}
    saved_grads = {id(p): p.grad for p in model.parameters()}
    try:
      for param in model.parameters():
        param.grad = None
      for param in params.values():
        param.requires_grad_(True)
      model.train()
      with self._autocast():
        loss = self._forward(input_ids, attention_mask, labels).loss
      loss.backward()
      grads = {
        key: _to_numpy(p.grad) if p.grad is not None else np.zeros(tuple(p.shape), dtype=np.float32)
        for key, p in params.items()
      }
    finally:
      for param in model.parameters():
        param.requires_grad_(saved_flags[id(param)])
        param.grad = saved_grads[id(param)]
    return float(loss.detach().cpu().item()), grads

  # ------------------------------------------------------------------ training

  def _trainable_parameters(self) -> list[torch.nn.Parameter]:
    return [p for p in self._require_model().parameters() if p.requires_grad]

  def configure_optimizer(
    self,
    *,
    lr: float,
    weight_decay: float = 0.0,
    betas: Sequence[float] = (0.9, 0.999),
    eps: float = 1e-8,
    grad_norm_clip: float | None = None,
    optimizer_type: str = "AdamW",
    warmup_steps: int = 0,
    total_steps: int | None = None,
    lr_scheduler: str = "constant",
    loraplus_lr_ratio: float | None = None,
  ) -> None:
    from transformers import get_scheduler

    self._require_adapter()
    kind = normalize_optimizer_type(optimizer_type)
    betas = (float(betas[0]), float(betas[1]))
    if kind == "AdamW":
      optimizer = torch.optim.AdamW(
        self._trainable_parameters(), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay
      )
    elif kind == "lora-fa":
      from peft.optimizers import create_lorafa_optimizer

      config = self.peft_config
      if config is None or str(getattr(config.peft_type, "value", config.peft_type)) != "LORA":
        raise ValueError("optimizer_type 'lora-fa' needs a LoRA adapter")
      optimizer = create_lorafa_optimizer(
        self.model, r=config.r, lora_alpha=config.lora_alpha, lr=lr, weight_decay=weight_decay
      )
      for group in optimizer.param_groups:
        group["betas"] = betas
        group["eps"] = eps
    else:
      from peft.optimizers import create_loraplus_optimizer

      if loraplus_lr_ratio is None:
        raise ValueError("optimizer_type 'lora+' needs loraplus_lr_ratio")
      if not self.is_peft:
        raise ValueError("optimizer_type 'lora+' needs a PEFT adapter")
      optimizer = create_loraplus_optimizer(
        self.model,
        torch.optim.AdamW,
        lr=lr,
        loraplus_lr_ratio=loraplus_lr_ratio,
        loraplus_weight_decay=weight_decay,
        betas=betas,
        eps=eps,
      )

    schedule = lr_scheduler.lower()
    if schedule not in LR_SCHEDULERS:
      raise ValueError(f"unknown lr_scheduler {lr_scheduler!r}; expected one of {LR_SCHEDULERS}")
    if schedule == "constant":
      name = "constant_with_warmup" if warmup_steps else "constant"
    else:
      if total_steps is None:
        raise ValueError(f"lr_scheduler {lr_scheduler!r} needs total_steps")
      name = schedule
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
    self._optimizer = optimizer
    self._scheduler = scheduler
    self._global_step = 0
    self._grad_norm_clip = grad_norm_clip

  def current_lr(self) -> list[float]:
    """The learning rate of each optimizer parameter group for the next step."""
    if self._optimizer is None:
      raise RuntimeError("call configure_optimizer first")
    return [group["lr"] for group in self._optimizer.param_groups]

  def train_step(self, input_ids: np.ndarray, attention_mask: np.ndarray, labels: np.ndarray) -> float:
    if self._optimizer is None:
      raise RuntimeError("call configure_optimizer before train_step")
    model = self._require_model()
    model.train()
    self._optimizer.zero_grad(set_to_none=True)
    with self._autocast():
      loss = self._forward(input_ids, attention_mask, labels).loss
    loss.backward()
    if self._grad_norm_clip is not None:
      torch.nn.utils.clip_grad_norm_(self._trainable_parameters(), self._grad_norm_clip)
    self._optimizer.step()
    self._scheduler.step()
    self._global_step += 1
    # A tuner that reallocates its ranks after each step (AdaLoRA) does so with this step's gradients, numbered
    # from 1 as PEFT's method comparison counts its steps.
    allocate = getattr(getattr(self.model, "base_model", None), "update_and_allocate", None)
    if callable(allocate) and self.is_peft:
      allocate(self._global_step)
    self._optimizer.zero_grad(set_to_none=True)
    return float(loss.detach().cpu().item())

  # ------------------------------------------------------------------ generation, merging, accounting

  @contextlib.contextmanager
  def _greedy_generation_config(self, eos_token_id: int | None, pad_token_id: int) -> Iterator[None]:
    from transformers import GenerationConfig

    base = self.base_model()
    saved = base.generation_config
    base.generation_config = GenerationConfig(
      do_sample=False,
      num_beams=1,
      eos_token_id=eos_token_id,
      pad_token_id=pad_token_id,
      bos_token_id=getattr(saved, "bos_token_id", None),
    )
    try:
      yield
    finally:
      base.generation_config = saved

  def generate(
    self,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    *,
    max_new_tokens: int,
    eos_token_id: int | None = None,
  ) -> np.ndarray:
    model = self._require_model()
    model.eval()
    inputs = self._inputs(input_ids, attention_mask)
    fill = eos_token_id if eos_token_id is not None else 0
    with torch.no_grad(), self._greedy_generation_config(eos_token_id, fill):
      out = model.generate(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        do_sample=False,
        num_beams=1,
      )
    out = out.cpu().numpy()
    total = inputs["input_ids"].shape[1] + max_new_tokens
    if out.shape[1] < total:
      out = np.concatenate([out, np.full((out.shape[0], total - out.shape[1]), fill, dtype=out.dtype)], axis=1)
    return out

  def merge(self) -> None:
    self._require_model()
    if self._full or not self.is_peft:
      return
    model = self.model.merge_and_unload()
    for param in model.parameters():
      param.requires_grad_(False)
    self.model = model
    self._trainable_ids = set()
    self._merged = True
    self._reset_training()

  def peak_memory_bytes(self) -> int:
    if self.device.type == "cuda":
      return int(torch.cuda.max_memory_allocated(self.device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)

  def num_trainable_params(self) -> int:
    return int(sum(p.numel() for p in self._trainable_parameters()))
