import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

# Parity checks compare float32 numbers: use full-precision matmuls (a GPU defaults to reduced precision).
jax.config.update("jax_default_matmul_precision", "highest")
