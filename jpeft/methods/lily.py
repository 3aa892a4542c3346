"""Lily, low-rank interconnected adaptation across layers (PEFT's ``LilyModel``, ``peft_type="LILY"``).

For a target layer ℓ with input ``x (..., in)``::

    h  = x A_ℓᵀ                                    A_ℓ: lily_A.weight (r, in)
    p  = mean over every token of the batch of softmax(h R_ℓᵀ)      R_ℓ: lily_router.weight (num_B, r)
    B̄  = Σ_e p_e B_e                               B: lily_B.weight (num_B·r, out), read as (num_B, r, out)
    y  = x Wᵀ + b + scaling · h B̄

``scaling`` is a plain multiplier (not α/r). There is no dropout.

**The router averages over the whole batch, padding included** (PEFT's ``reshape(-1, num_B).mean(0)``): a token's
output depends on the other sequences of the batch and on how far they are padded. jpeft computes the same mean over
all ``(batch, time)`` positions it is given, so two runs agree only on the same padded batch; the comparison's
runners build one padded batch for both backends. In generation each decoding step averages over the new tokens of
the batch only (as PEFT's ``generate`` with a KV cache does).

**Sharing.** Targets are grouped by (matched target suffix, base weight shape), as PEFT's ``_post_injection_hook``
does; the matched suffix of a module is the last entry of ``target_modules`` that its name ends with (the whole
``target_modules`` when it is a regex string; for ``"all-linear"``, which PEFT expands to full module names, the
module's own name: **with "all-linear" PEFT's Lily shares nothing across layers**, and jpeft does the same). In each group, in model order, every layer uses the group's first ``lily_B`` and the ``lily_A`` of
the first layer of its block of ``stride_A`` consecutive layers; the router is per layer. Each shared A and B is
one tied tensor of the adapter (:mod:`jpeft.methods.base`): trained once, with the gradient summed over its users
(as a PyTorch parameter used by several layers), saved under every layer's key (PEFT's one clone per layer), and
refused on load if the saved copies differ. Shared names are ``lily_A.weight@<first user>`` and
``lily_B.weight@<first user>``.

Init: A and the router ``kaiming_uniform(a=√5)`` = ``U(±1/√fan_in)``; B zeros (the identity) or, with
``init_weights=False``, ``U(±1/√out)``.

Not mergeable: the update depends on the input through the router (``merge`` raises ``UnmergeableError``).

Reference: Zhong et al. 2024, "Low-Rank Interconnected Adaptation across Layers" (arXiv 2407.09946). Mirrors
``peft.tuners.lily``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct

from jpeft import targets as targets_lib
from jpeft.config import InvalidConfigError, PeftConfig, check_finite_number, check_int
from jpeft.methods.base import kaiming_uniform, Method, ModuleSpec, base_matmul, check_tensor_names, register

_A, _B, _ROUTER = "lily_A.weight", "lily_B.weight", "lily_router.weight"


@dataclasses.dataclass(frozen=True, kw_only=True)
class LilyConfig(PeftConfig):
  """PEFT 0.21.2's ``LilyConfig``: every field, with PEFT's defaults. All of them are implemented."""

  peft_type: Optional[str] = "LILY"
  r: int = 32
  stride_A: int = 1
  num_B: int = 2
  scaling: float = 1.0
  init_weights: bool = True

  def validate(self) -> None:
    if self.layers_pattern and self.layers_to_transform is None:
      raise InvalidConfigError("When `layers_pattern` is specified, `layers_to_transform` must also be specified.")
    check_int("r", self.r, minimum=1, what=" value")
    check_int("stride_A", self.stride_A)
    if self.stride_A < 1:
      raise InvalidConfigError("`stride_A` must be at least 1.")
    check_int("num_B", self.num_B)
    if self.num_B < 2:
      raise InvalidConfigError("`num_B` must be at least 2 for the router to be trained.")
    check_finite_number("scaling", self.scaling)


# ---------------------------------------------------------------------------------------------------------------


@struct.dataclass
class LilyWeight:
  """A Linear weight with Lily's routed low-rank branch; no merged weight exists (the router reads the input)."""

  base: jax.Array  # (out, in)
  lily_a: jax.Array  # (r, in)
  lily_b: jax.Array  # (num_B * r, out)
  router: jax.Array  # (num_B, r)
  scaling: float = struct.field(pytree_node=False)
  # why no merge (or LoRA conversion) exists, for the errors that refuse one
  unmergeable_reason = (
    "its update depends on the input: the router mixes the lily_B experts by a softmax of the batch's hidden states"
  )

  def matmul(self, x, dtype=None):
    dtype = dtype or x.dtype
    y = base_matmul(x, self.base, dtype)
    num_b, r = self.router.shape
    h = x.astype(self.lily_a.dtype) @ self.lily_a.T  # (..., r)
    probs = jax.nn.softmax(h @ self.router.T, axis=-1)  # (..., num_B)
    mixture = probs.reshape(-1, num_b).mean(axis=0)  # over every token of the batch, padding included
    combined = jnp.einsum("e,eio->io", mixture, self.lily_b.reshape(num_b, r, -1))
    return y + ((h @ combined) * self.scaling).astype(y.dtype)  # PEFT casts the branch, then adds


