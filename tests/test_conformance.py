"""Properties every method in the library must have, checked on jpeft alone over ``method_table.METHODS``.

Tolerances are relative to the largest entry of what is compared (``numerics.assert_close_to_scale``), because
XLA's kernels (and so the order of float32 sums) differ between CPUs. Two programs that compute the same
function in another order (merged vs factored weights, remat vs plain) differ by a few float32 epsilons
(1.2e-7) per reduction step. On the tiny two-layer model the worst measured ratio is 1.8e-6 (a remat gradient;
merged logits, unmerged weights and transformers on the merged folder stay near 1e-6), the same with XLA's default ISA, ``--xla_cpu_max_isa=AVX2``
and one thread (``JPEFT_PRINT_ERRORS=1 pytest -s`` prints them). The bound is 1e-5 for all of them: about five
times the worst measurement and still far below what a wrong formula produces (> 1e-3 here).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from backends.tiny import make_batch, make_tiny_llama, make_tiny_model
from jpeft import registry
from jpeft import checkpoint, core, optim, train
from jpeft.models import forward, load_model
from numerics import assert_close_to_scale, scaled_error
from method_table import METHODS, NO_MERGE, UNMERGEABLE, VOCAB, identity_at_init


@pytest.fixture(scope="module", params=["untied", "tied", "qwen3"])
def model(request, tmp_path_factory):
  """A tiny Llama with an untied and a tied head, and a tiny Qwen3 (q/k norms, tied head): every row of the table
  on a second family too."""
  where = str(tmp_path_factory.mktemp(request.param))
  if request.param == "qwen3":
    folder = make_tiny_model(where, "qwen3", initializer_range=0.1, tie_word_embeddings=True)
  else:
    folder = make_tiny_llama(where, initializer_range=0.1, tie_word_embeddings=request.param == "tied")
  config, params = load_model(folder)
  return config, params


def _init(model, method, seed=0):
  config, params = model
  peft_config = registry.config_from_dict(METHODS[method])
  adapter, adapted_base = core.init(jax.random.key(seed), params, peft_config, config)
  return peft_config, adapter, adapted_base


def _perturb(adapter, seed=0):
  leaves, treedef = jax.tree_util.tree_flatten(adapter)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree_util.tree_unflatten(
    treedef, [x + 0.05 * (jnp.abs(x).mean() + 0.1) * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  )


def _logits(config, params, batch):
  return np.asarray(forward(params, config, batch["input_ids"], batch["attention_mask"]))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_identity_at_init(model, method):
  config, params = model
  peft_config, adapter, base = _init(model, method)
  b = make_batch(0, 2, 12, VOCAB)
  diff = scaled_error(_logits(config, core.apply(base, adapter, peft_config), b), _logits(config, params, b))
  if identity_at_init(method):
    assert diff < 1e-5, diff  # PiSSA/OLoRA: W_res + s·B0·A0 reconstructs W to float32 rounding
  else:
    assert diff > 1e-3, diff


@pytest.mark.parametrize("method", sorted(METHODS))
def test_merge_equals_apply_and_base_is_kept(model, method):
  config, params = model
  peft_config, adapter, base = _init(model, method)
  adapter = _perturb(adapter)
  b = make_batch(1, 2, 12, VOCAB)
  applied = _logits(config, core.apply(base, adapter, peft_config), b)
  if method in NO_MERGE:  # the update depends on the input (Lily's router): there is no merged weight
    with pytest.raises(core.UnmergeableError, match=rf"{peft_config.peft_type} cannot be merged"):
      core.merge(base, adapter, peft_config)
    assert scaled_error(applied, _logits(config, base, b)) > 1e-3
    return
  merged_params = core.merge(base, adapter, peft_config)
  assert all(not hasattr(v, "matmul") for v in merged_params.values())
  assert (
    merged_params["model.layers.0.self_attn.q_proj.weight"].shape
    == params["model.layers.0.self_attn.q_proj.weight"].shape
  )
  assert_close_to_scale(_logits(config, merged_params, b), applied, 1e-5, what="merged vs applied logits")
  assert scaled_error(applied, _logits(config, base, b)) > 1e-3  # disabled = the base params, unchanged
  if method in UNMERGEABLE:
    restored = core.unmerge(merged_params, adapter, peft_config)
    for k in base:
      # (W + ΔW) − ΔW rounds once per op: a few epsilons of the merged weight's scale.
      assert_close_to_scale(restored[k], base[k], 1e-5, what=f"unmerged {k}")
  else:
    with pytest.raises(NotImplementedError):
      core.unmerge(merged_params, adapter, peft_config)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_train_step_changes_only_the_adapter_and_compiles_once(model, method):
  config, _ = model
  peft_config, adapter, base = _init(model, method)
  adapter = _perturb(adapter)
  before_base = {k: np.array(v) for k, v in base.items()}
  before_adapter = jax.tree_util.tree_map(np.array, adapter)
  optimizer = optim.make_optimizer(adapter, peft_config, lr=1e-2)
  step = train.make_train_step(config, peft_config, optimizer)
  state = optimizer.init(adapter)
  rng = jax.random.key(0)
  for i in range(2):
    b = {k: jnp.asarray(v) for k, v in make_batch(i, 2, 12, VOCAB).items()}
    adapter, state, metrics = step(adapter, state, base, b, rng)
  assert np.isfinite(float(metrics["loss"]))
  assert step._cache_size() == 1  # the second step reused the first compile
  for k, v in base.items():
    np.testing.assert_array_equal(np.asarray(v), before_base[k], err_msg=k)  # the base is bit-identical
  # every trained tensor moved; the method's frozen ones (VeRA's saved projections) are bit-identical
  trained = core.trainable_mask(adapter, peft_config)
  for m, tensors in adapter.items():
    for t, value in tensors.items():
      moved = bool(np.any(np.asarray(value) != before_adapter[m][t]))
      assert moved == trained[m][t], (m, t, "trained" if trained[m][t] else "frozen")


def test_lorafa_keeps_a(model):
  config, _ = model
  peft_config, adapter, base = _init(model, "lora")
  adapter = _perturb(adapter)
  optimizer = optim.make_optimizer(adapter, peft_config, lr=1e-2, optimizer_type="lora-fa")
  state = optimizer.init(adapter)
  step = train.make_train_step(config, peft_config, optimizer, donate=False)
  b = {k: jnp.asarray(v) for k, v in make_batch(0, 2, 12, VOCAB).items()}
  new, _, _ = step(adapter, state, base, b, jax.random.key(0))
  for m in adapter:
    np.testing.assert_array_equal(np.asarray(new[m]["lora_A.weight"]), np.asarray(adapter[m]["lora_A.weight"]))
    assert np.any(np.asarray(new[m]["lora_B.weight"]) != np.asarray(adapter[m]["lora_B.weight"]))


def test_dropout_only_in_training(model):
  config, _ = model
  peft_config = registry.config_from_dict(dict(METHODS["lora"], lora_dropout=0.5))
  adapter, base = core.init(jax.random.key(0), model[1], peft_config, config)
  adapter = _perturb(adapter)
  b = make_batch(0, 2, 12, VOCAB)
  eval_a = _logits(config, core.apply(base, adapter, peft_config), b)
  eval_b = _logits(config, core.apply(base, adapter, peft_config), b)
  np.testing.assert_array_equal(eval_a, eval_b)
  train_a = _logits(config, core.apply(base, adapter, peft_config, rng=jax.random.key(1)), b)
  assert np.abs(train_a - eval_a).max() > 1e-4
  # the same key drops the same units eagerly and under jit (jit reorders dict keys; the keys follow module names)
  loss_fn = train.make_loss_fn(config, peft_config)
  batch = {k: jnp.asarray(v) for k, v in b.items()}
  adapter = {name: adapter[name] for name in sorted(adapter, reverse=True)}  # a dict order that is not sorted
  eager = float(loss_fn(adapter, base, batch, jax.random.key(2))[0])
  jitted = float(jax.jit(loss_fn)(adapter, base, batch, jax.random.key(2))[0])
  assert abs(eager - jitted) <= 1e-6 * abs(eager), (eager, jitted)


@pytest.mark.parametrize(
  "method",
  [
    "lora",
    "dora",
    "lora-embedding",
    "lora-modules-to-save",
    "ia3",
    "oft",
    "vera",
    "fourierft",
    "boft",
    "hra-gs",
    "loha",
    "lokr-decompose-both",
    "miss-bat",
  ],
)
def test_merged_folder_loads_in_transformers(model, method, tmp_path):
  config, _ = model
  peft_config, adapter, base = _init(model, method)
  adapter = _perturb(adapter)
  merged = core.merge(base, adapter, peft_config)
  checkpoint.save_merged_model(str(tmp_path), merged, config)
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
  b = make_batch(2, 2, 12, VOCAB)
  pos = np.maximum(b["attention_mask"].cumsum(-1) - 1, 0)
  with torch.no_grad():
    ref = hf(
      input_ids=torch.tensor(b["input_ids"]).long(),
      attention_mask=torch.tensor(b["attention_mask"]),
      position_ids=torch.tensor(pos).long(),
    ).logits.numpy()
  mask = b["attention_mask"].astype(bool)
  assert_close_to_scale(
    _logits(config, core.apply(base, adapter, peft_config), b),
    ref,
    1e-5,
    mask=mask,
    what="transformers on the merged folder vs jpeft unmerged",
  )


def test_remat_gives_the_same_loss_and_gradients(model):
  config, _ = model
  peft_config, adapter, base = _init(model, "dora")
  adapter = _perturb(adapter)
  b = {k: jnp.asarray(v) for k, v in make_batch(3, 2, 12, VOCAB).items()}
  plain = train.make_grad_fn(config, peft_config)(adapter, base, b)
  loss_fn = train.make_loss_fn(config, peft_config, remat=True)
  remat = jax.jit(jax.value_and_grad(lambda a: loss_fn(a, base, b)[0]))(adapter)
  assert abs(float(plain[0]) - float(remat[0])) <= 1e-6 * abs(float(plain[0]))
  # Remat recomputes each layer inside the backward, so XLA fuses (and orders sums) differently: compare each
  # gradient tensor to the scale of its largest entry, not element by element (entries through zero have no
  # meaningful relative error; one such entry, 1.6e-7 apart, failed an element-wise bound on another CPU).
  flat_plain = jax.tree_util.tree_leaves_with_path(plain[1])
  flat_remat = jax.tree_util.tree_leaves(remat[1])
  for (path, x), y in zip(flat_plain, flat_remat, strict=True):
    assert_close_to_scale(y, x, 1e-5, what=f"remat gradient {jax.tree_util.keystr(path)}")


def test_merge_refuses_a_method_without_merged_weights(model):
  """A method whose adapted module has no ``materialize`` (its output depends on the input, as Lily's router) must
  not leave an adapted object inside "merged" params: ``merge`` raises, naming the module."""
  import dataclasses

  from flax import struct

  from jpeft.config import PeftConfig
  from jpeft.methods import base

  @struct.dataclass
  class InputDependent:
    base: jax.Array
    gain: jax.Array

    def matmul(self, x, dtype=None):
      y = jnp.einsum("...i,oi->...o", x, self.base)
      return y * (1 + self.gain * jnp.tanh(x.mean()))

  @dataclasses.dataclass(frozen=True, kw_only=True)
  class _Config(PeftConfig):
    peft_type: str = "JPEFT_TEST_UNMERGEABLE"

  method = base.Method(
    config_class=_Config,
    init_module=lambda key, spec, config: {"gain": jnp.ones(())},
    adapt_module=lambda spec, t, config, shared, rng: {"weight": InputDependent(spec.weight, t["gain"])},
  )
  config, params = model
  base.register(method)
  try:
    peft_config = _Config(target_modules=["q_proj"])
    adapter, _ = core.init(jax.random.key(0), params, peft_config, config)
    b = make_batch(0, 2, 12, VOCAB)
    assert scaled_error(_logits(config, core.apply(params, adapter, peft_config), b), _logits(config, params, b)) > 0
    with pytest.raises(core.UnmergeableError, match=r"JPEFT_TEST_UNMERGEABLE.*q_proj"):
      core.merge(params, adapter, peft_config)
  finally:
    base._TABLE.pop("JPEFT_TEST_UNMERGEABLE", None)
