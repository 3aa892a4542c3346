"""jpeft on foreign Flax trees (:mod:`jpeft.tree`): nnx and linen models trained through ``apply(...,
materialize=True)``, every materialisable method row against the factored forward, a Llama written with nnx exported
to PEFT under the Hugging Face names, and the errors.

Float bounds are relative to the scale of what is compared (``numerics.assert_close_to_scale``;
``JPEFT_PRINT_ERRORS=1 pytest -s tests/test_tree.py`` prints each measured ratio). A merged weight and the factored
form compute the same function in another order: a few float32 epsilons per reduction step.
"""

import json
import os

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jpeft
from jpeft import core, registry, targets
from jpeft import tree as tree_lib
from method_table import METHODS, NO_MERGE
from numerics import EPS32, assert_close_to_scale, scaled_error

V, D, F = 32, 16, 32  # vocab, width, feed-forward width of the small training models


# ----------------------------------------------------------------------------------------------------------
# Small models: the same network in nnx and linen


class NnxBlock(nnx.Module):
  def __init__(self, rngs):
    self.norm = nnx.RMSNorm(D, rngs=rngs)
    self.q_proj = nnx.Linear(D, D, rngs=rngs)
    self.v_proj = nnx.Linear(D, D, rngs=rngs)
    self.up_proj = nnx.Linear(D, F, rngs=rngs)
    self.down_proj = nnx.Linear(F, D, rngs=rngs)

  def __call__(self, h):
    x = self.norm(h)
    h = h + self.v_proj(jnp.tanh(self.q_proj(x)))
    return h + self.down_proj(jax.nn.gelu(self.up_proj(x)))


class NnxModel(nnx.Module):
  def __init__(self, rngs):
    self.emb = nnx.Embed(V, D, rngs=rngs)
    self.layers = nnx.List([NnxBlock(rngs), NnxBlock(rngs)])
    self.head = nnx.Linear(D, V, rngs=rngs)

  def __call__(self, ids):
    h = self.emb(ids)
    for layer in self.layers:
      h = layer(h)
    return self.head(h)


class LinenBlock(nn.Module):
  @nn.compact
  def __call__(self, h):
    x = nn.RMSNorm(name="norm")(h)
    h = h + nn.Dense(D, name="v_proj")(jnp.tanh(nn.Dense(D, name="q_proj")(x)))
    return h + nn.Dense(D, name="down_proj")(jax.nn.gelu(nn.Dense(F, name="up_proj")(x)))


class LinenModel(nn.Module):
  @nn.compact
  def __call__(self, ids):
    h = nn.Embed(V, D, name="emb")(ids)
    for i in range(2):
      h = LinenBlock(name=f"layers_{i}")(h)
    return nn.Dense(V, name="head")(h)


# LoRA (B = 0 at init: the gradient must reach B through the merged kernel) and two non-LoRA methods
TRAIN_CONFIGS = {
  "lora": jpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
  "oft": jpeft.OFTConfig(r=0, oft_block_size=4, target_modules=["q_proj", "v_proj", "down_proj"]),
  "ia3": jpeft.IA3Config(target_modules=["v_proj", "up_proj", "down_proj"], feedforward_modules=["down_proj"]),
}


def _batch():
  return jax.random.randint(jax.random.key(7), (4, 12), 0, V)


def _cross_entropy(logits, ids):
  logp = jax.nn.log_softmax(logits[:, :-1])
  return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean()


def _train(tree, config, run, steps=25, lr=3e-2):
  """``steps`` jitted Adam steps on the adapter only; returns (initial adapter, trained adapter, losses)."""
  adapter, base = jpeft.init(jax.random.key(0), tree, config)
  ids = _batch()
  opt = optax.adam(lr)

  def loss_fn(adapter, base):
    return _cross_entropy(run(jpeft.apply(base, adapter, config, materialize=True), ids), ids)

  @jax.jit
  def step(adapter, opt_state, base):
    loss, grads = jax.value_and_grad(loss_fn)(adapter, base)
    updates, opt_state = opt.update(grads, opt_state, adapter)
    return optax.apply_updates(adapter, updates), opt_state, loss

  trained, opt_state, losses = adapter, opt.init(adapter), []
  for _ in range(steps):
    trained, opt_state, loss = step(trained, opt_state, base)
    losses.append(float(loss))
  return base, adapter, trained, losses


