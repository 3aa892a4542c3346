"""The interface shared by the ``jax`` (jpeft) and ``torch`` (transformers + PEFT) backends.

Parity tests and experiments only talk to :class:`Backend`, so that every PEFT method can be
compared between the two implementations by adding a row to a table.

Conventions that both implementations follow:

* Arrays cross the interface as numpy arrays. Token ids, attention masks and labels are integer
  arrays of shape ``(B, T)``; logits are ``float32`` of shape ``(B, T, V)``.
* ``attention_mask`` is 1 for real tokens and 0 for padding. Position ids are derived from the
  mask, ``cumsum(mask) - 1`` (padding positions get an arbitrary valid id), which is what
  transformers' ``generate`` does, so left- and right-padded batches give the same outputs at
  the real tokens.
* ``labels`` follow transformers' causal-LM convention: the loss at position ``t`` predicts
  ``labels[t + 1]`` from the logits at ``t``; labels equal to ``-100`` are ignored; the loss is the
  mean over the remaining positions of the whole batch.
* ``train_step`` and ``loss_and_grads`` run the model in train mode (dropout active when the
  adapter config asks for it); ``logits`` and ``generate`` run it in eval mode.
* Adapter tensors are keyed in PEFT's saved format, i.e. exactly the keys of
  ``peft.get_peft_model_state_dict`` (adapter name removed, e.g.
  ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``). For full fine-tuning
  (``peft_type`` ``"FULL"`` or ``None``) the keys are the Hugging Face parameter names of the
  base model (``model.layers.0.self_attn.q_proj.weight``; a tied ``lm_head.weight`` is omitted).
* Learning-rate schedules follow transformers: the first optimizer step uses the schedule's
  value at step 0 (so with warmup the first step has learning rate 0), then the schedule
  advances by one after every step.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import numpy as np

FULL_FINETUNING = "FULL"

OPTIMIZER_TYPES = ("AdamW", "lora-fa", "lora+")
LR_SCHEDULERS = ("constant", "cosine", "linear")


def normalize_optimizer_type(optimizer_type: str) -> str:
  """Map accepted spellings onto one of :data:`OPTIMIZER_TYPES`."""
  key = optimizer_type.lower().replace("_", "-")
  aliases = {
    "adamw": "AdamW",
    "adam-w": "AdamW",
    "lora-fa": "lora-fa",
    "lorafa": "lora-fa",
    "lora+": "lora+",
    "loraplus": "lora+",
    "lora-plus": "lora+",
  }
  if key not in aliases:
    raise ValueError(f"unknown optimizer_type {optimizer_type!r}; expected one of {OPTIMIZER_TYPES}")
  return aliases[key]


def is_full_finetuning(peft_config: dict | None) -> bool:
  """Whether an adapter config asks for full fine-tuning instead of a PEFT method."""
  if peft_config is None:
    return True
  peft_type = peft_config.get("peft_type")
  if peft_type is None:
    return True
  return str(getattr(peft_type, "value", peft_type)).upper() == FULL_FINETUNING


def _shape(value) -> tuple[int, ...]:
  shape = getattr(value, "shape", None)
  return tuple(int(n) for n in shape) if shape is not None else tuple(np.shape(value))


def check_state_keys(expected: dict, given: dict, *, what: str = "adapter state dict") -> None:
  """Raise ``ValueError`` naming every missing and unexpected key, or every tensor of the wrong shape."""
  from jpeft.core import describe_key_mismatch

  mismatch = describe_key_mismatch(expected, given)
  if mismatch:
    raise ValueError(f"{what} does not match the model; {mismatch}")
  bad = [
    f"{k}: expected {_shape(expected[k])}, got {_shape(given[k])}"
    for k in sorted(expected)
    if _shape(expected[k]) != _shape(given[k])
  ]
  if bad:
    raise ValueError(f"{what} has tensors of the wrong shape: " + "; ".join(bad))


class Backend(abc.ABC):
  """A causal language model plus (optionally) one PEFT adapter, driven through numpy arrays."""

  name: str

  @abc.abstractmethod
  def load_base(self, source: str, *, dtype: str = "float32", attn_implementation: str | None = None) -> None:
    """Load the base model.

    ``source`` is a local Hugging Face model folder (``config.json`` + safetensors, sharded or
    not), a ``.gguf`` file (dequantised as transformers' ``gguf_file`` loading does), a
    registry name of an embedded model (``"smollm2-135m"``), or a hub id. ``dtype`` is
    ``"float32"``, ``"bfloat16"`` or ``"float16"``. ``attn_implementation`` is transformers'
    argument of the same name (None: its default); the jax side accepts None, ``"eager"`` and
    ``"sdpa"`` (its one softmax attention is the math of both) and raises ``ValueError`` for
    anything else. Any attached adapter and optimizer are dropped.
    """

  @abc.abstractmethod
  def attach_adapter(self, peft_config: dict, *, seed: int = 0, autocast_adapter_dtype: bool = True) -> None:
    """Attach a freshly initialised adapter described by the content of a PEFT ``adapter_config.json``.

    Initialisation follows PEFT's (``init_lora_weights`` etc.). ``peft_type`` ``"FULL"`` or
    ``None`` means full fine-tuning: every base parameter is trainable. ``autocast_adapter_dtype``
    is ``get_peft_model``'s argument: True keeps the adapter in float32 over a bfloat16/float16
    base, False keeps it in the base dtype.
    """

  @abc.abstractmethod
  def set_training_options(self, *, gradient_checkpointing: bool = False, amp: bool = False, compile: bool = False):
    """How :meth:`train_step` and :meth:`loss_and_grads` compute (PEFT's ``use_gc``, ``use_amp``, ``compile``).

    ``gradient_checkpointing`` recomputes each decoder layer in the backward pass; ``amp`` runs the forward in
    bfloat16 (``torch.autocast``; jax: a bfloat16 compute dtype) with float32 trainable tensors and loss;
    ``compile`` compiles the model (torch: ``torch.compile(dynamic=True)``; jax always compiles). The options
    stay set across :meth:`load_base` and :meth:`attach_adapter`.
    """

  @abc.abstractmethod
  def adapter_state_dict(self) -> dict[str, np.ndarray]:
    """The adapter tensors in PEFT's saved-key format (what ``get_peft_model_state_dict`` returns)."""

  @abc.abstractmethod
  def set_adapter_state_dict(self, state: dict[str, np.ndarray]) -> None:
    """Load adapter tensors in PEFT's saved-key format.

    Missing or unexpected keys, or wrong shapes, raise ``ValueError`` naming them.
    """

  @abc.abstractmethod
  def save_adapter(self, folder: str) -> None:
    """Write the adapter as PEFT's ``save_pretrained`` does (full fine-tuning: the whole model)."""

  @abc.abstractmethod
  def load_adapter(self, folder: str, *, is_trainable: bool = True) -> None:
    """Replace the attached adapter by the one saved in ``folder`` (``PeftModel.from_pretrained`` semantics).

    Missing or unexpected adapter keys in the folder's weights raise ``ValueError`` naming them.
    """

  @abc.abstractmethod
  def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Eval-mode logits, ``float32`` of shape ``(B, T, V)``.

    Methods that prepend virtual tokens (prompt tuning, P-tuning) still return only the ``T``
    positions of the input.
    """

  @abc.abstractmethod
  def loss_and_grads(
    self, input_ids: np.ndarray, attention_mask: np.ndarray, labels: np.ndarray
  ) -> tuple[float, dict[str, np.ndarray]]:
    """Train-mode causal-LM loss and its gradients with respect to the adapter tensors.

    The gradients are keyed like :meth:`adapter_state_dict`. Entries of the adapter state that
    the adapter does not train have no gradient and are left out: saved buffers (VeRA's shared
    ``vera_A``/``vera_B``) and frozen base weights that PEFT saves alongside an adapter (the base
    embedding when an embedding layer is targeted). Gradients are computed for every parameter
    the adapter trains, even if an optimizer froze some of them (LoRA-FA's ``lora_A``). An
    adapter loaded with ``is_trainable=False`` has no gradients. The optimizer is not touched.
    """

  @abc.abstractmethod
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
    """Set up the optimizer used by :meth:`train_step`.

    ``optimizer_type`` is ``"AdamW"``, ``"lora-fa"`` (``peft.optimizers.create_lorafa_optimizer``)
    or ``"lora+"`` (``peft.optimizers.create_loraplus_optimizer`` around AdamW, which needs
    ``loraplus_lr_ratio``). ``lr_scheduler`` is ``"constant"``, ``"cosine"`` or ``"linear"``,
    each with ``warmup_steps`` of linear warmup from 0; the decaying ones need ``total_steps``.
    ``grad_norm_clip`` clips the global gradient norm before each step.
    """

  @abc.abstractmethod
  def train_step(self, input_ids: np.ndarray, attention_mask: np.ndarray, labels: np.ndarray) -> float:
    """One optimizer step on the batch; returns the loss before the step."""

  @abc.abstractmethod
  def generate(
    self,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    *,
    max_new_tokens: int,
    eos_token_id: int | None = None,
  ) -> np.ndarray:
    """Greedy decoding from a left-padded batch.

    Returns the prompt followed by the new tokens, shape ``(B, T + max_new_tokens)``. With
    ``eos_token_id`` set, a row stops at its first EOS and the rest of the row is filled with
    ``eos_token_id``; with ``None`` decoding never stops early.
    """

  @abc.abstractmethod
  def merge(self) -> None:
    """Merge the adapter into the base weights (``merge_and_unload``); the model stays usable."""

  @abc.abstractmethod
  def peak_memory_bytes(self) -> int:
    """Peak accelerator memory allocated; on CPU the process's peak resident set size."""

  @abc.abstractmethod
  def num_trainable_params(self) -> int:
    """Number of scalar parameters that the optimizer updates."""
