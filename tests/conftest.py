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


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """A tiny random Llama folder (backends.tiny.make_tiny_llama, initializer_range 0.1), one per test module."""
  from backends.tiny import make_tiny_llama

  return make_tiny_llama(str(tmp_path_factory.mktemp("tiny")), initializer_range=0.1)


@pytest.fixture(scope="module")
def torch_base(folder):
  """The tiny Llama in transformers (fp32, eval mode); copy it before wrapping it in PEFT."""
  import torch
  import transformers

  return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def jax_model(folder):
  """``(LlamaConfig, params)`` of the tiny Llama in jpeft."""
  from jpeft.models import load_model

  return load_model(folder)