def _snapshot(tree):
  return [np.array(x) for x in jax.tree_util.tree_leaves(tree)]


def _check_training(tree, base, adapter, trained, losses, before):
  # init leaves the base as it is (no PiSSA here), training never touches it: bit for bit
  assert jax.tree_util.tree_structure(base) == jax.tree_util.tree_structure(tree)
  for a, b in zip(_snapshot(tree), before, strict=True):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(_snapshot(base), before, strict=True):
    np.testing.assert_array_equal(a, b)
  # every adapter tensor moved (LoRA's B from zero: the gradient flows through the merged kernel)
  assert jax.tree_util.tree_structure(trained) == jax.tree_util.tree_structure(adapter)
  for path, a, b in zip(
    [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(adapter)[0]],
    jax.tree_util.tree_leaves(adapter),
    jax.tree_util.tree_leaves(trained),
  ):
    assert float(jnp.abs(a - b).max()) > 0, path
  assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.parametrize("method", sorted(TRAIN_CONFIGS))
def test_nnx_model_trains_through_the_adapter_only(method):
  model = NnxModel(nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  before = _snapshot(state)
  config = TRAIN_CONFIGS[method]
  base, adapter, trained, losses = _train(state, config, lambda s, ids: nnx.merge(graphdef, s)(ids))
  assert type(base) is type(state)
  assert sorted(adapter) == sorted(
    f"layers.{i}.{m}" for i in range(2) for m in (config.target_modules if method != "ia3" else config.target_modules)
  )
  _check_training(state, base, adapter, trained, losses, before)
  # the adapted state is an nnx.State of the same structure; merged back, the model runs adapted
  adapted = jpeft.apply(state, trained, config, materialize=True)
  assert type(adapted) is type(state)
  assert jax.tree_util.tree_structure(adapted) == jax.tree_util.tree_structure(state)
  assert float(_cross_entropy(nnx.merge(graphdef, adapted)(_batch()), _batch())) < losses[0] - 0.1


@pytest.mark.parametrize("method", sorted(TRAIN_CONFIGS))
def test_linen_model_trains_through_the_adapter_only(method):
  model = LinenModel()
  variables = model.init(jax.random.key(0), _batch())
  before = _snapshot(variables)
  config = TRAIN_CONFIGS[method]
  base, adapter, trained, losses = _train(variables, config, lambda v, ids: model.apply(v, ids))
  # module names are the paths inside the "params" collection
  assert sorted(adapter) == sorted(f"layers_{i}.{m}" for i in range(2) for m in config.target_modules)
  _check_training(variables, base, adapter, trained, losses, before)
  # a FrozenDict tree comes back a FrozenDict
  frozen = flax.core.freeze(variables)
  adapted = jpeft.apply(frozen, trained, config, materialize=True)
  assert isinstance(adapted, flax.core.FrozenDict)
  assert float(_cross_entropy(model.apply(adapted, _batch()), _batch())) < losses[0] - 0.1


def test_adapter_tensors_are_in_peft_shapes_on_in_out_kernels():
  """A Dense kernel is (in, out); the adapter is built on the (out, in) view, so its tensors have PEFT's shapes and
  the merged kernel is W + ΔWᵀ in the tree's own layout."""
  variables = LinenModel().init(jax.random.key(0), _batch())
  config = jpeft.LoraConfig(r=3, lora_alpha=6, init_lora_weights=False, target_modules=["up_proj"])
  adapter, _ = jpeft.init(jax.random.key(1), variables, config)
  a, b = adapter["layers_0.up_proj"]["lora_A.weight"], adapter["layers_0.up_proj"]["lora_B.weight"]
  assert a.shape == (3, D) and b.shape == (F, 3)  # (r, in), (out, r)
  adapted = jpeft.apply(variables, adapter, config, materialize=True)
  kernel = variables["params"]["layers_0"]["up_proj"]["kernel"]
  expected = kernel + 2.0 * (b @ a).T
  # fp32 rounding of one sum of 3 products, on entries of scale ~1
  assert_close_to_scale(adapted["params"]["layers_0"]["up_proj"]["kernel"], expected, 4 * EPS32, what="merged kernel")
  np.testing.assert_array_equal(
    adapted["params"]["layers_0"]["q_proj"]["kernel"], variables["params"]["layers_0"]["q_proj"]["kernel"]
  )


# ----------------------------------------------------------------------------------------------------------
# Every method row: apply(materialize=True) on a foreign tree == the factored forward


TINY = dict(vocab=256, hidden=64, inter=128, kv=32, layers=2)


def _llama_shaped_tree():
  """A nested dict with the tiny Llama's module names and Flax (in, out) kernels."""
  rng = np.random.default_rng(0)

  def kernel(i, o):
    return {"kernel": jnp.asarray(rng.normal(0, 0.1, (i, o)), jnp.float32)}

  h, f, kv = TINY["hidden"], TINY["inter"], TINY["kv"]
  layers = {}
  for i in range(TINY["layers"]):
    layers[str(i)] = {
      "self_attn": {"q_proj": kernel(h, h), "k_proj": kernel(h, kv), "v_proj": kernel(h, kv), "o_proj": kernel(h, h)},
      "mlp": {"gate_proj": kernel(h, f), "up_proj": kernel(h, f), "down_proj": kernel(f, h)},
      "input_layernorm": {"scale": jnp.ones((h,))},
    }
  embed = {"embedding": jnp.asarray(rng.normal(0, 0.1, (TINY["vocab"], h)), jnp.float32)}
  return {"model": {"embed_tokens": embed, "layers": layers}, "lm_head": kernel(h, TINY["vocab"])}


def _perturb(adapter, seed=0):
  leaves, treedef = jax.tree_util.tree_flatten(adapter)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree_util.tree_unflatten(
    treedef, [x + 0.05 * (jnp.abs(x).mean() + 0.1) * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  )


def _leaf(tree, name, leaf):
  node = tree
  for part in name.split("."):
    node = node[part]
  return node[leaf]


@pytest.mark.parametrize("row", sorted(METHODS))
def test_every_method_row_materialises_to_the_factored_forward(row):
  tree = _llama_shaped_tree()
  layout = jpeft.describe(tree, model_type="llama")
  config = registry.config_from_dict(METHODS[row])
  adapter, base = jpeft.init(jax.random.key(1), tree, config, layout)
  adapter = _perturb(adapter)
  if row in NO_MERGE:
    reason = "router mixes" if config.peft_type == "LILY" else "no bias"
    with pytest.raises(jpeft.UnmergeableError, match=rf"{config.peft_type} cannot be merged.*{reason}"):
      jpeft.apply(base, adapter, config, model_config=layout, materialize=True)
    return
  adapted = jpeft.apply(base, adapter, config, model_config=layout, materialize=True)
  assert jax.tree_util.tree_structure(adapted) == jax.tree_util.tree_structure(tree)
  # the factored forward: jpeft's own Llama path on the same weights in (out, in) layout
  flat = tree_lib.view(base, layout)
  factored = core.apply(flat, adapter, config)
  ids = jnp.arange(0, TINY["vocab"], 7)
  saved = set(core._modules_to_save(adapter, config))
  worst = 0.0
  for name in (n for n in adapter if n != core.SHARED):
    module = layout.by_name[name]
    stored = _leaf(adapted, name, module.weight.rpartition(".")[2])
    entry = factored[name + ".weight"]
    if name in saved:  # a full copy, stored back in the tree's layout
      np.testing.assert_array_equal(
        stored, adapter[name]["weight"].T if module.layout == "in_out" else adapter[name]["weight"]
      )
      continue
    if module.kind == "norm":  # LN tuning: the trained copy is the norm's vector itself, stored as it is
      np.testing.assert_array_equal(stored, entry)
      assert not np.array_equal(stored, _leaf(base, name, module.weight.rpartition(".")[2])), f"{row} {name}"
      continue
    if module.kind == "embedding":
      got, want = jnp.take(stored, ids, axis=0), entry.embed(ids)
    else:
      xin = jax.random.normal(jax.random.key(3), (5, stored.shape[0]))
      got, want = xin @ stored, entry.matmul(xin)
    # merged vs factored: the same function summed in another order (fp32, ≤ 128-long sums); measured ≤ 7.2e-7
    worst = max(worst, assert_close_to_scale(got, want, 32 * EPS32, what=f"{row} {name} materialised"))
    # and the adapter changes the output by far more than the bound (else the comparison proves nothing; the
    # smallest measured effect is 9.5e-4, LoHa's o_proj with alpha 3 at r=4)
    base_w = _leaf(base, name, module.weight.rpartition(".")[2])
    plain = jnp.take(base_w, ids, axis=0) if module.kind == "embedding" else xin @ base_w
    effect = scaled_error(plain, want)
    if os.environ.get("JPEFT_PRINT_ERRORS"):
      print(f"[adapter effect] {row} {name}: {effect:.3g}")
    assert effect > 10 * 32 * EPS32, f"{row} {name}: the perturbed adapter changes the output by {effect:.3g} only"
  assert worst <= 32 * EPS32


# ----------------------------------------------------------------------------------------------------------
# A Llama written with nnx, exported to PEFT under the Hugging Face names


class Attention(nnx.Module):
  def __init__(self, c, rngs):
    h, self.nh, self.nkv, self.hd = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    self.wq = nnx.Linear(h, self.nh * self.hd, use_bias=False, rngs=rngs)
    self.wk = nnx.Linear(h, self.nkv * self.hd, use_bias=False, rngs=rngs)
    self.wv = nnx.Linear(h, self.nkv * self.hd, use_bias=False, rngs=rngs)
    self.wo = nnx.Linear(self.nh * self.hd, h, use_bias=False, rngs=rngs)

  def __call__(self, x, cos, sin):
    b, t, _ = x.shape
    q = self.wq(x).reshape(b, t, self.nh, self.hd)
    k = self.wk(x).reshape(b, t, self.nkv, self.hd)
    v = self.wv(x).reshape(b, t, self.nkv, self.hd)

    def rope(y):
      y1, y2 = jnp.split(y, 2, axis=-1)
      return y * cos[None, :, None] + jnp.concatenate([-y2, y1], axis=-1) * sin[None, :, None]

    q, k = rope(q), rope(k)
    k, v = jnp.repeat(k, self.nh // self.nkv, axis=2), jnp.repeat(v, self.nh // self.nkv, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(self.hd)
    scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -jnp.inf)
    out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
    return self.wo(out.reshape(b, t, self.nh * self.hd))


class Mlp(nnx.Module):
  def __init__(self, c, rngs):
    self.w1 = nnx.Linear(c.hidden_size, c.intermediate_size, use_bias=False, rngs=rngs)
    self.w3 = nnx.Linear(c.hidden_size, c.intermediate_size, use_bias=False, rngs=rngs)
    self.w2 = nnx.Linear(c.intermediate_size, c.hidden_size, use_bias=False, rngs=rngs)

  def __call__(self, x):
    return self.w2(jax.nn.silu(self.w1(x)) * self.w3(x))


class Block(nnx.Module):
  def __init__(self, c, rngs):
    self.attention_norm = nnx.RMSNorm(c.hidden_size, epsilon=c.rms_norm_eps, rngs=rngs)
    self.attn = Attention(c, rngs)
    self.ffn_norm = nnx.RMSNorm(c.hidden_size, epsilon=c.rms_norm_eps, rngs=rngs)
    self.mlp = Mlp(c, rngs)

  def __call__(self, x, cos, sin):
    x = x + self.attn(self.attention_norm(x), cos, sin)
    return x + self.mlp(self.ffn_norm(x))


class NnxLlama(nnx.Module):
  def __init__(self, c, rngs):
    self.theta = float(c.rope_parameters["rope_theta"])
    self.hd = c.head_dim
    self.tok_emb = nnx.Embed(c.vocab_size, c.hidden_size, rngs=rngs)
    self.layers = nnx.List([Block(c, rngs) for _ in range(c.num_hidden_layers)])
    self.norm = nnx.RMSNorm(c.hidden_size, epsilon=c.rms_norm_eps, rngs=rngs)
    self.head = nnx.Linear(c.hidden_size, c.vocab_size, use_bias=False, rngs=rngs)

  def __call__(self, ids):
    t = ids.shape[1]
    inv_freq = 1.0 / (self.theta ** (np.arange(0, self.hd, 2, dtype=np.float32) / self.hd))
    freqs = np.arange(t, dtype=np.float32)[:, None] * inv_freq[None]
    angles = np.concatenate([freqs, freqs], axis=-1)
    cos, sin = jnp.asarray(np.cos(angles)), jnp.asarray(np.sin(angles))
    x = self.tok_emb(ids)
    for layer in self.layers:
      x = layer(x, cos, sin)
    return self.head(self.norm(x))


# the nnx Llama's module names -> transformers' (an ordered list of (regex, replacement), applied in turn)
HF_NAMES = [
  (r"^tok_emb$", "model.embed_tokens"),
  (r"^head$", "lm_head"),
  (r"^norm$", "model.norm"),
  (r"^layers\.(\d+)\.attn\.w([qkvo])$", r"model.layers.\1.self_attn.\2_proj"),
  (r"^layers\.(\d+)\.mlp\.w1$", r"model.layers.\1.mlp.gate_proj"),
  (r"^layers\.(\d+)\.mlp\.w3$", r"model.layers.\1.mlp.up_proj"),
  (r"^layers\.(\d+)\.mlp\.w2$", r"model.layers.\1.mlp.down_proj"),
  (r"^layers\.(\d+)\.attention_norm$", r"model.layers.\1.input_layernorm"),
  (r"^layers\.(\d+)\.ffn_norm$", r"model.layers.\1.post_attention_layernorm"),
]


def _nnx_llama_from(hf):
  c = hf.config
  model = NnxLlama(c, nnx.Rngs(0))
  sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}

  def param(key, transpose=False):
    return nnx.Param(jnp.asarray(sd[key].T if transpose else sd[key]))

  model.tok_emb.embedding = param("model.embed_tokens.weight")
  model.norm.scale = param("model.norm.weight")
  model.head.kernel = param("lm_head.weight", True)
  for i, block in enumerate(model.layers):
    p = f"model.layers.{i}."
    block.attention_norm.scale = param(p + "input_layernorm.weight")
    block.ffn_norm.scale = param(p + "post_attention_layernorm.weight")
    for ours, theirs in zip("qkvo", ("q_proj", "k_proj", "v_proj", "o_proj")):
      getattr(block.attn, "w" + ours).kernel = param(p + f"self_attn.{theirs}.weight", True)
    for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
      getattr(block.mlp, ours).kernel = param(p + f"mlp.{theirs}.weight", True)
  return model


def test_nnx_llama_adapter_loads_in_peft_with_the_same_logits(tmp_path):
  import peft
  import torch
  import transformers
  from safetensors import safe_open

  from backends.tiny import make_tiny_llama

  folder = make_tiny_llama(str(tmp_path / "base"), initializer_range=0.1)

  def hf_model():
    return transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

  graphdef, state = nnx.split(_nnx_llama_from(hf_model()))
  config = jpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["wq", "wv", "w2"])
  adapter, state = jpeft.init(jax.random.key(0), state, config)
  assert sorted(adapter) == sorted(f"layers.{i}.{m}" for i in range(2) for m in ("attn.wq", "attn.wv", "mlp.w2"))
  # non-identity: lora_B random nonzero
  keys = iter(jax.random.split(jax.random.key(1), len(adapter)))
  adapter = {
    m: {**ts, "lora_B.weight": 0.3 * jax.random.normal(next(keys), ts["lora_B.weight"].shape)}
    for m, ts in adapter.items()
  }

  ids = np.random.default_rng(0).integers(0, 256, (2, 10)).astype(np.int32)
  base_logits = np.asarray(nnx.merge(graphdef, state)(jnp.asarray(ids)))
  ours = np.asarray(nnx.merge(graphdef, jpeft.apply(state, adapter, config, materialize=True))(jnp.asarray(ids)))
  with torch.no_grad():
    hf_base = hf_model()(torch.from_numpy(ids).long()).logits.numpy()
  # the nnx Llama is transformers' function (fp32, other summation orders); measured 5.7e-7
  assert_close_to_scale(base_logits, hf_base, 32 * EPS32, what="nnx Llama vs transformers")
  assert scaled_error(ours, base_logits) > 0.05  # the adapter moves the logits

  out = str(tmp_path / "adapter")
  jpeft.save_pretrained(out, adapter, config, state, name_map=HF_NAMES)
  with open(os.path.join(out, "adapter_config.json")) as f:
    saved_config = json.load(f)
  assert sorted(saved_config["target_modules"]) == ["down_proj", "q_proj", "v_proj"]  # PEFT's usual short form

  # exactly the keys PEFT's own save_pretrained writes for the same LoraConfig on the transformers model
  reference = str(tmp_path / "peft_reference")
  peft_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
  peft.get_peft_model(hf_model(), peft_config).save_pretrained(reference)

  def keys_of(path):
    with safe_open(os.path.join(path, "adapter_model.safetensors"), framework="pt") as f:
      return sorted(f.keys())

  assert keys_of(out) == keys_of(reference)

  loaded = peft.PeftModel.from_pretrained(hf_model(), out).eval()
  with torch.no_grad():
    theirs = loaded(torch.from_numpy(ids).long()).logits.numpy()
  # PEFT's factored LoRA vs the merged nnx kernels (fp32, other summation orders); measured 1.15e-6
  assert_close_to_scale(theirs, ours, 32 * EPS32, what="nnx Llama adapter in PEFT")

  # a dict map works too, and one missing a module says which
  table = {m: tree_lib._mapper(HF_NAMES)(m) for m in adapter}
  jpeft.save_pretrained(str(tmp_path / "by_dict"), adapter, config, state, name_map=table)
  assert keys_of(str(tmp_path / "by_dict")) == keys_of(reference)
  with pytest.raises(ValueError, match=r"name_map has no name for 1 adapted module\(s\): \['layers.1.mlp.w2'\]"):
    jpeft.save_pretrained(
      str(tmp_path / "bad"), adapter, config, state, name_map={k: v for k, v in table.items() if k != "layers.1.mlp.w2"}
    )


