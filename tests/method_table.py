"""The methods every table-driven test runs over (conformance and PEFT parity): one row per method/variant.

Adding a method to jpeft means adding its rows here; both test files pick them up.
"""

VOCAB = 256
QV = ["q_proj", "v_proj"]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# name -> adapter_config.json content
METHODS = {
  "lora": dict(peft_type="LORA", r=4, lora_alpha=8, target_modules=QV),
  "lora-all-linear": dict(peft_type="LORA", r=4, lora_alpha=16, target_modules="all-linear"),
  "rslora": dict(peft_type="LORA", r=8, lora_alpha=8, use_rslora=True, target_modules=ALL),
  "dora": dict(peft_type="LORA", r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
  "lora-init-false": dict(peft_type="LORA", r=4, lora_alpha=8, init_lora_weights=False, target_modules=QV),
  "lora-gaussian": dict(peft_type="LORA", r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=QV),
  "lora-pissa": dict(peft_type="LORA", r=4, lora_alpha=8, init_lora_weights="pissa", target_modules=QV),
  "lora-olora": dict(
    peft_type="LORA", r=4, lora_alpha=8, init_lora_weights="olora", target_modules=["o_proj", "up_proj"]
  ),
  "lora-embedding": dict(peft_type="LORA", r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
  "lora-patterns": dict(
    peft_type="LORA",
    r=4,
    lora_alpha=8,
    target_modules=ALL,
    rank_pattern={"v_proj": 2, "layers.1.mlp.down_proj": 6},
    alpha_pattern={"o_proj": 3},
  ),
  "lora-modules-to-save": dict(peft_type="LORA", r=4, lora_alpha=8, target_modules=QV, modules_to_save=["lm_head"]),
  # Embedding LoRA on the input and a trained copy of the head: on a tied base (SmolLM2) the two ends of one matrix.
  "lora-embedding-head": dict(
    peft_type="LORA", r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], modules_to_save=["lm_head"]
  ),
  "lora-layers": dict(peft_type="LORA", r=4, lora_alpha=8, target_modules=ALL, layers_to_transform=[1]),
}

# Train-mode dropout (tests/test_dropout_parity.py injects jpeft's masks into PEFT; the other tests compare
# without dropout, as the two libraries' masks differ). lora_dropout = 0.3 = test_dropout_parity.RATE.
DROPOUT_METHODS = {
  "lora-dropout": dict(
    peft_type="LORA", r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["q_proj", "v_proj", "down_proj"]
  ),
  "dora-dropout": dict(
    peft_type="LORA",
    r=4,
    lora_alpha=8,
    lora_dropout=0.3,
    use_dora=True,
    target_modules=["q_proj", "v_proj", "down_proj"],
  ),
}

# Rows that the parity tests also run on a base whose lm_head is tied to embed_tokens (SmolLM2's layout): PEFT's
# embedding LoRA changes the input lookup only, and its modules_to_save copy of a tied lm_head is a new, untied matrix.
TIED = ("lora-embedding", "lora-modules-to-save", "lora-embedding-head")

# Rows whose adapter is the identity at init, as PEFT's is (init_lora_weights=False is deliberately not).
IDENTITY_AT_INIT = {name for name, cfg in METHODS.items() if cfg.get("init_lora_weights", True) is not False}
# Rows whose merge can be undone from the merged weights alone (additive deltas, no full copies).
UNMERGEABLE = {
  "lora",
  "lora-all-linear",
  "rslora",
  "lora-init-false",
  "lora-gaussian",
  "lora-embedding",
  "lora-patterns",
  "lora-layers",
  "lora-pissa",
  "lora-olora",
}
