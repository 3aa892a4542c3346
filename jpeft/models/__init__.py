"""Model families: Llama (Llama 2/3/3.1/3.2, SmolLM), Qwen2/Qwen2.5, Qwen3, Mistral, Gemma 2, Gemma 3 (text), one decoder
(``jpeft.models.llama``; ``FAMILIES`` there lists what each family changes)."""

from jpeft.models.llama import (
  KVCache,
  LlamaConfig,
  causal_lm_loss,
  cross_entropy,
  forward,
  init_params,
  loss_positions,
  module_kinds,
  param_shapes,
)
from jpeft.models.loading import (
  EMBEDDED_MODELS,
  CheckpointError,
  embedded_model_folder,
  embedded_model_path,
  from_transformers,
  load_gguf,
  load_hf_folder,
  load_model,
  load_model_config,
  load_tokenizer,
  load_torch_model,
  params_from_state_dict,
  resolve_source,
)