def init_module(key, spec: ModuleSpec, config: LilyConfig) -> dict:
  """The per-layer tensor: the router (A and B are tied shared tensors, see :func:`init_shared`)."""
  del spec
  return {_ROUTER: kaiming_uniform(key, (config.num_B, config.r), config.r)}


def _matched_suffix(name: str, config: LilyConfig) -> str:
  targets = config.target_modules
  if isinstance(targets, str):
    # PEFT expands "all-linear" to the full module names, so each module is its own group (nothing is shared)
    return name if targets.lower() == targets_lib.INCLUDE_LINEAR_LAYERS_SHORTHAND else targets
  if targets is None:  # PEFT's default table for the architecture (leaf names)
    targets = targets_lib.default_target_modules(config.peft_type, "llama", {name: "linear"}) or ()
  matched = None
  for suffix in targets:  # the last match wins, as in PEFT
    if name.endswith(suffix):
      matched = suffix
  return matched if matched is not None else name.split(".")[-1]


def groups(specs, config: LilyConfig) -> dict[tuple, list[str]]:
  """``{(matched suffix, (out, in)): [module names in model order]}``: the layers that share one B."""
  out: dict[tuple, list[str]] = {}
  for name, spec in specs.items():
    out.setdefault((_matched_suffix(name, config), tuple(spec.weight.shape)), []).append(name)
  return out


def tied_tensors(specs, config: LilyConfig) -> dict[str, dict[str, str]]:
  """Each group's B, and the A of each block of ``stride_A`` layers, with the layers that use them."""
  ties: dict[str, dict[str, str]] = {}
  for members in groups(specs, config).values():
    ties[f"{_B}@{members[0]}"] = {m: _B for m in members}
    for start in range(0, len(members), config.stride_A):
      block = members[start : start + config.stride_A]
      ties[f"{_A}@{block[0]}"] = {m: _A for m in block}
  return ties


def init_shared(key, specs, config: LilyConfig) -> dict:
  """One array per tied tensor: A ``U(±1/√in)``; B zeros (``init_weights=True``) or ``U(±1/√out)``."""
  names = sorted(tied_tensors(specs, config))
  out = {}
  for k, name in zip(jax.random.split(key, max(len(names), 1)), names):
    tensor, owner = name.split("@", 1)
    out_features, in_features = specs[owner].weight.shape
    if tensor == _A:
      out[name] = kaiming_uniform(k, (config.r, in_features), in_features)
    elif config.init_weights:
      out[name] = jnp.zeros((config.num_B * config.r, out_features), jnp.float32)
    else:
      out[name] = kaiming_uniform(k, (config.num_B * config.r, out_features), out_features)
  return out


def adapt_module(spec: ModuleSpec, tensors: dict, config: LilyConfig, shared, rng) -> dict:
  del shared, rng  # the tied A and B arrive among the module's tensors; Lily has no dropout
  check_tensor_names(spec, tensors, [(_A, _B, _ROUTER)], "LILY")
  return {"weight": LilyWeight(spec.weight, tensors[_A], tensors[_B], tensors[_ROUTER], float(config.scaling))}


def _identity_at_init(config: LilyConfig) -> bool:
  return bool(config.init_weights)


def _tensor_axes(tensor: str, kind: str, config):
  del kind, config
  return (None, None) if tensor == _ROUTER else None  # shared tensors are replicated (no single base to follow)


SUPPORTED_KINDS = ("linear",)  # PEFT's Lily wraps nn.Linear only

METHOD = register(
  Method(
    config_class=LilyConfig,
    init_module=init_module,
    adapt_module=adapt_module,
    supported_kinds=SUPPORTED_KINDS,
    init_shared=init_shared,
    tied_tensors=tied_tensors,
    batch_coupled=True,
    identity_at_init=_identity_at_init,
    tensor_axes=_tensor_axes,
  )
)
