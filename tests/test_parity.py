"""Parity with PyTorch PEFT, through the backend interface only: one row per method in ``METHODS``.

For each row, with non-identity adapter weights (every tensor perturbed, so B ≠ 0):
  (a) jpeft -> save -> PEFT load: logits equal;
  (b) PEFT-initialised adapter -> save -> jpeft load: logits equal, same key set;
  (c) gradients w.r.t. every adapter tensor equal;
  (d) from the same init on the same batches, 20 AdamW steps give the same loss curve.

Tolerances (fp32 everywhere, tiny model with logits of size ~5): logits 2e-5 absolute -- float32's
epsilon (1.2e-7) times logit size times the summation depth of two layers puts honest differences at a
few 1e-6. PiSSA/OLoRA recompute their residual base ``W − sB₀A₀`` from each library's own SVD/QR
(LAPACK through torch vs XLA's): the residuals differ by ~1e-7 per weight, which the perturbed adapter
carries to ~2.5e-5 in the logits (measured), so those rows are held to 1e-4.
Gradients 1e-4 relative to the largest gradient of the tensor. Loss curves 1e-3 relative (the issue's
bar); LoRA-FA projects B's gradient under bf16 autocast in PEFT (on CPU too), so its curve is held to 1e-2.
"""

import numpy as np
import pytest

from backends import get_backend
from backends.tiny import make_batch, make_tiny_llama

from method_table import METHODS, VOCAB

OPTIMIZERS = {
  "adamw": dict(
    lr=1e-2,
    weight_decay=0.1,
    grad_norm_clip=1.0,
    optimizer_type="AdamW",
    lr_scheduler="cosine",
    warmup_steps=3,
    total_steps=20,
  ),
  "lora-fa": dict(lr=1e-2, weight_decay=0.1, optimizer_type="lora-fa"),
  "lora+": dict(lr=2e-3, weight_decay=0.0, optimizer_type="lora+", loraplus_lr_ratio=8.0),
}


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
  return make_tiny_llama(str(tmp_path_factory.mktemp("base")), initializer_range=0.1)


@pytest.fixture(scope="module")
def backends(base_folder):
  out = {}
  for name in ("jax", "torch"):
    b = get_backend(name)
    b.load_base(base_folder)
    out[name] = b
  return out


def _perturbed(state, seed):
  """Every adapter tensor moved away from its init (B ≠ 0, magnitudes ≠ ‖W‖)."""
  rng = np.random.default_rng(seed)
  out = {}
  for k, v in state.items():
    if ".base_layer." in k:
      out[k] = v
    else:
      out[k] = (v + 0.1 * rng.standard_normal(v.shape) * (np.abs(v).mean() + 0.1)).astype(v.dtype)
  return out


def _logit_tol(method):
  return 1e-4 if METHODS[method].get("init_lora_weights") in ("pissa", "olora") else 2e-5


def _same_adapter_on_both(backends, method, *, seed, perturb_seed):
  """PEFT initialises the adapter, every tensor is perturbed, and both backends get the very same tensors."""
  jx, pt = backends["jax"], backends["torch"]
  pt.attach_adapter(METHODS[method], seed=seed)
  state = _perturbed(pt.adapter_state_dict(), perturb_seed)
  pt.set_adapter_state_dict(state)
  jx.attach_adapter(METHODS[method], seed=seed)
  jx.set_adapter_state_dict(state)
  return jx, pt


def _batch(seed=0, pad="right"):
  return make_batch(seed, 3, 16, VOCAB, pad=pad)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_jpeft_adapter_loads_in_peft(method, backends, tmp_path):
  jx, pt = backends["jax"], backends["torch"]
  jx.attach_adapter(METHODS[method], seed=1)
  jx.set_adapter_state_dict(_perturbed(jx.adapter_state_dict(), 0))
  jx.save_adapter(str(tmp_path))
  pt.load_adapter(str(tmp_path))
  assert set(pt.adapter_state_dict()) == set(jx.adapter_state_dict())
  b = _batch(pad="left")
  ref, out = pt.logits(b["input_ids"], b["attention_mask"]), jx.logits(b["input_ids"], b["attention_mask"])
  mask = b["attention_mask"].astype(bool)
  assert np.abs(ref - out)[mask].max() < _logit_tol(method)
  base = get_backend("torch")
  base.load_base(jx.source)
  plain = base.logits(b["input_ids"], b["attention_mask"])
  assert np.abs(plain - ref)[mask].max() > 1e-3  # the adapter does something


