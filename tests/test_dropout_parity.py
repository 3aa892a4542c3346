"""``lora_dropout > 0`` in train mode, LoRA and DoRA, against PEFT and a NumPy reference with the mask made explicit.

The two libraries draw dropout masks from different generators, so the same mask is injected on both sides: jpeft
draws ``keep = jax.random.bernoulli(rng, 1 - p, x.shape)`` in ``jpeft.methods.lora._dropout``; the tests draw
that very mask from the same key and give it to PEFT by replacing ``lora_dropout["default"]`` (an
``nn.Dropout``) with a module that applies it, and to a float64 NumPy formula.

The formulas (s the scaling, x_d = x ⊙ keep / (1 - p), n = ‖W + sBA‖ per output row, detached):
  LoRA: ``y = x Wᵀ + s · x_d Aᵀ Bᵀ``
  DoRA: ``y = x Wᵀ + (m/n − 1) ⊙ (x_d Wᵀ) + (m/n) ⊙ s · x_d Aᵀ Bᵀ`` -- PEFT's train-mode formula with dropout
        (``DoraLinearVariant.forward`` recomputes the base product on x_d), which is neither DoRA on x_d nor on x.

Layer level (a jpeft ``LoraWeight``/``DoraWeight`` vs PEFT's ``lora.Linear`` vs NumPy): outputs, and gradients
w.r.t. A, B and the magnitude. Model level (the tiny Llama through the backends): PEFT gets the masks jpeft draws
for each module from its train-step key; the loss and every gradient must match.

Tolerances are relative to the scale of what is compared (``numerics``), measured with XLA's default CPU kernels,
``--xla_cpu_max_isa=AVX2`` and one thread (the same to 2 digits). Layer outputs and gradients are sums of ~30 float32
products: measured worst 1.6e-7 = 1.3 eps, jpeft against float64 NumPy and against PEFT (bound ``LAYER_REL``, 8 eps).
The model-level loss and gradients are held to ``test_parity``'s bounds: measured 8.2e-8 (loss) and 1.38e-6
(gradients, DoRA), eval logits 7.5e-7. Dropout itself moves the layer outputs by 0.38 (LoRA) / 0.43 (DoRA) of their
scale, PEFT's DoRA formula is 0.40 away from DoRA of x_d, and at the model level dropout moves the loss by 7.1e-4
relative and every gradient by more than 0.27: all far outside the bounds.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

from backends import get_backend
from backends.tiny import make_batch, make_tiny_llama
from jpeft import core, train
from jpeft.methods.lora import DoraWeight, LoraWeight
from numerics import EPS32, assert_close_to_scale, scaled_error

from method_table import DROPOUT_METHODS, VOCAB

RATE = 0.3
IN, OUT, R, ALPHA = 24, 16, 4, 8
SCALING = ALPHA / R
# Layer level: an output entry is a sum of IN + R float32 products (two chained matmuls for the LoRA branch); the
# float64 reference and PEFT's float32 sums differ from jpeft's by a few epsilons of the largest entry.
LAYER_REL = 8 * EPS32
# Model level: the bounds of test_parity (same model, same batch size).
LOGIT_REL = 32 * EPS32
LOSS_REL = 16 * EPS32
GRAD_REL = 1e-5
# Dropout must move what is compared by far more than the bound, or the test could not tell it was applied.
MIN_DROPOUT_EFFECT = 1e-2


class FixedMaskDropout(nn.Module):
  """Stands in for ``nn.Dropout(p)`` with a given keep-mask: ``where(keep, x / (1 - p), 0)``, as jpeft computes it."""

  def __init__(self, keep: np.ndarray, rate: float):
    super().__init__()
    self.keep = torch.as_tensor(np.asarray(keep, dtype=bool))
    self.rate = rate
    self.calls = 0

  def forward(self, x):
    assert tuple(x.shape) == tuple(self.keep.shape), (tuple(x.shape), tuple(self.keep.shape))
    self.calls += 1
    return torch.where(self.keep, x / (1.0 - self.rate), torch.zeros((), dtype=x.dtype))


def _report(what, value, bound):
  if os.environ.get("JPEFT_PRINT_ERRORS"):  # `JPEFT_PRINT_ERRORS=1 pytest -s` prints every measured number
    print(f"[measured] {what}: {value:.3g} (bound {bound:.3g})")


def _jax_keep(rng, shape):
  """The mask ``jpeft.methods.lora._dropout`` draws: the same call on the same key."""
  return np.asarray(jax.random.bernoulli(rng, 1.0 - RATE, shape))


# ------------------------------------------------------------------------------------------------------------
# Layer level


@pytest.fixture(scope="module")
def layer():
  rng = np.random.default_rng(0)
  w = (rng.standard_normal((OUT, IN)) / np.sqrt(IN)).astype(np.float32)
  a = (rng.uniform(-1, 1, (R, IN)) / np.sqrt(IN)).astype(np.float32)
  b = (0.3 * rng.standard_normal((OUT, R))).astype(np.float32)  # B ≠ 0
  n = np.linalg.norm(w.astype(np.float64) + SCALING * (b.astype(np.float64) @ a), axis=1)
  m = (n * (1 + 0.3 * rng.standard_normal(OUT))).astype(np.float32)  # magnitude ≠ ‖W + sBA‖
  x = rng.standard_normal((3, 5, IN)).astype(np.float32)
  g = rng.standard_normal((3, 5, OUT)).astype(np.float32)  # the cotangent: loss = Σ y ⊙ g
  key = jax.random.key(42)
  keep = _jax_keep(key, x.shape)
  assert 0.5 < keep.mean() < 0.9  # x_d differs from x (and from 0)
  return dict(w=w, a=a, b=b, m=m, x=x, g=g, key=key, keep=keep)


def _numpy_forward(p, dora):
  """float64 output and gradients (A, B, magnitude) of ``Σ y ⊙ g`` with the mask made explicit."""
  w, a, b, m = (p[k].astype(np.float64) for k in ("w", "a", "b", "m"))
  x, g, keep = p["x"].reshape(-1, IN).astype(np.float64), p["g"].reshape(-1, OUT), p["keep"].reshape(-1, IN)
  xd = np.where(keep, x / (1 - RATE), 0.0)
  xa = xd @ a.T  # (..., r)
  lora = SCALING * xa @ b.T
  base = x @ w.T
  if not dora:
    y = base + lora
    return y.reshape(p["g"].shape), {"a": SCALING * (g @ b).T @ xd, "b": SCALING * g.T @ xa}
  n = np.linalg.norm(w + SCALING * b @ a, axis=1)  # detached
  f = m / n
  y = base + (f - 1) * (xd @ w.T) + f * lora
  gf = g * f
  grads = {"a": SCALING * (gf @ b).T @ xd, "b": SCALING * gf.T @ xa, "m": (g * (xd @ w.T + lora)).sum(0) / n}
  return y.reshape(p["g"].shape), grads


def _jpeft_forward(p, dora, rng):
  def out(a, b, m):
    if dora:
      weight = DoraWeight(jnp.asarray(p["w"]), a, b, m, scaling=SCALING, dropout=RATE, rng=rng)
    else:
      weight = LoraWeight(jnp.asarray(p["w"]), a, b, scaling=SCALING, dropout=RATE, rng=rng)
    return weight.matmul(jnp.asarray(p["x"]))

  args = (jnp.asarray(p["a"]), jnp.asarray(p["b"]), jnp.asarray(p["m"]))
  y = out(*args)
  grads = jax.grad(lambda *t: jnp.sum(out(*t) * p["g"]), argnums=(0, 1, 2))(*args)
  names = ("a", "b", "m") if dora else ("a", "b")
  return np.asarray(y), {k: np.asarray(v) for k, v in zip(names, grads, strict=False)}


def _peft_forward(p, dora):
  from peft import LoraConfig
  from peft.tuners.lora.layer import Linear

  base = nn.Linear(IN, OUT, bias=False)
  with torch.no_grad():
    base.weight.copy_(torch.as_tensor(p["w"]))
  config = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=RATE, use_dora=dora)
  module = Linear(base, "default", config=config, r=R, lora_alpha=ALPHA)
  assert isinstance(module.lora_dropout["default"], nn.Dropout)  # what the mask replaces
  mask = FixedMaskDropout(p["keep"], RATE)
  module.lora_dropout["default"] = mask
  params = {"a": module.lora_A["default"].weight, "b": module.lora_B["default"].weight}
  if dora:
    params["m"] = module.lora_magnitude_vector["default"].weight
  with torch.no_grad():
    for k, t in params.items():
      t.copy_(torch.as_tensor(p[k]))
  module.train()
  y = module(torch.as_tensor(p["x"]))
  (y * torch.as_tensor(p["g"])).sum().backward()
  assert mask.calls == 1
  return y.detach().numpy(), {k: t.grad.numpy() for k, t in params.items()}


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_layer_dropout_matches_numpy_and_peft(layer, dora):
  name = "dora" if dora else "lora"
  y_np, g_np = _numpy_forward(layer, dora)
  y_jx, g_jx = _jpeft_forward(layer, dora, layer["key"])
  y_pt, g_pt = _peft_forward(layer, dora)
  assert_close_to_scale(y_jx, y_np, LAYER_REL, what=f"{name} layer output: jpeft vs numpy")
  assert_close_to_scale(y_pt, y_np, LAYER_REL, what=f"{name} layer output: PEFT vs numpy")
  assert_close_to_scale(y_jx, y_pt, LAYER_REL, what=f"{name} layer output: jpeft vs PEFT")
  for k in g_np:
    assert_close_to_scale(g_jx[k], g_np[k], LAYER_REL, what=f"{name} layer gradient {k}: jpeft vs numpy")
    assert_close_to_scale(g_jx[k], g_pt[k], LAYER_REL, what=f"{name} layer gradient {k}: jpeft vs PEFT")

  # The comparison resolves the dropout: without it (eval), or (DoRA) with the dropped input in the base product
  # as well, the output is far outside the bound.
  eval_y = np.asarray(_jpeft_forward(layer, dora, None)[0])
  _report(f"{name} layer: dropout effect", scaled_error(eval_y, y_np), MIN_DROPOUT_EFFECT)
  assert scaled_error(eval_y, y_np) >= MIN_DROPOUT_EFFECT
  if dora:
    w, a, b, m = (layer[k].astype(np.float64) for k in ("w", "a", "b", "m"))
    xd = np.where(layer["keep"], layer["x"] / (1 - RATE), 0.0)
    combined = w + SCALING * b @ a
    naive = (m / np.linalg.norm(combined, axis=1)) * (xd @ combined.T)  # DoRA of x_d, the paper's formula
    _report(
      "dora layer: PEFT's formula vs DoRA of x_d", scaled_error(naive.reshape(y_np.shape), y_np), MIN_DROPOUT_EFFECT
    )
    assert scaled_error(naive.reshape(y_np.shape), y_np) >= MIN_DROPOUT_EFFECT


# ------------------------------------------------------------------------------------------------------------
# Model level


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
  folder = make_tiny_llama(str(tmp_path_factory.mktemp("base")), initializer_range=0.1)
  out = {}
  for name in ("jax", "torch"):
    b = get_backend(name)
    b.load_base(folder)
    out[name] = b
  return out


def _perturbed(state, seed):
  """Every adapter tensor moved away from its init (B ≠ 0, magnitudes ≠ ‖W‖)."""
  rng = np.random.default_rng(seed)
  return {
    k: (v + 0.1 * rng.standard_normal(v.shape) * (np.abs(v).mean() + 0.1)).astype(v.dtype) for k, v in state.items()
  }


@pytest.mark.parametrize("method", sorted(DROPOUT_METHODS))
def test_model_dropout_matches_peft_with_jpeft_masks(method, backends):
  jx, pt = backends["jax"], backends["torch"]
  pt.attach_adapter(DROPOUT_METHODS[method], seed=0)
  state = _perturbed(pt.adapter_state_dict(), 1)
  pt.set_adapter_state_dict(state)
  jx.attach_adapter(DROPOUT_METHODS[method], seed=0)
  jx.set_adapter_state_dict(state)
  b = make_batch(7, 3, 16, VOCAB)
  mask = b["attention_mask"].astype(bool)

  # Eval mode: no dropout on either side.
  assert_close_to_scale(
    jx.logits(b["input_ids"], b["attention_mask"]),
    pt.logits(b["input_ids"], b["attention_mask"]),
    LOGIT_REL,
    mask=mask,
    what=f"{method}: eval logits",
  )

  # Train mode: the masks jpeft draws for each module from the step's key, handed to PEFT. The keys are read from
  # core.apply traced under jit, as in the (jitted) train step: core.apply hands out per-module keys in the adapter
  # dict's order, which jit's pytree flattening sorts, so an eager core.apply gives the modules other keys.
  rng = jax.random.key(11)

  @jax.jit
  def module_dropout(adapter, params, key):
    adapted = core.apply(params, adapter, jx.peft_config, rng=key)
    assert all(adapted[n + ".weight"].dropout == RATE for n in adapter)  # static: checked at trace time
    return {n: adapted[n + ".weight"].rng for n in adapter}

  masks = {}
  for name, key in module_dropout(jx.trainable, jx.params, rng).items():
    keep = _jax_keep(key, b["input_ids"].shape + (jx.trainable[name]["lora_A.weight"].shape[1],))
    assert 0.5 < keep.mean() < 0.9, name
    masks[name] = FixedMaskDropout(keep, RATE)
    module = pt.model.get_submodule("base_model.model." + name)
    assert isinstance(module.lora_dropout["default"], nn.Dropout), name
    module.lora_dropout["default"] = masks[name]

  batch = {k: jnp.asarray(v, jnp.int32) for k, v in b.items()}
  grad_fn = train.make_grad_fn(jx.model_config, jx.peft_config)
  loss_jx, grads = grad_fn(jx.trainable, jx.params, batch, rng)
  g_jx = {k: np.asarray(v) for k, v in core.to_state_dict(grads).items()}
  loss_pt, g_pt = pt.loss_and_grads(b["input_ids"], b["attention_mask"], b["labels"])
  assert all(m.calls == 1 for m in masks.values()), {k: m.calls for k, m in masks.items()}

  assert_close_to_scale(np.float64(loss_jx), np.float64(loss_pt), LOSS_REL, what=f"{method}: train loss")
  assert set(g_pt) == set(g_jx)
  for k in g_pt:
    assert_close_to_scale(g_jx[k], g_pt[k], GRAD_REL, what=f"{method}: gradient {k}")

  # Dropout is on: the loss and gradients without it are far outside the bounds.
  loss_eval, grads_eval = grad_fn(jx.trainable, jx.params, batch, None)
  loss_effect = abs(float(loss_eval) - float(loss_jx)) / abs(float(loss_pt))
  _report(f"{method}: dropout effect on the loss", loss_effect, 100 * LOSS_REL)
  assert loss_effect >= 100 * LOSS_REL
  grad_effect = min(scaled_error(np.asarray(v), g_pt[k]) for k, v in core.to_state_dict(grads_eval).items())
  _report(f"{method}: smallest dropout effect on a gradient", grad_effect, 100 * GRAD_REL)
  assert grad_effect >= 100 * GRAD_REL
