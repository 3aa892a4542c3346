"""AdaLoRA beyond the method table: PEFT's config defaults and errors, the budget schedule, the orthogonality
penalty, the rank allocation step for step against PEFT's ``update_and_allocate`` on the same batches from the same
init, and pruned checkpoints (``rank_pattern`` + sliced tensors) both ways.

Bounds (relative to the scale of what is compared, ``numerics``), measured with XLA's default CPU kernels:

* the penalty against a float64 NumPy formula: measured 3.3e-9 (bound 8 eps = 9.5e-7: a sum of r·in products);
* losses of the 14 allocation steps (12 of the schedule, 2 past it): measured worst 7.9e-7 relative (bound 1e-5,
  test_parity's gradient bound; AdamW amplifies the last-bit gradient differences of small entries, as in
  test_parity's curves, measured there up to 6.65e-6). The masks (which E entries are zero after each step, and the
  allocator's ``rank_pattern``) must be equal, not close;
* logits of a pruned checkpoint loaded by the other library: test_parity's ``LOGIT_REL`` (32 eps = 3.8e-6); measured
  6.8e-7 (PEFT's file in jpeft) and 8.3e-7 (jpeft's file in PEFT).
"""

import json
import os

import numpy as np
import peft
import pytest

from backends import get_backend
from backends.tiny import make_batch, make_tiny_llama
from jpeft import core, registry, train
from jpeft.config import InvalidConfigError
from jpeft.methods import adalora
from numerics import EPS32, assert_close_to_scale

from method_table import VOCAB

LOGIT_REL = 32 * EPS32  # test_parity's
REG_REL = 8 * EPS32
LOSS_REL = 1e-5
TARGETS = ["q_proj", "v_proj", "down_proj"]
# Prunes within 12 steps: no mask at steps 1-2 (tinit), masks at 4, 6, 8 (deltaT), the final budget at step 10
# (total_step - tfinal), re-applied at 11 and 12 (and after the schedule ends).
SCHEDULE = dict(init_r=6, target_r=3, total_step=12, tinit=2, tfinal=2, deltaT=2)
OPTIMIZER = dict(lr=1e-2, weight_decay=0.1, grad_norm_clip=1.0, lr_scheduler="cosine", warmup_steps=3, total_steps=12)


def _report(what, value, bound):
  if os.environ.get("JPEFT_PRINT_ERRORS"):
    print(f"[measured] {what}: {value:.3g} (bound {bound:.3g})")


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
  return make_tiny_llama(str(tmp_path_factory.mktemp("tiny")), initializer_range=0.1)


# ------------------------------------------------------------------------------------------------------------
# Config


def test_defaults_are_peft():
  ours = registry.config_from_dict(dict(peft_type="ADALORA", total_step=10)).to_dict()
  theirs = peft.AdaLoraConfig(total_step=10).to_dict()
  for key in (
    "target_r",
    "init_r",
    "tinit",
    "tfinal",
    "deltaT",
    "beta1",
    "beta2",
    "orth_reg_weight",
    "total_step",
    "lora_alpha",
    "lora_dropout",
    "init_lora_weights",
    "r",
    "rank_pattern",
  ):
    assert ours[key] == theirs[key], key
  missing = set(theirs) - set(ours) - {"peft_type", "task_type"}
  assert not missing, missing


@pytest.mark.parametrize(
  "fields,match",
  [
    (dict(), "total_step"),
    (dict(total_step=0), "total_step"),
    (dict(total_step=10, orth_reg_weight=-0.1), "orth_reg_weight"),
    (dict(total_step=10, tinit=5, tfinal=5), "budgeting phase"),
    (dict(total_step=10, tinit=10), "budgeting phase"),
    (dict(total_step=10, use_dora=True), "DoRA"),
    (dict(total_step=10, init_lora_weights="loftq", loftq_config={"loftq_bits": 4}), "LOFTQ"),
    (dict(total_step=10, init_lora_weights="loftq"), "loftq_config"),
    (dict(total_step=10, layers_pattern="layers"), "layers_to_transform"),
  ],
)
def test_config_errors_are_peft(fields, match):
  with pytest.raises(ValueError, match=match):
    peft.AdaLoraConfig(**fields)
  with pytest.raises(InvalidConfigError, match=match):
    registry.config_from_dict(dict(peft_type="ADALORA", **fields))


