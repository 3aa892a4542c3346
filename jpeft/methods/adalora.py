"""AdaLoRA: an SVD-form low-rank update whose rank budget is reallocated during training (PEFT's ``AdaLoraModel``,
``peft_type="ADALORA"``).

Linear: ``y = x Wᵀ + b + (dropout(x) (A ⊙ E)ᵀ Bᵀ) · s / (ranknum + 1e-5)``; A: ``lora_A`` (r, in) (right singular
vectors), E: ``lora_E`` (r, 1) (singular values), B: ``lora_B`` (out, r) (left singular vectors); the saved tensors
are bare (no ``.weight``). ``s = lora_alpha`` (``r`` when ``lora_alpha <= 0``) and ``ranknum = init_r``, which stays
``init_r`` after pruning and after a checkpoint is resized to its ``rank_pattern``. ``r`` (LoRA's field) is ignored,
as in PEFT (``init_r`` is the rank). Merge: ``W += B (A ⊙ E) · s / (init_r + 1e-5)`` (additive).

Init: E = 0, A and B ~ N(0, 0.02²) (the identity); ``init_lora_weights=False``: all three N(0, 1) (not the identity).

Training, as in PEFT:

* the loss carries ``orth_reg_weight · mean over every adapted A and B of ‖P Pᵀ − I‖_F`` (``A Aᵀ``, ``Bᵀ B``; both
  r × r): :func:`regularizer`, the ``Method.regularizer`` the loss of :mod:`jpeft.train` adds;
* after each optimizer step ``t`` (1-based: PEFT's suite calls ``update_and_allocate(t)`` after its ``t``-th
  ``optimizer.step()``), the rank allocator (:func:`rank_allocator`, an optax transformation wrapped around the
  optimizer through ``Method.optimizer_transform``) updates, for every A, E, B entry while ``t < total_step − tfinal``,
  the sensitivity ``Ī ← β₁ Ī + (1 − β₁) |p ∇p|`` and uncertainty ``Ū ← β₂ Ū + (1 − β₂) |I − Ī|`` (``p``: the updated
  parameter, ``∇p``: the step's clipped gradient). A triplet's score is ``Ī_E Ū_E + mean_row(Ī_A Ū_A) +
  mean_col(Ī_B Ū_B)``. The budget (total kept triplets) is ``init_bgt`` up to ``tinit``, then
  ``int((init_bgt − target_bgt) (1 − (t − tinit)/(total_step − tfinal − tinit))³ + target_bgt)`` with masking when
  ``t % deltaT == 0``; at ``t = total_step − tfinal`` the final mask (``target_r`` per module on average) is fixed and
  the statistics reset; afterwards that mask is re-applied after every step. Masking zeroes the E entries whose score
  is ``<=`` the ``(init_bgt − budget)``-th smallest score (PEFT's ``kthvalue`` + ``masked_fill``); shapes never
  change (the mask is over ``init_r``), so the step compiles once. The allocator's state is in the optimizer state.
* the mask becomes the config's ``rank_pattern`` (:func:`config_after_training`, ``Method.config_after_training``):
  ``{"<module>.lora_E": [kept, ...]}``; a checkpoint holds A, E, B sliced to the kept ranks
  (:func:`export_adapter`, ``Method.export_adapter``), and a config with a ``rank_pattern`` builds its modules at
  those ranks (which is how loading resizes before it reads the weights).

Reference: Zhang et al. 2023 (AdaLoRA). Mirrors ``peft.tuners.adalora`` (``SVDLinear``, ``RankAllocator``,
``AdaLoraModel.forward`` / ``update_and_allocate``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from jpeft.config import ConfigTypeError, FrozenDict, InvalidConfigError
from jpeft.config import show as _show
from jpeft.config import type_name as _type_name
from jpeft.methods import lora as lora_lib
from jpeft.methods.base import Method, ModuleSpec, check_kind, check_tensor_names, register

_NAMES = ("lora_A", "lora_E", "lora_B")
_INIT_STD = 0.02
_RANKNUM_EPS = 1e-5


# ---------------------------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdaLoraConfig(lora_lib.LoraConfig):
  """PEFT 0.21.2's ``AdaLoraConfig`` (a ``LoraConfig``): every field, with PEFT's defaults and errors.

  ``rank_pattern`` is AdaLoRA's own: ``{"<module>.lora_E": [bool] * init_r}`` (the kept triplets), written by the
  allocator, or None. ``alpha_pattern``, ``use_rslora`` and ``r`` are ignored, as in PEFT.
  """

  peft_type: Optional[str] = "ADALORA"
  target_r: int = 8
  init_r: int = 12
  tinit: int = 0
  tfinal: int = 0
  deltaT: int = 1
  beta1: float = 0.85
  beta2: float = 0.85
  orth_reg_weight: float = 0.5
  total_step: Optional[int] = None
  rank_pattern: Optional[FrozenDict] = None

  def validate(self) -> None:
    if self.init_lora_weights == "loftq":  # PEFT: LoRA's own check first, then AdaLoRA's refusal
      if not self.loftq_config:
        raise InvalidConfigError("`loftq_config` must be specified when `init_lora_weights` is 'loftq'.")
      raise InvalidConfigError(f"{self.peft_type} does not support LOFTQ.")
    pattern = self.rank_pattern
    self._set("rank_pattern", FrozenDict())  # LoRA's checks want integer ranks; AdaLoRA's are masks
    super().validate()
    self._set("rank_pattern", pattern)
    if self.use_dora:
      raise InvalidConfigError(f"{self.peft_type} does not support DoRA.")
    if not isinstance(self.init_lora_weights, bool):
      raise ConfigTypeError(
        f"`init_lora_weights` must be a bool for AdaLoRA (True: E = 0, A, B ~ N(0, 0.02²); False: N(0, 1)), got "
        f"{_show(self.init_lora_weights)}"
      )
    if self.r != 8:
      logging.warning(
        "Note that `r` is not used in AdaLora and will be ignored. If you intended to set the initial rank, use "
        "`init_r` instead."
      )
    for name in ("init_r", "target_r", "tinit", "tfinal", "deltaT"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigTypeError(f"`{name}` should be an int, got {_show(value)} ({_type_name(value)})")
    if self.init_r < 0:
      raise InvalidConfigError(f"`r` should be a positive integer or 0, but the value passed is {self.init_r}")
    if self.deltaT <= 0:  # PEFT divides by it (step % deltaT) during training
      raise InvalidConfigError(f"`deltaT` should be a positive integer, but the value passed is {self.deltaT}")
    if self.total_step is None or self.total_step <= 0:
      raise InvalidConfigError("AdaLoRA does not work when `total_step` is None, supply a value > 0.")
    if self.orth_reg_weight < 0:
      raise InvalidConfigError(
        f"`orth_reg_weight` should be greater than or equal to 0, but the value passed is {self.orth_reg_weight}"
      )
    if self.tinit >= (self.total_step - self.tfinal):
      raise InvalidConfigError(
        "The supplied schedule values don't allow for a budgeting phase. Decrease `tfinal`/`tinit` or "
        "increase `total_step`."
      )
    for name in ("beta1", "beta2"):  # PEFT asserts 0 < beta < 1 when it builds the allocator
      value = getattr(self, name)
      if not 0 < value < 1:
        raise InvalidConfigError(f"`{name}` must be in (0, 1), got {_show(value)}")
    if pattern:
      for key, mask in pattern.items():
        if not isinstance(key, str) or ".lora_E" not in key:
          raise ConfigTypeError(f"`rank_pattern` keys are '<module>.lora_E' names, got {key!r}")
        if not isinstance(mask, tuple) or not all(isinstance(b, bool) for b in mask):
          raise ConfigTypeError(f"`rank_pattern`[{key!r}] must be a list of booleans (kept ranks), got {_show(mask)}")
        if len(mask) != self.init_r:
          raise InvalidConfigError(f"`rank_pattern`[{key!r}] has {len(mask)} entries; `init_r` is {self.init_r}")


def kept_ranks(config) -> dict[str, tuple[bool, ...]]:
  """``{module: kept mask}`` from the config's ``rank_pattern`` (keys ``<module>.lora_E[.<adapter name>]``)."""
  out = {}
  for key, mask in (config.rank_pattern or {}).items():
    out[key.split(".lora_E")[0]] = tuple(mask)
  return out


