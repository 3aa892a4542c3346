"""Lily beyond the method table: cross-layer sharing exactly as PEFT's, one array per shared tensor (its gradient the
sum over its users), saved copies checked on load, the batch-mean router with padding, config errors.

Float comparisons are relative to scale (``numerics``). Logits against PEFT on the tiny Llama: measured 1.9e-6 at
every position of a left- and a right-padded batch, padding included (bound ``LOGIT_REL`` = 32 eps, as in
test_parity). The tied gradient against the sum of untied per-layer gradients: the same float32 sums in another
order, measured 2.4e-7 (bound 1e-6).
"""

import copy
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
from safetensors.numpy import load_file, save_file

from backends import get_backend
from backends.tiny import make_batch
from jpeft import checkpoint, core, registry, train
from jpeft.config import AdapterCheckpointError, InvalidConfigError
from jpeft.methods import base, lily
from numerics import EPS32, assert_close_to_scale, scaled_error

from method_table import VOCAB

LOGIT_REL = 32 * EPS32


def _cfg(**kw):
  return registry.config_from_dict(dict(peft_type="LILY", **kw))


def _init(jax_model, seed=0, **kw):
  config, params = jax_model
  peft_config = _cfg(**kw)
  adapter, params = core.init(jax.random.key(seed), params, peft_config, config)
  return peft_config, adapter, params