# ----------------------------------------------------------------------------------------------------------
# Errors


def _state():
  return nnx.split(NnxModel(nnx.Rngs(0)))[1]


def test_targets_that_match_no_path_list_the_available_paths():
  with pytest.raises(targets.NoMatchingTargetsError, match=r"\['wq'\].*not found.*Available modules include: .*q_proj"):
    jpeft.init(jax.random.key(0), _state(), jpeft.LoraConfig(target_modules=["wq"]))


def test_a_layout_that_does_not_fit_a_leaf_is_refused():
  state = _state()
  # a Dense kernel declared (out, in): its 16 x 32 up_proj would give 16 outputs, the bias has 32
  with pytest.raises(tree_lib.LayoutError, match=r"'out_in' of 'layers.0.up_proj' does not fit its leaves.*\(32,\)"):
    jpeft.describe(state, layouts={"up_proj": "out_in"})
  with pytest.raises(tree_lib.LayoutError, match=r"'diagonal' is not a layout; use one of out_in, in_out, embedding"):
    jpeft.describe(state, layouts={"up_proj": "diagonal"})
  with pytest.raises(tree_lib.LayoutError, match=r"\['wq'\] match no weight leaf.*layers\.\*\.q_proj\.kernel"):
    jpeft.describe(state, layouts={"wq": "in_out"})
  tree = {"block": {"w3d": jnp.zeros((2, 3, 4)), "w": jnp.zeros((3, 5))}}
  with pytest.raises(tree_lib.LayoutError, match=r"'in_out' of 'block.w3d' needs a 2-D weight.*\(2, 3, 4\)"):
    jpeft.describe(tree, layouts={"w3d": "in_out"})
  # a bare leaf named in `layouts` is a module of its own
  assert jpeft.describe(tree, layouts={"block.w": "in_out"}).module_kinds == {"block.w": "linear"}