# ---------------------------------------------------------------------------------------------------------------
# Per-module functions


def _scaling(config, rank: int) -> float:
  return float(config.lora_alpha) if config.lora_alpha > 0 else float(rank)


def _rank(spec: ModuleSpec, config) -> int:
  mask = kept_ranks(config).get(spec.name)
  return config.init_r if mask is None else int(sum(mask))


def init_module(key, spec: ModuleSpec, config) -> dict:
  check_kind(spec, SUPPORTED_KINDS, "AdaLoRA")
  out_dim, in_dim = spec.weight.shape
  r = _rank(spec, config)
  ka, ke, kb = jax.random.split(key, 3)
  std = _INIT_STD if config.init_lora_weights else 1.0
  a = std * jax.random.normal(ka, (r, in_dim), jnp.float32)
  b = std * jax.random.normal(kb, (out_dim, r), jnp.float32)
  e = jnp.zeros((r, 1), jnp.float32) if config.init_lora_weights else jax.random.normal(ke, (r, 1), jnp.float32)
  return {"lora_A": a, "lora_E": e, "lora_B": b}


def adapt_module(spec: ModuleSpec, tensors: dict, config, shared, rng) -> dict:
  del shared
  check_kind(spec, SUPPORTED_KINDS, "AdaLoRA")
  check_tensor_names(spec, tensors, (_NAMES,), "ADALORA")
  r = tensors["lora_A"].shape[0]
  ranknum = float(config.init_r) if r > 0 else 0.0
  # B (A ⊙ E) is a LoRA with A ⊙ E as its A and s / (ranknum + 1e-5) as its scaling: the factored forward, the
  # additive delta and the merge are LoRA's (the gradient reaches A and E through the product)
  weight = lora_lib.LoraWeight(
    base=spec.weight,
    lora_a=tensors["lora_A"] * tensors["lora_E"],
    lora_b=tensors["lora_B"],
    scaling=_scaling(config, r) / (ranknum + _RANKNUM_EPS),
    dropout=config.lora_dropout,
    rng=rng,
  )
  return {"weight": weight}


