"""Float comparisons that hold on any CPU: errors measured against the scale of the tensor compared.

XLA picks different kernels per instruction set and thread count (AVX-512 vs AVX2, one thread vs many), so the
order of floating-point additions -- hence the last bits of every result -- differs between machines. An
element-wise relative tolerance cannot hold on entries that pass through zero (their relative error is
unbounded), and an absolute one means nothing without the scale of the numbers. Every comparison here is
``max |actual - expected| <= rel * max |expected|``: an error of a few float32 epsilons per reduction step of
the largest entry, which is what a reordering of sums can produce.

``JPEFT_PRINT_ERRORS=1 pytest -s ...`` prints every measured ratio next to its bound.
"""

from __future__ import annotations

import os

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)  # 1.19e-7


def scaled_error(actual, expected, *, mask=None) -> float:
  """``max |actual - expected| / max |expected|`` (over ``mask``'s True entries if given)."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  if actual.shape != expected.shape:
    raise AssertionError(f"shapes differ: {actual.shape} vs {expected.shape}")
  if mask is not None:
    actual, expected = actual[mask], expected[mask]
  scale = np.abs(expected).max()
  if not np.isfinite(scale) or scale == 0:
    raise AssertionError(f"the expected tensor has no scale to compare against (max |x| = {scale})")
  return float(np.abs(actual - expected).max() / scale)


def assert_close_to_scale(actual, expected, rel: float, *, what: str = "", mask=None) -> float:
  """Assert ``max |actual - expected| <= rel * max |expected|``; returns the measured ratio."""
  err = scaled_error(actual, expected, mask=mask)
  if os.environ.get("JPEFT_PRINT_ERRORS"):  # `JPEFT_PRINT_ERRORS=1 pytest -s` prints every measured ratio
    print(f"[scaled error] {what}: {err:.3g} (bound {rel:.3g})")
  assert err <= rel, f"{what}: max error {err:.3g} of the largest entry exceeds {rel:.3g}"
  return err