def test_a_tree_that_does_not_fit_its_layout_is_refused():
  layout = jpeft.describe(_state())
  config = jpeft.LoraConfig(target_modules=["q_proj"])
  adapter, _ = jpeft.init(jax.random.key(0), _state(), config, layout)
  other = jax.tree_util.tree_map(lambda x: x, LinenModel().init(jax.random.key(0), _batch()))
  with pytest.raises(
    tree_lib.LayoutError,
    match=r"does not fit its layout: the weight 'layers.0.down_proj.kernel' of 'layers.0.down_proj' is missing",
  ):
    jpeft.apply(other, adapter, config, model_config=layout, materialize=True)


def test_unsupported_kinds_and_unmaterialisable_methods_are_refused():
  state = _state()
  with pytest.raises(targets.UnsupportedTargetError, match=r"'layers.0.norm' is a norm .* LORA does not support"):
    jpeft.init(jax.random.key(0), state, jpeft.LoraConfig(target_modules=["norm"]))
  with pytest.raises(targets.UnsupportedTargetError, match=r"'emb' is a embedding .* IA3 does not support"):
    jpeft.init(jax.random.key(0), state, jpeft.IA3Config(target_modules=["emb"], feedforward_modules=[]))
  lily = jpeft.LilyConfig(r=2, num_B=2, target_modules=["q_proj"])
  adapter, _ = jpeft.init(jax.random.key(0), state, lily)
  with pytest.raises(jpeft.UnmergeableError, match=r"LILY cannot be merged.*the router mixes the lily_B experts"):
    jpeft.apply(state, adapter, lily, materialize=True)
  lora = jpeft.LoraConfig(target_modules=["q_proj"])
  adapter, _ = jpeft.init(jax.random.key(0), state, lora)
  with pytest.raises(ValueError, match=r"foreign tree's model runs its own layers.*materialize=True"):
    jpeft.apply(state, adapter, lora)
  with pytest.raises(ValueError, match=r"pass name_map"):
    jpeft.save_pretrained("unused", adapter, lora, state)