def _tensor_axes(tensor: str, kind: str, config):
  del kind, config
  return {"lora_A": (None, 1), "lora_B": (0, None), "lora_E": (None, None)}.get(tensor)


def _adapted(tree) -> list[str]:
  return [m for m, ts in tree.items() if isinstance(ts, dict) and "lora_A" in ts and "lora_E" in ts]


def regularizer(adapter, config):
  """PEFT's orthogonality penalty: ``orth_reg_weight · mean over every adapted A, B of ‖P Pᵀ − I‖_F``."""
  terms = []
  for m in _adapted(adapter):
    a, b = adapter[m]["lora_A"], adapter[m]["lora_B"]
    for cov in (a @ a.T, b.T @ b):
      terms.append(jnp.linalg.norm(cov - jnp.eye(cov.shape[0], dtype=cov.dtype)))
  if not terms:
    return None
  return config.orth_reg_weight * (sum(terms[1:], terms[0]) / len(terms))


# ---------------------------------------------------------------------------------------------------------------
# The rank allocator (an optax transformation; its state lives in the optimizer state)


class AdaLoraAllocatorState(NamedTuple):
  count: jax.Array  # optimizer steps done (the next call is PEFT's update_and_allocate(count + 1))
  inner: Any  # the wrapped optimizer's state
  ipt: Any  # {module: {lora_A/E/B: smoothed sensitivity Ī}}
  unc: Any  # {module: {lora_A/E/B: uncertainty Ū}}
  kept: Any  # {module: bool (r,)}, the latest mask (PEFT's rank_pattern)
  masked: jax.Array  # whether a mask was computed yet (PEFT's rank_pattern is not None)


