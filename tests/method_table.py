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
  # IA3: output scaling (out, 1) on k/v, input scaling (1, in) on the feed-forward down_proj
  "ia3": dict(peft_type="IA3", target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
  "ia3-no-ff": dict(peft_type="IA3", target_modules=["q_proj", "v_proj", "up_proj"], feedforward_modules=[]),
  # target_modules and feedforward_modules null: PEFT's table for llama (k, v, down; down as feed-forward)
  "ia3-default-targets": dict(peft_type="IA3"),
  # OFT on the tiny model's in-features (64 for attention, 128 for down_proj): blocks of 16 (4 or 8 blocks)
  "oft": dict(peft_type="OFT", r=0, oft_block_size=16, target_modules=["q_proj", "v_proj", "down_proj"]),
  "oft-exact-cayley": dict(
    peft_type="OFT", r=0, oft_block_size=16, use_cayley_neumann=False, target_modules=["q_proj", "v_proj"]
  ),
  "oft-block-share": dict(
    peft_type="OFT", r=0, oft_block_size=16, block_share=True, target_modules=["q_proj", "v_proj", "down_proj"]
  ),
  # eps 0.1: with 6e-3 the constrained rotations move the logits by 0.0035 of their scale only (the parity tests want
  # 0.02); the perturbed weights still lie outside the bound, so the projection is exercised
  "oft-coft": dict(peft_type="OFT", r=0, oft_block_size=16, coft=True, eps=0.1, target_modules=["q_proj", "o_proj"]),
  "oft-r": dict(peft_type="OFT", r=4, oft_block_size=0, target_modules=["k_proj", "up_proj"]),
  # VeRA: one shared (r, max_in) / (max_out, r) pair over targets of different shapes
  # d_initial=1.0: with PEFT's 0.1 the perturbed adapter moves the logits by only 0.0044 of their scale (the parity
  # tests want 0.02) and 20 steps lower the loss by 0.005 (they want 0.01)
  "vera": dict(peft_type="VERA", r=8, d_initial=1.0, target_modules=["q_proj", "v_proj", "down_proj"]),
  "vera-no-projection": dict(
    peft_type="VERA",
    r=8,
    d_initial=1.0,
    save_projection=False,
    projection_prng_key=7,
    target_modules=["q_proj", "up_proj"],
  ),
  # FourierFT: the default spectrum N(0, 1) is not the identity; init_weights=True is (zeros)
  "fourierft": dict(peft_type="FOURIERFT", n_frequency=128, scaling=300.0, target_modules=["q_proj", "v_proj"]),
  "fourierft-zero-init": dict(
    peft_type="FOURIERFT",
    n_frequency=32,
    scaling=300.0,
    init_weights=True,
    n_frequency_pattern={"v_proj": 48},
    random_loc_seed=11,
    target_modules=["q_proj", "v_proj", "down_proj"],
  ),
  # Lily: lily_B shared by every layer of a target, lily_A by stride_A consecutive layers, a router per layer
  "lily": dict(peft_type="LILY", r=8, num_B=2, scaling=2.0, target_modules=["q_proj", "v_proj"]),
  "lily-stride": dict(
    peft_type="LILY", r=4, num_B=3, stride_A=2, scaling=3.0, target_modules=["q_proj", "o_proj", "down_proj"]
  ),
  # --- boft rows (BOFT: one butterfly factor, as PEFT runs it on a CPU; factor > 1 in tests/test_boft.py) ---
  "boft": dict(peft_type="BOFT", boft_block_size=8, target_modules=["q_proj", "v_proj", "down_proj"]),
  "boft-block-num": dict(peft_type="BOFT", boft_block_size=0, boft_block_num=4, target_modules=["k_proj", "up_proj"]),
  "boft-init-false": dict(
    peft_type="BOFT", boft_block_size=16, init_weights=False, target_modules=["o_proj", "gate_proj"]
  ),
  # --- hra rows ---
  "hra": dict(peft_type="HRA", r=8, target_modules=["q_proj", "v_proj", "up_proj"]),
  "hra-gs": dict(peft_type="HRA", r=4, apply_GS=True, target_modules=["q_proj", "down_proj"]),
  # init_weights=False: r independent columns (not the identity at init)
  "hra-init-false": dict(peft_type="HRA", r=6, init_weights=False, target_modules=["k_proj", "o_proj", "down_proj"]),
  # --- beft rows ---
  # BEFT on the tiny model (no biases): not mergeable, as in PEFT (merging into a base bias: tests/test_beft.py)
  "beft": dict(peft_type="BEFT", target_modules=["q_proj", "v_proj", "down_proj"]),
  # every linear. (PEFT's default target, v_proj alone, lowers the loss by only 0.0104 in the 16 steps of the curves
  # (bound 0.01); it and init_weights=False, whose N(0, 1) biases the steps barely move, are in tests/test_beft.py)
  "beft-all-linear": dict(peft_type="BEFT", target_modules="all-linear"),
  # --- loha rows ---
  # alpha 32 / 16: ΔW is a Hadamard product of two small products; with alpha = 2r the perturbed adapter moves the
  # logits by only 0.015 of their scale (the parity tests want 0.02)
  "loha": dict(peft_type="LOHA", r=4, alpha=32, target_modules=["q_proj", "v_proj", "down_proj"]),
  "loha-patterns": dict(
    peft_type="LOHA", r=4, alpha=16, target_modules=ALL, rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 3}
  ),
  "loha-init-false": dict(peft_type="LOHA", r=2, alpha=3, init_weights=False, target_modules=["k_proj", "up_proj"]),
  # --- lokr rows ---
  # q/v (64 -> 64 / 32): full w1 and w2 (r=4 is not < max(b, d) / 2 = 4); down (128 -> 64): w2 = w2_a w2_b
  "lokr": dict(peft_type="LOKR", r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
  # factor 8: k (64 -> 32) splits out 32 as (8, 4) (PEFT does not reorder), in 64 as (8, 8); w1 and w2 both factored
  "lokr-decompose-both": dict(
    peft_type="LOKR",
    r=2,
    alpha=4,
    decompose_both=True,
    decompose_factor=8,
    init_weights=False,
    target_modules=["k_proj", "up_proj"],
  ),
  "lokr-lycoris-patterns": dict(
    peft_type="LOKR",
    r=8,
    alpha=8,
    init_weights="lycoris",
    target_modules=ALL,
    rank_pattern={"down_proj": 2},
    alpha_pattern={"o_proj": 3},
  ),
  # --- miss rows ---
  "miss": dict(peft_type="MISS", r=16, target_modules=["q_proj", "v_proj", "down_proj"]),
  # bat: r | in and r | out on q (64x64), v (32x64) and up (128x64); not additive (no unmerge)
  "miss-bat": dict(peft_type="MISS", r=16, init_weights="bat", target_modules=["q_proj", "v_proj", "up_proj"]),
  "miss-mini": dict(peft_type="MISS", r=16, mini_r=4, init_weights="mini", target_modules=["q_proj", "up_proj"]),
  # r = 24 divides neither in = 64 (q) nor 128 (down): the input is zero-padded; init_weights=False: kaiming (r, out)
  "miss-pad-init-false": dict(peft_type="MISS", r=24, init_weights=False, target_modules=["q_proj", "down_proj"]),
  # --- adalora rows ---
  # init_lora_weights=False (A, E, B ~ N(0, 1)): with PEFT's default init (E = 0, A, B ~ N(0, 0.02²)) the perturbed
  # adapter moves the logits by ~1e-4 of their scale (the parity tests want 0.02); lora_alpha 0.05 brings the N(0, 1)
  # product to the base's scale, orth_reg_weight 0.01 keeps the penalty (‖AAᵀ − I‖_F ~ 150 at that init) near the
  # data loss. The schedule prunes within the 20 steps of the curves: masks at steps 6, 8, 10, 12, the final budget
  # (3 per module) at step 14, re-applied at 15-20.
  "adalora": dict(
    peft_type="ADALORA",
    init_r=6,
    target_r=3,
    lora_alpha=0.05,
    init_lora_weights=False,
    orth_reg_weight=0.01,
    total_step=20,
    tinit=4,
    tfinal=6,
    deltaT=2,
    target_modules=["q_proj", "v_proj", "down_proj"],
  ),
  # --- ln tuning rows ---
  # trained copies of the norms (PEFT's default targets: both layer norms and the final norm); identity at init
  "ln-tuning": dict(peft_type="LN_TUNING"),
  "ln-tuning-exclude": dict(
    peft_type="LN_TUNING", target_modules=["input_layernorm", "norm"], exclude_modules=["layers.0.input_layernorm"]
  ),
  # --- end of method rows ---
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


def identity_at_init(name: str) -> bool:
  """Whether a row's fresh adapter is the identity, as its method declares (LoRA with init_lora_weights=False and
  FourierFT's default init_weights=False deliberately are not)."""
  from jpeft import registry

  cfg = METHODS[name]
  return registry.get_method(cfg["peft_type"]).identity_at_init(registry.config_from_dict(cfg))


def copy_group(peft_type: str, key: str, value):
  """What identifies the saved copies of one tensor, for perturbing a state dict: the key itself, except for a method
  with tied tensors (Lily), whose copies of one tensor shared across layers (the same module and tensor name in
  several layers, with equal values) must get the same perturbation to stay one tensor."""
  import re

  import numpy as np

  from jpeft import registry

  if registry.get_method(peft_type).tied_tensors is None:
    return key
  return re.sub(r"\.layers\.\d+\.", ".layers.*.", key), np.shape(value), np.asarray(value).tobytes()


# Rows whose merge can be undone from the merged weights alone by subtraction (additive deltas, no full copies):
# not DoRA, IA3, OFT (multiplicative), nor modules_to_save copies.
UNMERGEABLE = {
  # additive methods of issue 10 (helpers: keep only the rows whose method gives a delta())
  "adalora",
  "loha",
  "loha-patterns",
  "loha-init-false",
  "lokr",
  "lokr-decompose-both",
  "lokr-lycoris-patterns",
  "miss",
  "miss-mini",
  "miss-pad-init-false",
  "vera",
  "vera-no-projection",
  "fourierft",
  "fourierft-zero-init",
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


# Rows whose adapted modules have no merged weight (Lily routes on the input; BEFT merges only into a base bias, which
# the tiny Llama lacks): merge raises UnmergeableError.
NO_MERGE = {"lily", "lily-stride", "beft", "beft-all-linear"}