def test_core_apply_materialize_on_jpeft_params_gives_plain_arrays():
  """jpeft's own flat Llama params: ``core.apply(..., materialize=True)`` is the merge without projection, arrays
  only, and the tied head keeps the base embedding."""
  tree = _llama_shaped_tree()
  flat = tree_lib.view(tree, jpeft.describe(tree))
  config = jpeft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules=["embed_tokens", "q_proj"])
  adapter, _ = core.init(jax.random.key(0), flat, config, jpeft.describe(tree))
  del flat["lm_head.weight"]  # a tied head
  out = core.apply(flat, adapter, config, materialize=True)
  assert all(isinstance(v, jax.Array) for v in out.values())
  np.testing.assert_array_equal(out["lm_head.weight"], flat["model.embed_tokens.weight"])
  merged = core.merge(flat, adapter, config)
  assert sorted(out) == sorted(merged)
  for k in out:
    np.testing.assert_array_equal(out[k], merged[k])


def test_a_flat_dict_with_slash_joined_keys_is_the_same_tree():
  """``flax.traverse_util.flatten_dict(sep="/")`` keys: the same modules ("."-joined names), the same adapted
  values, and a flat dict with the same keys back."""
  variables = LinenModel().init(jax.random.key(0), _batch())
  flat = flax.traverse_util.flatten_dict(variables, sep="/")
  config = jpeft.LoraConfig(r=2, init_lora_weights=False, target_modules=["q_proj", "up_proj"])
  layout = jpeft.describe(flat, sep="/")
  assert layout == jpeft.describe(variables)
  adapter, _ = jpeft.init(jax.random.key(1), flat, config, sep="/")
  assert sorted(adapter) == ["layers_0.q_proj", "layers_0.up_proj", "layers_1.q_proj", "layers_1.up_proj"]
  out = jpeft.apply(flat, adapter, config, materialize=True, sep="/")
  nested = flax.traverse_util.flatten_dict(jpeft.apply(variables, adapter, config, materialize=True), sep="/")
  assert sorted(out) == sorted(flat)
  for key in flat:
    np.testing.assert_array_equal(out[key], nested[key])
  assert float(jnp.abs(out["params/layers_1/up_proj/kernel"] - flat["params/layers_1/up_proj/kernel"]).max()) > 0