def budget_schedule(config, init_bgt: int, target_bgt: int, step: int) -> tuple[int, bool]:
  """``(budget, mask now)`` at ``step``, PEFT's cubic schedule in Python floats."""
  tinit, tfinal, total = config.tinit, config.tfinal, config.total_step
  if step <= tinit:
    return init_bgt, False
  if step > total - tfinal:
    return target_bgt, True
  mul = 1 - (step - tinit) / (total - tfinal - tinit)
  return int((init_bgt - target_bgt) * (mul**3) + target_bgt), step % config.deltaT == 0


def _sensitivities(params, grads, state_ipt, state_unc, config):
  ipt, unc = {}, {}
  for m in state_ipt:
    ipt[m], unc[m] = {}, {}
    for t in _NAMES:
      p, g = params[m][t].astype(jnp.float32), grads[m][t].astype(jnp.float32)
      now = jnp.abs(p * g)
      avg = config.beta1 * state_ipt[m][t] + (1 - config.beta1) * now
      ipt[m][t] = avg
      unc[m][t] = config.beta2 * state_unc[m][t] + (1 - config.beta2) * jnp.abs(now - avg)
  return ipt, unc


def _scores(ipt, unc) -> dict:
  out = {}
  for m in ipt:
    s = {t: ipt[m][t] * unc[m][t] for t in _NAMES}
    out[m] = s["lora_E"].reshape(-1) + (jnp.mean(s["lora_A"], axis=1) + jnp.mean(s["lora_B"], axis=0))
  return out


def rank_allocator(inner: optax.GradientTransformation, config) -> optax.GradientTransformation:
  """``inner`` (the optimizer after clipping) followed by PEFT's ``update_and_allocate``: the returned updates are
  ``final − params`` with ``final`` = the masked ``params + inner updates`` (exactly ``−p`` on a masked E entry)."""
  boundary = config.total_step - config.tfinal

  def init(params):
    modules = _adapted(params)
    zeros = {m: {t: jnp.zeros(params[m][t].shape, jnp.float32) for t in _NAMES} for m in modules}
    kept = {m: jnp.ones((params[m]["lora_E"].shape[0],), bool) for m in modules}
    return AdaLoraAllocatorState(
      jnp.zeros((), jnp.int32),
      inner.init(params),
      zeros,
      jax.tree_util.tree_map(jnp.zeros_like, zeros),
      kept,
      jnp.zeros((), bool),
    )

  def update(grads, state, params=None):
    if params is None:
      raise ValueError("AdaLoRA's rank allocator needs the current adapter params")
    updates, inner_state = inner.update(grads, state.inner, params)
    modules = list(state.kept)
    init_bgt = sum(int(params[m]["lora_A"].shape[0]) for m in modules)
    target_bgt = config.target_r * len(modules)
    # Static tables over the budgeting phase (PEFT's Python-float schedule, step 0 .. boundary).
    table = [budget_schedule(config, init_bgt, target_bgt, s) for s in range(boundary + 1)]
    table[boundary] = (target_bgt, True)  # the final allocation (force_mask)
    k_table = jnp.asarray(np.array([init_bgt - b for b, _ in table], np.int32))
    mask_table = jnp.asarray(np.array([m for _, m in table], bool))

    step = state.count + 1
    new = optax.apply_updates(params, updates)
    ipt, unc = _sensitivities(new, grads, state.ipt, state.unc, config)
    learning = step < boundary
    ipt = jax.tree_util.tree_map(lambda n, o: jnp.where(learning, n, o), ipt, state.ipt)
    unc = jax.tree_util.tree_map(lambda n, o: jnp.where(learning, n, o), unc, state.unc)
    idx = jnp.clip(step, 0, boundary)
    allocate = (step <= boundary) & mask_table[idx]
    k = k_table[idx]
    scores = _scores(ipt, unc)
    if modules:
      ordered = jnp.sort(jnp.concatenate([scores[m] for m in modules]))
      threshold = jnp.where(k > 0, ordered[jnp.clip(k - 1, 0, ordered.shape[0] - 1)], -jnp.inf)
    else:
      threshold = -jnp.inf
    kept, out = {}, dict(updates)
    for m in modules:
      fresh = ~(scores[m] <= threshold)
      kept[m] = jnp.where(allocate, fresh, state.kept[m])
      zero = jnp.where(allocate | (step > boundary), ~kept[m], False)[:, None]
      out[m] = {**updates[m], "lora_E": jnp.where(zero, -params[m]["lora_E"], updates[m]["lora_E"])}
    at_boundary = step == boundary  # PEFT resets its statistics after the final allocation
    ipt = jax.tree_util.tree_map(lambda x: jnp.where(at_boundary, 0.0, x), ipt)
    unc = jax.tree_util.tree_map(lambda x: jnp.where(at_boundary, 0.0, x), unc)
    masked = state.masked | allocate
    return out, AdaLoraAllocatorState(step, inner_state, ipt, unc, kept, masked)

  return optax.GradientTransformation(init, update)


