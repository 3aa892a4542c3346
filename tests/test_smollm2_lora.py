"""LoRA r32 on q,k,v,o,gate,up,down of SmolLM2-135M: jpeft vs PEFT (logits and gradients); the reference
benchmark configs target the same SmolLM2 modules as PEFT's own injection."""

import glob
import json
import os

import numpy as np
import pytest
import torch
import transformers

from backends import get_backend
from jpeft import registry
from jpeft import config as config_lib
from jpeft import core
from jpeft.models import LlamaConfig
from jpeft.models.loading import embedded_model_folder

pytestmark = pytest.mark.slow
from paths import LORA_EXPERIMENTS as REFERENCE  # noqa: E402
from numerics import scaled_error  # noqa: E402

LORA_R32 = dict(
  peft_type="LORA",
  r=32,
  lora_alpha=64,
  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
)


def test_lora_r32_logits_and_grads_match_peft(tmp_path):
  jx, pt = get_backend("jax"), get_backend("torch")
  for b in (jx, pt):
    b.load_base("smollm2-135m")
  pt.attach_adapter(LORA_R32, seed=0)
  rng = np.random.default_rng(0)
  state = {k: (v + 0.02 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in pt.adapter_state_dict().items()}
  assert len(state) == 30 * 7 * 2
  pt.set_adapter_state_dict(state)
  pt.save_adapter(str(tmp_path))
  jx.load_adapter(str(tmp_path))
  ids = rng.integers(3, 49152, (2, 64)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, :20] = 0
  ref, out = pt.logits(ids, mask), jx.logits(ids, mask)
  err = float(np.abs(ref - out)[mask.astype(bool)].max())
  ratio = scaled_error(out, ref, mask=mask.astype(bool))
  print(f"SmolLM2 LoRA r32 all-linear logits max |diff| {err:.3g} ({ratio:.3g} of the largest logit)")
  assert ratio < 2e-5  # measured 2.8e-6; the same bound as the base model's parity (30 layers of fp32)
  # Training batches are right-padded (a left-padded row would score a padding position's logits).
  mask = np.ones_like(ids)
  mask[1, 44:] = 0
  labels = np.where(mask == 1, ids, -100)
  loss_pt, g_pt = pt.loss_and_grads(ids, mask, labels)
  loss_jx, g_jx = jx.loss_and_grads(ids, mask, labels)
  assert abs(loss_pt - loss_jx) < 1e-4 * loss_pt
  worst = max(float(np.abs(g_pt[k] - g_jx[k]).max() / np.abs(g_pt[k]).max()) for k in g_pt)
  print(f"SmolLM2 LoRA r32 worst relative gradient error {worst:.3g}")
  assert set(g_pt) == set(g_jx) and worst < 1e-3


def _peft_targets(hf_config, adapter_config):
  import peft

  with torch.device("meta"):
    model = transformers.AutoModelForCausalLM.from_config(hf_config)
  cfg = peft.PeftConfig.from_peft_type(
    **{k: v for k, v in adapter_config.items() if k in peft.LoraConfig.__dataclass_fields__}
  )
  pm = peft.get_peft_model(model, cfg)
  return sorted(
    n[len("base_model.model.") :]
    for n, m in pm.named_modules()
    if hasattr(m, "lora_A") and not n.endswith(("lora_A", "lora_B")) and "lora_" not in n.split(".")[-1]
  )


@pytest.mark.parametrize(
  "folder", sorted(glob.glob(os.path.join(REFERENCE, "*"))) or ["<none found>"], ids=os.path.basename
)
def test_reference_lora_configs_target_like_peft_on_smollm2(folder):
  raw = json.load(open(os.path.join(folder, "adapter_config.json")))
  hf_config = transformers.AutoConfig.from_pretrained(embedded_model_folder("smollm2-135m"))
  try:
    config = registry.config_from_dict(raw)
  except config_lib.UnsupportedConfigError as e:
    # Refused variants, each named: BD-LoRA (use_bdlora), KaSA (kasa_config), MiCA (init "mica").
    assert any(f in str(e) for f in ("use_bdlora", "kasa_config", "mica")), e
    return
  resolution = core.resolve(config, LlamaConfig.from_hf(hf_config))
  assert sorted(resolution.targets) == _peft_targets(hf_config, raw)