def test_rank_pattern_must_be_masks_of_init_r():
  ok = registry.config_from_dict(
    dict(
      peft_type="ADALORA",
      total_step=10,
      init_r=3,
      rank_pattern={"model.layers.0.self_attn.q_proj.lora_E": [True, False, True]},
    )
  )
  assert adalora.kept_ranks(ok) == {"model.layers.0.self_attn.q_proj": (True, False, True)}
  with pytest.raises(InvalidConfigError, match="init_r"):
    registry.config_from_dict(
      dict(peft_type="ADALORA", total_step=10, init_r=4, rank_pattern={"x.q_proj.lora_E": [True, False, True]})
    )
  with pytest.raises(ValueError, match="booleans"):
    registry.config_from_dict(
      dict(peft_type="ADALORA", total_step=10, init_r=2, rank_pattern={"x.q_proj.lora_E": [1, 0]})
    )


def test_budget_schedule_is_peft():
  from peft.tuners.adalora.layer import RankAllocator

  for fields in (dict(total_step=12, tinit=2, tfinal=2, deltaT=2), dict(total_step=150, tinit=6, tfinal=15, deltaT=1)):
    config = registry.config_from_dict(dict(peft_type="ADALORA", **fields))
    ref = RankAllocator.__new__(RankAllocator)
    ref.peft_config, ref.init_bgt, ref.target_bgt = peft.AdaLoraConfig(**fields), 7 * 64, 7 * 32
    for step in range(fields["total_step"] + 3):
      assert adalora.budget_schedule(config, 7 * 64, 7 * 32, step) == ref.budget_schedule(step), step


# ------------------------------------------------------------------------------------------------------------
# The layer and the penalty


def test_default_init_is_identity_and_peft_shaped(base_folder):
  pt, jx = get_backend("torch"), get_backend("jax")
  pt.load_base(base_folder)
  jx.load_base(base_folder)
  cfg = dict(peft_type="ADALORA", target_modules=TARGETS, **SCHEDULE)
  pt.attach_adapter(cfg)
  jx.attach_adapter(cfg)
  ours, theirs = jx.adapter_state_dict(), pt.adapter_state_dict()
  assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
  assert "base_model.model.model.layers.0.self_attn.q_proj.lora_E" in ours
  for k, v in ours.items():
    if k.endswith("lora_E"):
      assert not v.any()
    else:  # N(0, 0.02²), as PEFT's
      assert abs(v.std() / theirs[k].std() - 1) < 0.25, k
  b = make_batch(0, 2, 12, VOCAB)
  plain = get_backend("jax")
  plain.load_base(base_folder)
  np.testing.assert_array_equal(
    jx.logits(b["input_ids"], b["attention_mask"]), plain.logits(b["input_ids"], b["attention_mask"])
  )


def test_regularizer_is_peft_formula(base_folder):
  jx = get_backend("jax")
  jx.load_base(base_folder)
  jx.attach_adapter(dict(peft_type="ADALORA", target_modules=TARGETS, orth_reg_weight=0.3, **SCHEDULE))
  terms = []
  for ts in jx.trainable.values():
    a, b = np.asarray(ts["lora_A"], np.float64), np.asarray(ts["lora_B"], np.float64)
    terms += [np.linalg.norm(a @ a.T - np.eye(len(a))), np.linalg.norm(b.T @ b - np.eye(b.shape[1]))]
  expected = 0.3 * np.mean(terms)
  got = core.regularizer(jx.trainable, jx.peft_config)
  assert_close_to_scale(np.float64(got), np.float64(expected), REG_REL, what="orthogonality penalty")
  # ... and the training loss carries it
  loss = train.make_loss_fn(jx.model_config, jx.peft_config)
  b = make_batch(0, 2, 12, VOCAB)
  batch = {k: np.asarray(v) for k, v in b.items()}
  with_reg = float(loss(jx.trainable, jx.params, batch)[0])
  plain = train.make_loss_fn(jx.model_config, jx.peft_config.replace(orth_reg_weight=0.0))
  assert abs(with_reg - float(plain(jx.trainable, jx.params, batch)[0]) - expected) < 1e-4


