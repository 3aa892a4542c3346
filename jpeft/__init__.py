"""jpeft: Hugging Face PEFT's methods as functional JAX parameter transforms, with PEFT's file format.

The public names (``jpeft.__all__``)::

  model_config, params = jpeft.load_model("smollm2-135m")           # or a HF folder, .gguf file, hub id
  config = jpeft.LoraConfig(r=16, target_modules=["q_proj", "v_proj"])  # or jpeft.load_config(path): any method
  adapter, params = jpeft.init(key, params, config, model_config)
  step = jpeft.make_train_step(model_config, config, jpeft.make_optimizer(adapter, config, lr=1e-3))
  jpeft.save_pretrained(folder, adapter, config, params)             # PyTorch PEFT loads the folder
  merged = jpeft.merge(params, adapter, config)                      # plain params

Any Flax model (an ``nnx.State``, a linen ``{"params": ...}`` tree, a nested dict) works the same way: ``jpeft.init(key,
state, config)`` targets the tree's own paths, ``jpeft.apply(state, adapter, config, materialize=True)`` returns a
tree of the same structure with the adapted weights as arrays, and ``jpeft.save_pretrained(folder, adapter, config,
state, name_map=...)`` writes PEFT's format under the Hugging Face module names (:mod:`jpeft.tree`).

The submodules (``jpeft.core``, ``jpeft.checkpoint``, ``jpeft.convert``, ``jpeft.trainer``, ``jpeft.models``, ...)
hold the rest; ``jpeft.generate`` is the generation function (its module is ``jpeft.generate`` in
``sys.modules``, imported as ``from jpeft.generate import ...``).
"""

from jpeft import registry as _registry
from jpeft.checkpoint import load_pretrained, save_merged_model
from jpeft.config import (
  AdapterCheckpointError,
  ConversionError,
  InvalidConfigError,
  JpeftError,
  PeftConfig,
  UnmergeableError,
  UnsupportedConfigError,
)
from jpeft.convert import check_vllm
from jpeft.convert import to_lora as convert_to_lora
from jpeft.core import unmerge
from jpeft.generate import generate
from jpeft.methods.adalora import AdaLoraConfig
from jpeft.methods.beft import BeftConfig
from jpeft.methods.boft import BOFTConfig
from jpeft.methods.fourierft import FourierFTConfig
from jpeft.methods.hra import HRAConfig
from jpeft.methods.ia3 import IA3Config
from jpeft.methods.lily import LilyConfig
from jpeft.methods.ln_tuning import LNTuningConfig
from jpeft.methods.loha import LoHaConfig
from jpeft.methods.lokr import LoKrConfig
from jpeft.methods.lora import LoraConfig
from jpeft.methods.miss import MissConfig
from jpeft.methods.oft import OFTConfig
from jpeft.methods.vera import VeraConfig
from jpeft.models import load_model, load_tokenizer
from jpeft.optim import make_optimizer
from jpeft.registry import config_from_dict, load_config
from jpeft.train import make_train_step
from jpeft.tree import TreeLayout, apply, describe, init, merge, save_pretrained

registered_peft_types = _registry.registered_peft_types

__all__ = [
  "AdaLoraConfig",
  "AdapterCheckpointError",
  "BOFTConfig",
  "BeftConfig",
  "ConversionError",
  "FourierFTConfig",
  "HRAConfig",
  "IA3Config",
  "InvalidConfigError",
  "JpeftError",
  "LNTuningConfig",
  "LilyConfig",
  "LoHaConfig",
  "LoKrConfig",
  "LoraConfig",
  "MissConfig",
  "OFTConfig",
  "PeftConfig",
  "TreeLayout",
  "UnmergeableError",
  "UnsupportedConfigError",
  "VeraConfig",
  "apply",
  "check_vllm",
  "config_from_dict",
  "convert_to_lora",
  "describe",
  "generate",
  "init",
  "load_config",
  "load_model",
  "load_pretrained",
  "load_tokenizer",
  "make_optimizer",
  "make_train_step",
  "merge",
  "registered_peft_types",
  "save_merged_model",
  "save_pretrained",
  "unmerge",
]
