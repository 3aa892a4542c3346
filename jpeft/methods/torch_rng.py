"""Bit-exact numpy reproductions of draws from torch's CPU generator ``torch.Generator().manual_seed(seed)``.

torch's CPU generator is MT19937 seeded with ``init_genrand(seed & 0xffffffff)``; numpy's
``MT19937()._legacy_seeding(seed)`` produces the identical raw 32-bit stream, so the draws below equal torch's bit
for bit (tests/test_vera.py checks them against torch):

* ``randperm(n, seed)`` -- ``torch.randperm(n, generator=g)`` for n < 2³²/20: Fisher-Yates with one raw draw per
  step, ``z = raw % (n - i)``, swapping ``r[i]`` and ``r[i + z]`` for ``i = 0 .. n - 2``. (torch switches to a
  64-bit inside-out shuffle above that size; jpeft refuses it.)
* ``randperm_prefix(n, k, seed)`` -- ``torch.randperm(n, generator=g)[:k]`` in O(k) draws and memory: the shuffle
  fixes position ``i`` at step ``i``, so the first ``k`` entries need only the first ``k`` swaps (tracked in a dict
  of moved positions). FourierFT takes ``n = out·in`` and ``k = n_frequency``: ~1 ms instead of ~40 s for a
  4096x11008 weight.
* ``uniform(shape, lo, hi, seed)`` / :class:`TorchGenerator` -- ``tensor.uniform_(lo, hi, generator=g)`` in
  float32: one raw draw per element in C order, ``u = (raw & 0xFFFFFF)·2⁻²⁴`` in float64, then
  ``float32(u · float64(float32(hi) − float32(lo)) + float64(float32(lo)))``.

Methods use these for the tensors PEFT regenerates from a seed instead of saving (VeRA's projections, FourierFT's
spectral indices), so they must agree with torch exactly.
"""

from __future__ import annotations

import functools

import numpy as np

# torch's randperm uses the 32-bit Fisher-Yates loop below this size (aten randperm_cpu: "for small n, preserve
# old behavior"), a 64-bit inside-out variant above it.
_RANDPERM_SMALL_LIMIT = (2**32 - 1) // 20


class TorchGenerator:
  """The raw stream of ``torch.Generator().manual_seed(seed)`` (CPU), consumed draw by draw as torch does."""

  def __init__(self, seed: int):
    self.seed = int(seed)
    self._bits = np.random.MT19937(0)
    self._bits._legacy_seeding(self.seed & 0xFFFFFFFF)

  def raw(self, n: int) -> np.ndarray:
    """The next ``n`` raw 32-bit draws (torch's ``generator->random()``), as uint64."""
    return np.asarray(self._bits.random_raw(size=int(n)), dtype=np.uint64)

  def uniform(self, shape: tuple[int, ...], lo: float, hi: float) -> np.ndarray:
    """``torch.empty(shape).uniform_(lo, hi, generator=self)`` in float32, bit-exact."""
    shape = tuple(int(s) for s in shape)
    raw = self.raw(int(np.prod(shape, dtype=np.int64)))
    u = (raw & np.uint64(0xFFFFFF)).astype(np.float64) * 2.0**-24
    lo32, hi32 = np.float32(lo), np.float32(hi)
    span = np.float64(np.float32(hi32 - lo32))  # torch computes ``to - from`` in the tensor's dtype
    return (u * span + np.float64(lo32)).astype(np.float32).reshape(shape)


def randperm(n: int, seed: int) -> np.ndarray:
  """``torch.randperm(n, generator=torch.Generator().manual_seed(seed))`` as an int64 numpy array, bit-exact.

  Cached by ``(n, seed)`` (n = 10⁶ takes ~1 s); each call returns a fresh copy.

  Args:
    n: the length of the permutation (0 <= n < 2³²/20, torch's 32-bit branch).
    seed: the generator's seed (an int64 or uint64, as torch's ``manual_seed``).

  Returns:
    The permutation of ``0 .. n-1``.
  """
  return _randperm(int(n), int(seed)).copy()


@functools.lru_cache(maxsize=32)
def _randperm(n: int, seed: int) -> np.ndarray:
  if n < 0:
    raise ValueError(f"randperm needs n >= 0, got {n}")
  if n >= _RANDPERM_SMALL_LIMIT:
    raise NotImplementedError(f"randperm(n={n}) uses torch's 64-bit shuffle, which jpeft does not reproduce")
  if n < 2:
    return np.arange(n, dtype=np.int64)
  gen = TorchGenerator(seed)
  z = (gen.raw(n - 1) % np.arange(n, 1, -1, dtype=np.uint64)).tolist()  # z_i = raw_i % (n - i)
  perm = list(range(n))
  for i, zi in enumerate(z):  # the swaps are sequential; python lists beat numpy scalar indexing here
    j = i + zi
    perm[i], perm[j] = perm[j], perm[i]
  return np.asarray(perm, dtype=np.int64)


def randperm_prefix(n: int, k: int, seed: int) -> np.ndarray:
  """``randperm(n, seed)[:k]`` (int64, bit-exact with torch) without building the whole permutation.

  Step ``i`` of torch's shuffle swaps ``r[i]`` with ``r[i + z_i]`` and never touches position ``i`` again, so the
  first ``k`` entries are final after ``k`` steps; only the positions moved so far are remembered.
  """
  n, k = int(n), min(int(k), int(n))
  if n < 0 or k < 0:
    raise ValueError(f"randperm_prefix needs n >= 0 and k >= 0, got n={n}, k={k}")
  if n >= _RANDPERM_SMALL_LIMIT:
    raise NotImplementedError(f"randperm(n={n}) uses torch's 64-bit shuffle, which jpeft does not reproduce")
  steps = min(k, n - 1) if n > 1 else 0
  z = (TorchGenerator(seed).raw(steps) % np.arange(n, n - steps, -1, dtype=np.uint64)).tolist()
  moved: dict[int, int] = {}
  out = []
  for i, zi in enumerate(z):
    j = i + zi
    vi, vj = moved.get(i, i), moved.get(j, j)
    out.append(vj)
    moved[j] = vi
  if k > steps:  # the last position (n - 1) is never a step of its own
    out.append(moved.get(n - 1, n - 1))
  return np.asarray(out, dtype=np.int64)


def uniform(shape: tuple[int, ...], lo: float, hi: float, seed: int) -> np.ndarray:
  """``torch.empty(shape).uniform_(lo, hi, generator=torch.Generator().manual_seed(seed))`` in float32."""
  return TorchGenerator(seed).uniform(shape, lo, hi)
