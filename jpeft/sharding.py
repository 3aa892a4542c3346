"""SPMD placement on a ``jax.sharding.Mesh`` with a ``"data"`` and an ``"fsdp"`` axis.

* Base params: every 2-D weight is split on ``"fsdp"`` along its largest dimension that the fsdp size
  divides (the first such dimension on a tie); everything else is replicated.
* Adapters follow the base weight they adapt, as each method declares (``Method.tensor_axes``): a tensor dimension
  that plays the role of the base's out dimension (``lora_B`` (out, r), DoRA's magnitude, IA3's ``(out, 1)``
  scale) takes the base's out-dim sharding; one that plays the role of its in dimension (``lora_A`` (r, in)) takes
  its in-dim sharding; a full copy (``modules_to_save``) takes the base's own sharding. Anything else (model-level
  tensors, OFT's blocks, spectra) is replicated.
* Batches are split along their first (batch) dimension on ``"data"``.
* Optimizer states: every leaf shaped like a trainable tensor (Adam's moments) takes that tensor's
  sharding; counters and other leaves are replicated.

A sharding never changes what is computed (XLA inserts the collectives), only where it lives, so every rule
falls back to replication whenever a dimension is not divisible by its mesh axis.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jpeft import core

DATA = "data"
FSDP = "fsdp"
AXES = (DATA, FSDP)


def make_mesh(data: int | None = None, fsdp: int = 1, devices=None) -> Mesh:
  """A ``(data, fsdp)`` mesh over ``devices`` (default ``jax.devices()``).

  ``data=None`` uses every device: ``len(devices) // fsdp``. Fewer devices than available may be asked
  for (the first ``data * fsdp`` are used); more is an error.
  """
  devices = list(jax.devices() if devices is None else devices)
  if fsdp < 1:
    raise ValueError(f"fsdp must be >= 1, got {fsdp}")
  if data is None:
    if len(devices) % fsdp:
      raise ValueError(f"fsdp={fsdp} does not divide the {len(devices)} devices")
    data = len(devices) // fsdp
  if data < 1:
    raise ValueError(f"data must be >= 1, got {data}")
  if data * fsdp > len(devices):
    raise ValueError(
      f"a mesh of data={data} x fsdp={fsdp} needs {data * fsdp} devices, only {len(devices)} are available"
    )
  return Mesh(np.asarray(devices[: data * fsdp], dtype=object).reshape(data, fsdp), AXES)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _axis_size(mesh: Mesh, axis: str) -> int:
  return int(mesh.shape[axis])


def _spec_entries(sharding, ndim: int) -> tuple:
  spec = tuple(sharding.spec) if isinstance(sharding, NamedSharding) else ()
  return spec + (None,) * (ndim - len(spec))


def _named(mesh: Mesh, entries, shape) -> NamedSharding:
  """``NamedSharding`` of ``entries``, dropping any axis that does not divide its dimension."""
  out = []
  for size, axis in zip(shape, entries):
    if axis is not None:
      names = axis if isinstance(axis, tuple) else (axis,)
      if size % int(np.prod([_axis_size(mesh, a) for a in names])):
        axis = None
    out.append(axis)
  while out and out[-1] is None:
    out.pop()
  return NamedSharding(mesh, P(*out))


# ----------------------------------------------------------------------------------------------------------
# Base params


def param_sharding(shape, mesh: Mesh) -> NamedSharding:
  """The sharding of one base tensor: 2-D split on ``"fsdp"`` along its largest divisible dim."""
  shape = tuple(int(d) for d in shape)
  n = _axis_size(mesh, FSDP)
  if len(shape) != 2 or n == 1:
    return replicated(mesh)
  candidates = [i for i, d in enumerate(shape) if d % n == 0]
  if not candidates:
    return replicated(mesh)
  dim = max(candidates, key=lambda i: (shape[i], -i))
  entries = [None, None]
  entries[dim] = FSDP
  return NamedSharding(mesh, P(*entries))


def param_shardings(params: Mapping[str, Any], mesh: Mesh) -> dict[str, NamedSharding]:
  """``{name: NamedSharding}`` for a flat base-param dict (see :func:`param_sharding`)."""
  return {name: param_sharding(np.shape(value), mesh) for name, value in params.items()}


def shard_params(params: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """The base params placed on ``mesh`` with :func:`param_shardings` (inspect them with ``x.sharding``)."""
  shardings = param_shardings(params, mesh)
  return {name: jax.device_put(value, shardings[name]) for name, value in params.items()}


# ----------------------------------------------------------------------------------------------------------
# Adapters


def _base_key(module: str, params_shardings: Mapping[str, Any]) -> str | None:
  key = module + ".weight"
  if key in params_shardings:
    return key
  if module == "lm_head" and "model.embed_tokens.weight" in params_shardings:  # tied head
    return "model.embed_tokens.weight"
  return None


def _follow(module: str, tensor: str, shape, base_shape, config, copies) -> list[int | None]:
  """For each dim of an adapter tensor, the base dim (0 = out, 1 = in) whose sharding it takes, or None.

  The method declares it (``Method.tensor_axes``); a ``modules_to_save`` copy follows its base dim for dim.
  """
  if module in copies:
    return list(range(len(shape))) if base_shape is None or tuple(shape) == tuple(base_shape) else [None] * len(shape)
  method = core.get_method(config.peft_type)
  axes = None
  if method.tensor_axes is not None:
    axes = method.tensor_axes(tensor, core.module_kind(module), config)
  if axes is None or len(axes) != len(shape):
    return [None] * len(shape)
  return list(axes)


def adapter_shardings(
  adapter: Mapping[str, Mapping[str, Any]], params_shardings: Mapping[str, Any], mesh: Mesh, config=None
) -> dict[str, dict[str, NamedSharding]]:
  """``{module: {tensor: NamedSharding}}`` derived from the sharding of each tensor's base weight.

  Args:
    adapter: the adapter pytree ``{module: {tensor: array}}``.
    params_shardings: ``{param name: NamedSharding}`` (:func:`param_shardings`) or the placed params
      themselves (their ``.sharding`` and shapes are read).
    mesh: the mesh.
    config: the adapter's PEFT config: its method says which base axis each tensor dim follows. Without it (full
      fine-tuning), every tensor is replicated.
  """
  copies = set(core._modules_to_save(adapter, config)) if config is not None else set()
  out: dict[str, dict[str, NamedSharding]] = {}
  for module, tensors in adapter.items():
    key = _base_key(module, params_shardings)
    base = params_shardings.get(key) if key is not None else None
    base_shape = None
    if base is not None and hasattr(base, "sharding") and hasattr(base, "shape"):
      base_shape, base = tuple(base.shape), base.sharding
    out[module] = {}
    for tensor, value in tensors.items():
      shape = tuple(int(d) for d in np.shape(value))
      if base is None or config is None:
        out[module][tensor] = replicated(mesh)
        continue
      base_entries = _spec_entries(base, 2)
      follow = _follow(module, tensor, shape, base_shape, config, copies)
      entries = [None if d is None else base_entries[d] for d in follow]
      out[module][tensor] = _named(mesh, entries, shape)
  return out


def shard_adapter(adapter, params_shardings, mesh: Mesh, config=None):
  """The adapter placed on ``mesh`` with :func:`adapter_shardings`."""
  shardings = adapter_shardings(adapter, params_shardings, mesh, config)
  return {m: {t: jax.device_put(v, shardings[m][t]) for t, v in ts.items()} for m, ts in adapter.items()}


# ----------------------------------------------------------------------------------------------------------
# Batches and optimizer states


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  del ndim
  return NamedSharding(mesh, P(DATA))


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """Every array of ``batch`` split along its first dim on ``"data"`` (the size must divide it)."""
  n = _axis_size(mesh, DATA)
  out = {}
  for name, value in batch.items():
    rows = np.shape(value)[0]
    if rows % n:
      raise ValueError(f"batch {name!r} has {rows} rows, not divisible by the mesh's data size {n}")
    out[name] = jax.device_put(value, batch_sharding(mesh))
  return out


def tree_shardings_like(tree, reference, reference_shardings, mesh: Mesh):
  """Shardings for ``tree`` (e.g. an optimizer state): a leaf whose key path ends with the key path of a
  ``reference`` leaf of the same shape takes that leaf's sharding; every other leaf is replicated.

  ``tree`` may hold arrays or ``jax.ShapeDtypeStruct``s (``jax.eval_shape(optimizer.init, params)``).
  """
  ref_leaves = jax.tree_util.tree_flatten_with_path(reference)[0]
  ref_shardings = jax.tree_util.tree_leaves(reference_shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  by_path = {tuple(path): (tuple(np.shape(leaf)), s) for (path, leaf), s in zip(ref_leaves, ref_shardings)}
  lengths = sorted({len(p) for p in by_path}, reverse=True)

  def pick(path, leaf):
    path = tuple(path)
    for n in lengths:
      if n <= len(path):
        hit = by_path.get(path[len(path) - n :])
        if hit is not None and hit[0] == tuple(np.shape(leaf)):
          return hit[1]
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(pick, tree)