# ------------------------------------------------------------------------------------------------------------
# The allocator against PEFT's update_and_allocate


def _peft_masks(pt):
  """(E entries that are zero, rank_pattern) of PEFT's live model, keyed by module."""
  zeros = {
    n.removeprefix("base_model.model.").split(".lora_E")[0]: p.detach().numpy().ravel() == 0
    for n, p in pt.model.named_parameters()
    if ".lora_E" in n
  }
  pattern = pt.model.peft_config["default"].rank_pattern
  return zeros, None if pattern is None else {k.split(".lora_E")[0]: list(v) for k, v in pattern.items()}


def _jax_masks(jx):
  zeros = {m: np.asarray(ts["lora_E"]).ravel() == 0 for m, ts in jx.trainable.items()}
  pattern = adalora.rank_pattern(jx._opt[1])
  return zeros, None if pattern is None else {k.split(".lora_E")[0]: v for k, v in pattern.items()}


@pytest.fixture(scope="module")
def trained(base_folder):
  """Both backends from PEFT's init, 14 steps on the same batches; the per-step losses and masks."""
  cfg = dict(peft_type="ADALORA", lora_alpha=32, target_modules=TARGETS, **SCHEDULE)
  pt, jx = get_backend("torch"), get_backend("jax")
  pt.load_base(base_folder)
  jx.load_base(base_folder)
  pt.attach_adapter(cfg, seed=0)
  jx.attach_adapter(cfg, seed=0)
  jx.set_adapter_state_dict(pt.adapter_state_dict())
  pt.configure_optimizer(**OPTIMIZER)
  jx.configure_optimizer(**OPTIMIZER)
  steps = []
  for step in range(1, 15):
    b = make_batch(100 + step % 4, 3, 16, VOCAB)
    loss_pt = pt.train_step(b["input_ids"], b["attention_mask"], b["labels"])
    loss_jx = jx.train_step(b["input_ids"], b["attention_mask"], b["labels"])
    steps.append((step, loss_pt, loss_jx, _peft_masks(pt), _jax_masks(jx)))
  return pt, jx, cfg, steps


def test_allocation_matches_peft_step_for_step(trained):
  _, _, _, steps = trained
  worst = 0.0
  pruned_at = {}
  for step, loss_pt, loss_jx, (zeros_pt, pattern_pt), (zeros_jx, pattern_jx) in steps:
    assert pattern_jx == pattern_pt, step
    assert set(zeros_jx) == set(zeros_pt)
    for m in zeros_pt:
      np.testing.assert_array_equal(zeros_jx[m], zeros_pt[m], err_msg=f"step {step}: {m}")
    pruned_at[step] = int(sum(z.sum() for z in zeros_pt.values()))
    worst = max(worst, abs(loss_jx - loss_pt) / abs(loss_pt))
  _report("AdaLoRA allocation: loss", worst, LOSS_REL)
  assert worst <= LOSS_REL
  # The schedule did what it says: masks on even steps 4-8, the final budget (3 of 6 per module on average) from
  # step 10 on.
  n = len(steps[0][3][0])
  assert pruned_at[3] == 0 and pruned_at[5] == 0 and 0 < pruned_at[4] < pruned_at[8] <= 3 * n
  assert all(pruned_at[s] == 3 * n for s in (10, 11, 12, 13, 14))
  assert sum(sum(v) for v in steps[-1][3][1].values()) == 3 * n  # target_r per module on average


