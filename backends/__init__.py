"""Backends behind one interface: ``jax`` (jpeft) and ``torch`` (transformers + PEFT)."""

from __future__ import annotations

from backends.base import Backend

BACKEND_NAMES = ("jax", "torch")


def get_backend(name: str, **kwargs) -> Backend:
  """A new backend instance by name; the implementation is imported only when asked for."""
  key = name.lower()
  if key == "torch":
    from backends.torch_backend import TorchBackend

    return TorchBackend(**kwargs)
  if key == "jax":
    from backends.jax_backend import JaxBackend

    return JaxBackend(**kwargs)
  raise ValueError(f"unknown backend {name!r}; expected one of {BACKEND_NAMES}")


__all__ = ["BACKEND_NAMES", "Backend", "get_backend"]