def _perturb(adapter, seed=0):
  leaves, treedef = jax.tree_util.tree_flatten(adapter)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree_util.tree_unflatten(treedef, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


# ------------------------------------------------------------------------------------------------------------
# Sharing: the same structure as PEFT's, one array per shared tensor

SHARING = {
  "list": dict(r=4, target_modules=["q_proj", "v_proj"]),
  "stride-2": dict(r=4, stride_A=2, target_modules=["q_proj", "o_proj", "down_proj"]),
  "stride-3-of-2": dict(r=4, stride_A=3, num_B=3, target_modules=["k_proj"]),
  # a regex groups by base shape only: q and o (64 x 64) share one B and, in model order, the A blocks
  "regex-by-shape": dict(r=4, stride_A=2, target_modules=r".*\.(q_proj|o_proj|v_proj)"),
  "all-linear": dict(r=2, target_modules="all-linear"),
  "layers": dict(r=4, target_modules=["q_proj", "up_proj"], layers_to_transform=[1]),
  "default-targets": dict(r=4),
}


def _peft_sharing(torch_base, kw):
  """PEFT's structure: for each adapted module, the module name of the first user of its lily_A and lily_B."""
  model = peft.get_peft_model(copy.deepcopy(torch_base), peft.LilyConfig(**kw))
  owners, first = {}, {}
  for name, module in model.named_modules():
    if isinstance(module, peft.tuners.lily.layer.LilyLayer) and "default" in module.lily_A:
      name = name.removeprefix("base_model.model.")
      for t in ("lily_A", "lily_B"):
        ident = id(getattr(module, t)["default"])
        first.setdefault(ident, name)
        owners[(name, t + ".weight")] = first[ident]
  return owners, model


@pytest.mark.parametrize("case", sorted(SHARING))
def test_sharing_is_peft_s(case, jax_model, torch_base):
  peft_config, adapter, params = _init(jax_model, **SHARING[case])
  theirs, _ = _peft_sharing(torch_base, SHARING[case])
  specs = core._adapted_specs(params, adapter, peft_config, jax_model[0])
  ours = {}
  for name, users in core.tied_tensors(peft_config, specs).items():
    tensor, owner = name.split("@")
    assert tensor == next(iter(users.values())) and owner == next(iter(users))
    for module, t in users.items():
      ours[(module, t)] = owner
  assert ours == theirs
  # one array per shared tensor: the adapter holds each once, and counts as many parameters as PEFT trains
  assert set(adapter[core.SHARED]) == set(core.tied_tensors(peft_config, specs))
  model = peft.get_peft_model(
    copy.deepcopy(torch_base), peft.LilyConfig(**SHARING[case])
  )  # PEFT counts a shared parameter once
  assert core.num_params(adapter) == model.get_nb_trainable_parameters()[0]


def test_a_shared_tensor_is_one_leaf_whose_gradient_sums_its_users(jax_model, monkeypatch):
  """The tied B's gradient equals the sum of the gradients each layer's own copy would get."""
  config, _ = jax_model
  peft_config, adapter, params = _init(jax_model, r=4, target_modules=["q_proj"])
  adapter = _perturb(adapter)
  (b_name,) = [n for n in adapter[core.SHARED] if n.startswith("lily_B")]
  batch = {k: jnp.asarray(v) for k, v in make_batch(0, 3, 12, VOCAB).items()}
  loss = train.make_loss_fn(config, peft_config)
  tied = jax.grad(lambda a: loss(a, params, batch, None)[0])(adapter)[core.SHARED][b_name]

  # the same adapter with the B untied: one copy per layer, each used by its own layer only
  users = list(core.tied_tensors(peft_config, core._adapted_specs(params, adapter, peft_config, config))[b_name])
  untied_adapter = dict(adapter)
  untied_adapter[core.SHARED] = dict(adapter[core.SHARED])
  b = untied_adapter[core.SHARED].pop(b_name)
  for m in users:
    untied_adapter[core.SHARED][f"copy@{m}"] = b

  def untied_ties(specs, cfg):
    ties = {n: u for n, u in lily.tied_tensors(specs, cfg).items() if n != b_name}
    ties.update({f"copy@{m}": {m: "lily_B.weight"} for m in users})
    return ties

  monkeypatch.setitem(base._TABLE, "LILY", dataclasses.replace(lily.METHOD, tied_tensors=untied_ties))
  grads = jax.grad(lambda a: loss(a, params, batch, None)[0])(untied_adapter)[core.SHARED]
  per_layer = [np.asarray(grads[f"copy@{m}"]) for m in users]
  assert len(per_layer) == 2 and all(np.abs(g).max() > 0 for g in per_layer)
  assert scaled_error(per_layer[0], per_layer[1]) > 0.1  # the layers contribute different gradients
  assert_close_to_scale(np.asarray(tied), sum(per_layer), 1e-6, what="tied gradient vs sum over layers")


# ------------------------------------------------------------------------------------------------------------
# Saving and loading


def test_saved_copies_and_a_checkpoint_whose_copies_differ(jax_model, tmp_path):
  config, base_params = jax_model
  peft_config, adapter, params = _init(jax_model, r=4, stride_A=2, target_modules=["q_proj", "v_proj"])
  adapter = _perturb(adapter)
  folder = str(tmp_path / "lily")
  checkpoint.save_pretrained(folder, adapter, peft_config, params)
  path = os.path.join(folder, checkpoint.ADAPTER_WEIGHTS)
  state = load_file(path)
  prefix = "base_model.model.model.layers"
  # PEFT's keys: A, B and the router under every layer, the copies of one tensor equal
  assert sorted(state) == sorted(
    f"{prefix}.{i}.self_attn.{m}.lily_{t}.weight"
    for i in (0, 1)
    for m in ("q_proj", "v_proj")
    for t in ("A", "B", "router")
  )
  for m in ("q_proj", "v_proj"):
    for t in "AB":
      np.testing.assert_array_equal(
        state[f"{prefix}.0.self_attn.{m}.lily_{t}.weight"], state[f"{prefix}.1.self_attn.{m}.lily_{t}.weight"]
      )
  _, loaded, _ = checkpoint.load_pretrained(folder, base_params, config)
  for name, value in adapter[core.SHARED].items():
    np.testing.assert_array_equal(np.asarray(loaded[core.SHARED][name]), np.asarray(value))

  edited = dict(state)
  key = f"{prefix}.1.self_attn.v_proj.lily_B.weight"
  edited[key] = edited[key] + np.float32(1e-3)
  save_file(edited, path, metadata={"format": "pt"})
  with pytest.raises(AdapterCheckpointError, match=r"layers\.1\.self_attn\.v_proj\.lily_B\.weight.*differs"):
    checkpoint.load_pretrained(folder, base_params, config)


def test_peft_checkpoint_loads(jax_model, torch_base, tmp_path):
  kw = dict(r=4, stride_A=2, num_B=3, scaling=2.0, target_modules=["q_proj", "down_proj"])
  model = peft.get_peft_model(copy.deepcopy(torch_base), peft.LilyConfig(init_weights=False, **kw))
  model.save_pretrained(str(tmp_path))
  config, base_params = jax_model
  peft_config, adapter, params = checkpoint.load_pretrained(str(tmp_path), base_params, config)
  b = make_batch(3, 3, 12, VOCAB)
  import torch

  with torch.no_grad():
    ref = model(
      input_ids=torch.tensor(b["input_ids"]).long(),
      attention_mask=torch.tensor(b["attention_mask"]).long(),
      position_ids=torch.tensor(np.where(b["attention_mask"] == 1, b["attention_mask"].cumsum(-1) - 1, 1)).long(),
    ).logits.numpy()
  from jpeft.models import forward

  ours = np.asarray(forward(core.apply(params, adapter, peft_config), config, b["input_ids"], b["attention_mask"]))
  assert_close_to_scale(ours, ref, LOGIT_REL, what="PEFT's Lily checkpoint in jpeft, every position")


def test_save_without_params_says_why(jax_model, tmp_path):
  peft_config, adapter, _ = _init(jax_model, r=4, target_modules=["q_proj"])
  with pytest.raises(ValueError, match="ties tensors across modules"):
    checkpoint.save_pretrained(str(tmp_path / "x"), adapter, peft_config)


# ------------------------------------------------------------------------------------------------------------
# The router averages over the whole batch, padding included


@pytest.mark.parametrize("pad", ["left", "right"])
def test_batch_mean_router_matches_peft_at_every_position(folder, pad):
  jx, pt = get_backend("jax"), get_backend("torch")
  jx.load_base(folder)
  pt.load_base(folder)
  kw = dict(peft_type="LILY", r=4, num_B=3, scaling=2.0, init_weights=False, target_modules=["q_proj", "v_proj"])
  pt.attach_adapter(kw, seed=0)
  jx.attach_adapter(kw, seed=0)
  jx.set_adapter_state_dict(pt.adapter_state_dict())
  b = make_batch(4, 3, 16, VOCAB, pad=pad)
  ours, theirs = jx.logits(b["input_ids"], b["attention_mask"]), pt.logits(b["input_ids"], b["attention_mask"])
  assert_close_to_scale(ours, theirs, LOGIT_REL, what=f"{pad}-padded Lily logits, padding included")
  # the batch couples the rows: row 0 changes when only row 2 does, in both libraries
  other = {k: v.copy() for k, v in b.items()}
  other["input_ids"][2] = np.where(other["attention_mask"][2] == 1, (other["input_ids"][2] + 1) % VOCAB, 0)
  ours2 = jx.logits(other["input_ids"], other["attention_mask"])
  theirs2 = pt.logits(other["input_ids"], other["attention_mask"])
  assert scaled_error(ours2[0], ours[0]) > 1e-4 and scaled_error(theirs2[0], theirs[0]) > 1e-4
  assert_close_to_scale(ours2, theirs2, LOGIT_REL, what="Lily logits after changing another row")
  assert core.batch_coupled(jx.peft_config) and not core.batch_coupled(_lora())


def _lora():
  return registry.config_from_dict(dict(peft_type="LORA", r=2, target_modules=["q_proj"]))


# ------------------------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize(
  "kw",
  [
    dict(stride_A=0),
    dict(num_B=1),
    dict(layers_pattern="layers"),
  ],
)
def test_config_errors_match_peft(kw):
  with pytest.raises(ValueError):
    peft.LilyConfig(**kw)
  with pytest.raises(InvalidConfigError):
    _cfg(**kw)


def test_r_must_be_positive_as_in_peft(torch_base):
  with pytest.raises(ValueError, match="positive"):
    peft.get_peft_model(copy.deepcopy(torch_base), peft.LilyConfig(r=0, target_modules=["q_proj"]))
  with pytest.raises(InvalidConfigError, match="`r`"):
    _cfg(r=0, target_modules=["q_proj"])


def test_merge_is_refused(jax_model):
  peft_config, adapter, params = _init(jax_model, r=4, target_modules=["q_proj"])
  with pytest.raises(core.UnmergeableError, match="LILY cannot be merged"):
    core.merge(params, adapter, peft_config)


def test_config_round_trips_through_peft(tmp_path):
  cfg = _cfg(r=6, stride_A=3, num_B=4, scaling=0.5, init_weights=False, target_modules=["q_proj"])
  path = tmp_path / "adapter_config.json"
  path.write_text(json.dumps(cfg.to_dict()))
  theirs = peft.LilyConfig.from_pretrained(str(tmp_path))
  assert (theirs.r, theirs.stride_A, theirs.num_B, theirs.scaling, theirs.init_weights) == (6, 3, 4, 0.5, False)