def test_pruned_checkpoints_load_both_ways(trained, base_folder, tmp_path):
  pt, jx, _, _ = trained
  b = make_batch(7, 3, 16, VOCAB, pad="left")
  mask = b["attention_mask"].astype(bool)
  pt.save_adapter(str(tmp_path / "peft"))
  jx.save_adapter(str(tmp_path / "jpeft"))
  configs = {}
  for side in ("peft", "jpeft"):
    with open(tmp_path / side / "adapter_config.json") as f:
      configs[side] = json.load(f)
  assert configs["jpeft"]["rank_pattern"] == configs["peft"]["rank_pattern"]
  assert all(len(v) == 6 for v in configs["jpeft"]["rank_pattern"].values())

  jx2 = get_backend("jax")
  jx2.load_base(base_folder)
  jx2.load_adapter(str(tmp_path / "peft"))
  state = jx2.adapter_state_dict()
  for key, kept in configs["peft"]["rank_pattern"].items():
    module = key.split(".lora_E")[0]
    assert state[f"base_model.model.{module}.lora_A"].shape == (sum(kept), 128 if "down_proj" in module else 64)
    assert state[f"base_model.model.{module}.lora_E"].shape == (sum(kept), 1)
  ref = pt.logits(b["input_ids"], b["attention_mask"])
  err = assert_close_to_scale(
    jx2.logits(b["input_ids"], b["attention_mask"]), ref, LOGIT_REL, mask=mask, what="PEFT's pruned file in jpeft"
  )
  _report("pruned PEFT adapter in jpeft", err, LOGIT_REL)

  pt2 = get_backend("torch")
  pt2.load_base(base_folder)
  pt2.load_adapter(str(tmp_path / "jpeft"))
  ours = jx.logits(b["input_ids"], b["attention_mask"])
  err = assert_close_to_scale(
    pt2.logits(b["input_ids"], b["attention_mask"]), ours, LOGIT_REL, mask=mask, what="jpeft's pruned file in PEFT"
  )
  _report("pruned jpeft adapter in PEFT", err, LOGIT_REL)
  assert set(pt2.adapter_state_dict()) == set(jx2.adapter_state_dict())
  # a pruned checkpoint saved again keeps its shapes and pattern
  jx2.save_adapter(str(tmp_path / "again"))
  jx3 = get_backend("jax")
  jx3.load_base(base_folder)
  jx3.load_adapter(str(tmp_path / "again"))
  for k, v in jx2.adapter_state_dict().items():
    np.testing.assert_array_equal(jx3.adapter_state_dict()[k], v)


def test_config_after_training_without_allocation_keeps_config(base_folder):
  jx = get_backend("jax")
  jx.load_base(base_folder)
  jx.attach_adapter(dict(peft_type="ADALORA", target_modules=TARGETS, **SCHEDULE))
  jx.configure_optimizer(lr=1e-3)
  assert core.config_after_training(jx.peft_config, jx._opt[1]) is jx.peft_config
  assert adalora.rank_pattern(jx._opt[1]) is None


def test_trainer_runs_the_allocator_unchanged(tmp_path):
  """``jpeft.trainer`` (make_train_step + make_optimizer, no AdaLoRA branch) prunes on schedule; its orbax
  checkpoints hold the allocator's state; the saved adapter carries the final rank_pattern, sliced."""
  import _trainer_child as setup

  from jpeft import checkpoint
  from jpeft.trainer import Trainer

  model_config, params = setup.make_model()
  train_data, _, _ = setup.make_data()
  config = registry.config_from_dict(
    dict(peft_type="ADALORA", lora_alpha=32, target_modules=TARGETS, **dict(SCHEDULE, total_step=6, tfinal=1))
  )
  cfg = setup.train_config(max_steps=6, eval_steps=0, checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=3)
  trainer = Trainer(model_config, params, config, setup.make_tokenizer(), train_data, None, None, cfg)
  trainer.run()
  pattern = adalora.rank_pattern(trainer.opt_state)
  assert pattern is not None and sum(sum(v) for v in pattern.values()) == 3 * len(pattern)
  for m, ts in trainer.trainable.items():  # after the final allocation (step 5) the mask is re-applied (step 6)
    np.testing.assert_array_equal(np.asarray(ts["lora_E"]).ravel() != 0, pattern[f"{m}.lora_E"])
  checkpoint.save_pretrained(tmp_path / "out", trainer.trainable, config, trainer.params, opt_state=trainer.opt_state)
  loaded, adapter, _ = checkpoint.load_pretrained(tmp_path / "out", params, model_config)
  assert {f"{m}.lora_E": list(v) for m, v in adalora.kept_ranks(loaded).items()} == pattern
  assert all(adapter[m]["lora_A"].shape[0] == sum(pattern[f"{m}.lora_E"]) for m in adapter)