def find_allocator_state(opt_state) -> AdaLoraAllocatorState | None:
  """The allocator's state inside an optimizer state (None if it has none)."""
  if isinstance(opt_state, AdaLoraAllocatorState):
    return opt_state
  if isinstance(opt_state, dict):
    children = list(opt_state.values())
  elif isinstance(opt_state, (tuple, list)):
    children = list(opt_state)
  else:
    return None
  for child in children:
    found = find_allocator_state(child)
    if found is not None:
      return found
  return None


def rank_pattern(opt_state) -> dict[str, list[bool]] | None:
  """PEFT's ``rank_pattern`` (``{"<module>.lora_E": [kept, ...]}``) from the allocator's state, or None before the
  first allocation."""
  state = find_allocator_state(opt_state)
  if state is None or not bool(np.asarray(state.masked)):
    return None
  return {f"{m}.lora_E": [bool(b) for b in np.asarray(v)] for m, v in state.kept.items()}


def config_after_training(config, opt_state):
  """The config with the allocator's latest mask as its ``rank_pattern`` (unchanged before the first allocation)."""
  pattern = rank_pattern(opt_state)
  if pattern is None:
    return config
  if any(len(v) != config.init_r for v in pattern.values()):  # trained on from a pruned checkpoint: already sliced
    return config
  return config.replace(rank_pattern=pattern)


def export_adapter(adapter, config):
  """The tensors a checkpoint holds: A, E, B sliced to the kept ranks of ``rank_pattern`` (PEFT's
  ``resize_state_dict_by_rank_pattern``; a module already at its kept rank is left as it is)."""
  kept = kept_ranks(config)
  if not kept:
    return adapter
  out = dict(adapter)
  for m, mask in kept.items():
    if m not in adapter:
      continue
    idx = np.flatnonzero(np.asarray(mask, bool))
    ts = adapter[m]
    if ts["lora_A"].shape[0] == len(idx):
      continue
    out[m] = {**ts, "lora_A": ts["lora_A"][idx], "lora_E": ts["lora_E"][idx], "lora_B": ts["lora_B"][:, idx]}
  return out


SUPPORTED_KINDS = ("linear",)

ADALORA = register(
  Method(
    config_class=AdaLoraConfig,
    init_module=init_module,
    adapt_module=adapt_module,
    supported_kinds=SUPPORTED_KINDS,
    identity_at_init=lambda config: bool(config.init_lora_weights),
    tensor_axes=_tensor_axes,
    regularizer=regularizer,
    optimizer_transform=rank_allocator,
    config_after_training=config_after_training,
    export_adapter=export_adapter,
  )
)