@pytest.mark.parametrize("method", sorted(METHODS))
def test_peft_adapter_loads_in_jpeft(method, backends, tmp_path):
  jx, pt = backends["jax"], backends["torch"]
  pt.attach_adapter(METHODS[method], seed=2)
  pt.set_adapter_state_dict(_perturbed(pt.adapter_state_dict(), 1))
  pt.save_adapter(str(tmp_path))
  jx.load_adapter(str(tmp_path))
  state_pt, state_jx = pt.adapter_state_dict(), jx.adapter_state_dict()
  assert set(state_pt) == set(state_jx)
  for k in state_pt:
    np.testing.assert_array_equal(state_pt[k], state_jx[k])
  b = _batch()
  mask = b["attention_mask"].astype(bool)
  ref, out = pt.logits(b["input_ids"], b["attention_mask"]), jx.logits(b["input_ids"], b["attention_mask"])
  assert np.abs(ref - out)[mask].max() < _logit_tol(method)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_gradients_match(method, backends):
  jx, pt = _same_adapter_on_both(backends, method, seed=3, perturb_seed=2)
  b = _batch(seed=5)
  loss_pt, g_pt = pt.loss_and_grads(b["input_ids"], b["attention_mask"], b["labels"])
  loss_jx, g_jx = jx.loss_and_grads(b["input_ids"], b["attention_mask"], b["labels"])
  assert abs(loss_pt - loss_jx) < 1e-5 * max(1.0, abs(loss_pt))
  assert set(g_pt) == set(g_jx) and g_pt
  for k in g_pt:
    scale = np.abs(g_pt[k]).max()
    assert scale > 0, k
    assert np.abs(g_pt[k] - g_jx[k]).max() <= 1e-4 * scale, k


TRAIN_ROWS = [(m, "adamw") for m in sorted(METHODS)] + [
  ("lora", "lora-fa"),
  ("lora", "lora+"),
  ("lora-embedding", "lora+"),
]


@pytest.mark.parametrize("method,optimizer", TRAIN_ROWS)
def test_training_curves_match(method, optimizer, backends):
  jx, pt = _same_adapter_on_both(backends, method, seed=4, perturb_seed=3)
  pt.configure_optimizer(**OPTIMIZERS[optimizer])
  jx.configure_optimizer(**OPTIMIZERS[optimizer])
  curves = {"jax": [], "torch": []}
  for step in range(20):
    b = _batch(seed=100 + step % 4)
    curves["torch"].append(pt.train_step(b["input_ids"], b["attention_mask"], b["labels"]))
    curves["jax"].append(jx.train_step(b["input_ids"], b["attention_mask"], b["labels"]))
  t, j = np.array(curves["torch"]), np.array(curves["jax"])
  assert t[-1] < t[0]  # it trains
  tol = 1e-2 if optimizer == "lora-fa" else 1e-3
  assert np.max(np.abs(t - j) / np.abs(t)) < tol, (t, j)


def test_bfloat16_base_keeps_fp32_adapter_like_peft(base_folder, tmp_path):
  """PEFT's autocast_adapter_dtype: with a bf16 base the adapter lives and computes in fp32."""
  jx, pt = get_backend("jax"), get_backend("torch")
  for b in (jx, pt):
    b.load_base(base_folder, dtype="bfloat16")
  batch = _batch(pad="left")
  mask = batch["attention_mask"].astype(bool)
  base_diff = np.abs(
    pt.logits(batch["input_ids"], batch["attention_mask"]) - jx.logits(batch["input_ids"], batch["attention_mask"])
  )[mask].max()
  pt.attach_adapter(METHODS["lora"], seed=5)
  state = _perturbed(pt.adapter_state_dict(), 4)
  assert all(v.dtype == np.float32 for v in state.values())
  pt.set_adapter_state_dict(state)
  pt.save_adapter(str(tmp_path))
  jx.load_adapter(str(tmp_path))
  assert all(v.dtype == np.float32 for v in jx.adapter_state_dict().values())
  ref, out = (
    pt.logits(batch["input_ids"], batch["attention_mask"]),
    jx.logits(batch["input_ids"], batch["attention_mask"]),
  )
  # Both bases round to bf16 in different places (torch kernels vs XLA), so the adapted models can only agree
  # as well as the bare bf16 bases do (measured: 0.053 bare, 0.040 adapted). The fp32 dtype checks above
  # are what pin autocast_adapter_dtype; this bound checks the adapter adds no disagreement of its own.
  adapted_diff = np.abs(ref - out)[mask].max()
  print(f"bf16 base: bare-model max diff {base_diff:.3g}, adapted {adapted_diff:.3g}")
  assert adapted_diff <= 1.5 * base_diff + 1e-2, (base_diff, adapted_diff)
