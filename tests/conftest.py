import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

# Parity checks compare float32 numbers: use full-precision matmuls (a GPU defaults to reduced precision).
jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture
def no_loading(monkeypatch):
  """Fail the test if any runner loads a model: input errors must be found before the weights load."""
  from experiments import runners

  def refuse(*args, **kwargs):
    raise AssertionError("the model was loaded before the input error")

  for cls in (runners.Runner, runners.JaxRunner, runners.TorchRunner):
    monkeypatch.setattr(cls, "load", refuse)
  monkeypatch.setattr("jpeft.models.loading.load_hf_folder", refuse)
