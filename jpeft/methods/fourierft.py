"""FourierFT (PEFT's ``FourierFTModel``, ``peft_type="FOURIERFT"``): a weight delta from n trained 2-D DFT coefficients.

Linear: ``y = x Wᵀ + b + x ΔWᵀ`` with ``ΔW = scaling · Re(ifft2(D))``, D the (out, in) spectrum that is zero except
``D[idx // in, idx % in] = fourierft_spectrum`` (n,), ``idx = randperm(out·in, seed=random_loc_seed)[:n]`` and
``n`` = ``n_frequency`` after ``n_frequency_pattern``. ``ifft2`` has torch's (and numpy's) default normalisation, so
``ΔW[i, j] = scaling/(out·in) · Σₖ sₖ cos(2π(i·rₖ/out + j·cₖ/in))``; ``scaling`` multiplies ΔW directly (no
division by n). D, the FFT and ΔW are float32 whatever the spectrum's dtype (PEFT: ``ifft2`` has no bf16/fp16); ΔW
is then cast to the spectrum's dtype, and merging adds it: ``W += ΔW``.

The indices are *derived*: recomputed, bit-exact with torch, from the config and the weight's shape
(:func:`frequency_indices`, cached), never in the adapter and never saved. Every module of one shape gets the same
indices (PEFT seeds a fresh generator with ``random_loc_seed`` per module).

Init: ``init_weights=False`` (PEFT's default) draws the spectrum from N(0, 1), so a fresh adapter is NOT the
identity; ``init_weights=True`` gives zeros (the identity).

Forward: ΔW is materialised once per call (scatter + ifft2: 5 ms at 576×576). When W, ΔW and the compute dtype are
all float32, ``y = x (W + ΔW)ᵀ``; otherwise PEFT's ``x Wᵀ + x ΔWᵀ``, the base term in the compute dtype, the
adapter's in its own, summed in the wider (a bf16 ``W + ΔW`` would drop the bits of ΔW below half a bf16 ulp of W). Measured (jit'd forward + backward w.r.t. spectrum and x,
T = 2048 tokens, fp32, one CPU core, n = 1000), ``x (W + ΔW)ᵀ`` / ``x Wᵀ + x ΔWᵀ`` / the rank-2n factored form
``x Wᵀ + c·((x C_c ⊙ s) C_rᵀ − (x S_c ⊙ s) S_rᵀ)`` (c = scaling/(out·in), C/S the n frequencies' cosines/sines):
576×576 (SmolLM2 q/o) 108 / 158 / 675 ms, 192×576 (k/v) 35 / 51 / 408 ms, 1536×576 (MLP) 316 / 345 / 969 ms. The
factored form costs 4·T·n·(out + in) flops against 2·T·out·in per dense matmul, so it only wins below
n = out·in / (2(out + in)) = 144 at 576×576 (n = 32: 70 ms against 96 ms). ``W + ΔW`` needs no more memory than ΔW
(one out×in buffer kept for the backward) and saves two token-sized matmuls (forward and dx).

Reference: Gao et al. 2024, "Parameter-Efficient Fine-Tuning with Discrete Fourier Transform". Mirrors
``peft.tuners.fourierft.layer.FourierFTLinear`` and ``FourierFTModel._create_and_replace`` (the pattern lookup).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import struct

from jpeft.config import check_bias
from jpeft.config import (
  AdapterCheckpointError,
  FrozenDict,
  InvalidConfigError,
  PeftConfig,
  UnsupportedConfigError,
  check_finite_number,
  check_int,
  check_pattern_dict,
  check_regex,
)
from jpeft.methods.base import Method, ModuleSpec, base_matmul, cached, check_tensor_names, register
from jpeft.methods.base import add_in_adapter_dtype, merged_plus, unsupported_kind_message
from jpeft.methods.torch_rng import randperm_prefix
from jpeft.targets import UnsupportedTargetError

# The seeds torch.Generator().manual_seed accepts (it refuses anything else, None and bools included).
_SEED_RANGE = (-(2**63), 2**64 - 1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FourierFTConfig(PeftConfig):
  """PEFT 0.21.2's ``FourierFTConfig``: every field, with PEFT's defaults.

  PEFT checks ``n_frequency`` (and the pattern's values) only when it builds each module (``n > 0``,
  ``n <= out·in``); jpeft refuses a non-positive one here and ``n > out·in`` when the module is adapted, naming it.
  ``random_loc_seed=None`` (which PEFT's annotation allows but its ``manual_seed`` refuses) is refused here, and
  ``n_frequency_pattern=None`` (PEFT crashes on it) reads as ``{}``. ``bias`` takes PEFT's values: "none", "all" or
  any "<name>_only" (PEFT's tuner accepts every ``_only`` suffix).
  """

  peft_type: Optional[str] = "FOURIERFT"
  n_frequency: int = 1000
  scaling: float = 150.0
  random_loc_seed: Optional[int] = 777
  fan_in_fan_out: bool = False
  bias: str = "none"
  n_frequency_pattern: Optional[FrozenDict] = FrozenDict()
  init_weights: bool = False

  def validate(self) -> None:
    check_int("n_frequency", self.n_frequency, minimum=1, what=" value")
    check_finite_number("scaling", self.scaling)
    seed = self.random_loc_seed
    check_int("random_loc_seed", seed)  # None too: PEFT's torch.Generator().manual_seed(None) fails
    if not _SEED_RANGE[0] <= seed <= _SEED_RANGE[1]:
      raise InvalidConfigError(
        f"`random_loc_seed` must be within torch's seed range [-2**63, 2**64 - 1] (PEFT seeds "
        f"torch.Generator().manual_seed with it), got {seed}"
      )
    check_bias(self.bias)
    pattern = check_pattern_dict(
      "n_frequency_pattern", self.n_frequency_pattern, lambda f, v: check_int(f, v, minimum=1, what=" value")
    )
    for key in pattern:
      check_regex("n_frequency_pattern", key, rf".*\.{key}$")  # FourierFTModel's own match (not rank_pattern's)
    self._set("n_frequency_pattern", pattern)
    if self.fan_in_fan_out:  # PEFT does the same on nn.Linear targets (all of a Llama's)
      logging.warning(
        "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting fan_in_fan_out to False."
      )
      self._set("fan_in_fan_out", False)


def n_frequency_for(config: FourierFTConfig, module_name: str) -> int:
  """``n`` of one module, as ``FourierFTModel._create_and_replace`` finds it.

  The first pattern ``k`` (in order) with ``re.match(rf".*\\.{k}$", name)``, else the exact module name, else
  ``n_frequency``. Not the ``rank_pattern`` rule: the key is not grouped, so ``"q_proj|v_proj"`` reads as
  ``.*\\.q_proj`` (a prefix match) or ``v_proj$`` (from the name's start, which never matches ``model.…``), and a
  full module name only matches exactly.
  """
  patterns = config.n_frequency_pattern or {}
  key = next((k for k in patterns if re.match(rf".*\.{k}$", module_name)), module_name)
  return patterns.get(key, config.n_frequency)


@cached
def frequency_indices(out_features: int, in_features: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """``(rows, cols)`` of the n trained frequencies: ``idx // in``, ``idx % in`` for
  ``idx = torch.randperm(out·in, generator=torch.Generator().manual_seed(seed))[:n]`` (bit-exact; read-only)."""
  try:
    flat = randperm_prefix(out_features * in_features, n, seed)
  except NotImplementedError as e:
    raise UnsupportedConfigError(f"FourierFT on a {out_features}x{in_features} weight: {e}") from None
  rows, cols = (flat // in_features).astype(np.int32), (flat % in_features).astype(np.int32)
  rows.flags.writeable = cols.flags.writeable = False  # shared by every caller through the cache
  return rows, cols


def spectral_delta(spectrum, out_features: int, in_features: int, scaling: float, seed: int):
  """``ΔW = scaling · Re(ifft2(D))`` in float32, cast to the spectrum's dtype (PEFT's ``get_delta_weight``)."""
  rows, cols = frequency_indices(out_features, in_features, spectrum.shape[0], seed)
  dense = jnp.zeros((out_features, in_features), jnp.float32).at[rows, cols].set(spectrum.astype(jnp.float32))
  return (jnp.fft.ifft2(dense).real * jnp.float32(scaling)).astype(spectrum.dtype)


@struct.dataclass
class FourierFTWeight:
  """A Linear weight with a FourierFT delta (ΔW materialised once per call; see the module docstring)."""

  base: jax.Array  # (out, in)
  spectrum: jax.Array  # (n,)
  scaling: float = struct.field(pytree_node=False)
  seed: int = struct.field(pytree_node=False)

  def delta(self):
    return spectral_delta(self.spectrum, *self.base.shape, self.scaling, self.seed)

  def matmul(self, x, dtype=None):
    dtype = jnp.dtype(dtype or x.dtype)
    delta = self.delta()
    if self.base.dtype == delta.dtype == dtype == jnp.float32:  # one matmul; equal up to the order of float sums
      return base_matmul(x, self.base + delta, dtype)
    return add_in_adapter_dtype(base_matmul(x, self.base, dtype), base_matmul(x, delta, delta.dtype))

  def materialize(self):
    return merged_plus(self.base, self.delta())


# ----------------------------------------------------------------------------------------------------------

SUPPORTED_KINDS = ("linear",)  # PEFT: nn.Linear (and GPT-2's Conv1D, which a Llama has none of)
_TENSOR = "fourierft_spectrum"


def _module_n(spec: ModuleSpec, config) -> int:
  """The module's ``n`` after the pattern, checked against its kind and shape as PEFT's ``update_layer`` does."""
  if spec.kind not in SUPPORTED_KINDS:
    raise UnsupportedTargetError(unsupported_kind_message(spec.name, spec.kind, "FourierFT", SUPPORTED_KINDS))
  n = n_frequency_for(config, spec.name)
  out_features, in_features = spec.weight.shape
  if n > out_features * in_features:
    raise InvalidConfigError(
      f"{spec.name}: `n_frequency` should be less than or equal to the product of the input and output dimensions "
      f"but the value passed is {n} and the product is {out_features * in_features} (a {out_features}x"
      f"{in_features} weight; `n_frequency` after `n_frequency_pattern`)"
    )
  return n


def init_module(key, spec: ModuleSpec, config) -> dict:
  n = _module_n(spec, config)
  spectrum = jnp.zeros((n,), jnp.float32) if config.init_weights else jax.random.normal(key, (n,), jnp.float32)
  return {_TENSOR: spectrum}


def adapt_module(spec: ModuleSpec, tensors: dict, config, shared, rng) -> dict:
  del shared, rng  # no model-level tensors, no dropout
  n = _module_n(spec, config)
  check_tensor_names(spec, tensors, ((_TENSOR,),), "FourierFT")
  spectrum = tensors[_TENSOR]
  if tuple(spectrum.shape) != (n,) or not jnp.issubdtype(spectrum.dtype, jnp.floating):
    raise AdapterCheckpointError(
      f"the FourierFT adapter of {spec.name!r} has {_TENSOR} {spectrum.dtype}{list(spectrum.shape)}; expected a "
      f"float vector of n_frequency = {n} entries (after n_frequency_pattern)"
    )
  seed = int(config.random_loc_seed)
  frequency_indices(*spec.weight.shape, n, seed)  # the derived constant, computed (and cached) here
  return {"weight": FourierFTWeight(spec.weight, spectrum, scaling=float(config.scaling), seed=seed)}


FOURIERFT = register(
  Method(
    config_class=FourierFTConfig,
    init_module=init_module,
    adapt_module=adapt_module,
    supported_kinds=SUPPORTED_KINDS,
    identity_at_init=lambda config: bool(config.init_weights),
    tensor_axes=lambda tensor, kind, config: None,  # the spectrum is replicated (its entries span all of W)
  )
)
