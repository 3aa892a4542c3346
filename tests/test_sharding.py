"""SPMD: the trainer on a (data, fsdp) mesh of 8 CPU devices gives the one-device losses, and adapters are
sharded like the base weights they adapt.

The device count must be set before JAX starts, so the checks run in a child process (this file run as a
script) and the test reads the JSON it writes.
"""

import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DATA, FSDP = 2, 4
STEPS = 4


def _spec(sharding):
  """The partition spec as a list, without trailing Nones (P("fsdp", None) == P("fsdp"))."""
  spec = [list(a) if isinstance(a, tuple) else a for a in tuple(sharding.spec)]
  while spec and spec[-1] is None:
    spec.pop()
  return spec


def _child(out_dir: str) -> None:
  sys.path[:0] = [ROOT, HERE]
  import jax

  jax.config.update("jax_default_matmul_precision", "highest")

  import _trainer_child as setup
  from jpeft import registry, sharding
  from jpeft.trainer import Trainer

  assert len(jax.devices()) == 8, jax.devices()
  report = {}
  mesh = sharding.make_mesh(data=DATA, fsdp=FSDP)
  report["mesh"] = dict(mesh.shape)
  report["default_mesh"] = dict(sharding.make_mesh(fsdp=2).shape)

  model_config, params = setup.make_model()
  tok = setup.make_tokenizer()
  train, _, _ = setup.make_data()
  report["param_specs"] = {k: _spec(s) for k, s in sharding.param_shardings(params, mesh).items()}
  placed = sharding.shard_params(params, mesh)
  z = np.zeros
  synthetic = {
    "model.embed_tokens": {"lora_embedding_A": z((4, 320)), "lora_embedding_B": z((32, 4))},
    "lm_head": {"weight": z((320, 32))},
    "model.layers.0.self_attn.q_proj": {"lora_magnitude_vector": z(32), "lora_A.weight": z((4, 32))},
    "model.layers.0.mlp.down_proj": {"lora_A.weight": z((4, 64)), "other": z((3, 5))},
    "__shared__": {"vera_A": z((4, 64))},
  }
  # the method (LoRA) says which base axis each tensor dim follows; names it does not declare are replicated
  synthetic_config = registry.config_from_dict(
    {"peft_type": "LORA", "r": 4, "target_modules": ["embed_tokens", "q_proj"], "modules_to_save": ["lm_head"]}
  )
  report["synthetic_specs"] = {
    m: {t: _spec(v) for t, v in ts.items()}
    for m, ts in sharding.adapter_shardings(synthetic, placed, mesh, synthetic_config).items()
  }

  def config(**kw):  # every example is longer than 128 tokens: one padded length
    return setup.train_config(batch_size=4, max_steps=STEPS, eval_steps=None, max_seq_length=128, **kw)

  single = Trainer(model_config, params, setup.lora_config(), tok, train, None, None, config()).run()
  report["single_losses"] = single["losses"]

  ckpt = os.path.join(out_dir, "ckpt")

  class Crash(Exception):
    pass

  def crash(step, loss, metrics):
    if step == 2:
      raise Crash()

  first = Trainer(
    model_config,
    params,
    setup.lora_config(),
    tok,
    train,
    None,
    None,
    config(checkpoint_dir=ckpt, checkpoint_every=2),
    mesh=mesh,
    on_step=crash,
  )
  report["adapter_specs"] = {m: {t: _spec(v.sharding) for t, v in ts.items()} for m, ts in first.trainable.items()}
  report["params_placed_specs"] = {k: _spec(v.sharding) for k, v in first.params.items()}
  mesh_losses = []
  first.on_step = lambda step, loss, metrics: (mesh_losses.append(loss), crash(step, loss, metrics))
  try:
    first.run()
  except Crash:
    pass
  mu = jax.tree_util.tree_leaves_with_path(first.opt_state)
  report["opt_specs"] = {jax.tree_util.keystr(p): _spec(x.sharding) for p, x in mu}

  resumed = Trainer(
    model_config,
    params,
    setup.lora_config(),
    tok,
    train,
    None,
    None,
    config(checkpoint_dir=ckpt, checkpoint_every=2),
    mesh=mesh,
  )
  result = resumed.run()
  report["resumed_from"] = result["resumed_from"]
  report["first_mesh_losses"] = mesh_losses
  report["mesh_losses"] = result["losses"]
  report["final_adapter_specs"] = {
    m: {t: _spec(v.sharding) for t, v in ts.items()} for m, ts in result["trainable"].items()
  }
  report["compiles"] = resumed.train_step._cache_size()
  with open(os.path.join(out_dir, "report.json"), "w") as f:
    json.dump(report, f)


def test_mesh_training_matches_one_device_and_adapters_follow_base(tmp_path):
  # a persistent compilation cache lets the resumed trainer reuse the first mesh trainer's executable
  env = dict(
    os.environ,
    XLA_FLAGS="--xla_force_host_platform_device_count=8",
    JAX_PLATFORMS="cpu",
    PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla_cache"),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
  )
  proc = subprocess.run(
    [sys.executable, os.path.abspath(__file__), str(tmp_path)], env=env, cwd=ROOT, capture_output=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr.decode()[-4000:]
  r = json.loads((tmp_path / "report.json").read_text())

  assert r["mesh"] == {"data": DATA, "fsdp": FSDP} and r["default_mesh"] == {"data": 4, "fsdp": 2}

  # base: 2-D weights split on fsdp along the largest dim it divides (first on a tie); vectors replicated
  p = r["param_specs"]
  assert p["model.layers.0.self_attn.q_proj.weight"] == ["fsdp"]  # (32, 32)
  assert p["model.layers.0.self_attn.v_proj.weight"] == [None, "fsdp"]  # (16, 32)
  assert p["model.layers.0.mlp.gate_proj.weight"] == ["fsdp"]  # (64, 32)
  assert p["model.layers.0.mlp.down_proj.weight"] == [None, "fsdp"]  # (32, 64)
  assert p["model.embed_tokens.weight"] == ["fsdp"]  # (320, 32)
  assert p["model.norm.weight"] == []
  assert r["params_placed_specs"] == p
  assert r["synthetic_specs"] == {
    "model.embed_tokens": {"lora_embedding_A": [None, "fsdp"], "lora_embedding_B": []},
    "lm_head": {"weight": ["fsdp"]},  # a modules_to_save copy: the base's own sharding
    "model.layers.0.self_attn.q_proj": {"lora_magnitude_vector": ["fsdp"], "lora_A.weight": []},
    "model.layers.0.mlp.down_proj": {"lora_A.weight": [None, "fsdp"], "other": []},
    "__shared__": {"vera_A": []},
  }

  # adapters follow their base: lora_B (out, r) takes the out-dim axis, lora_A (r, in) the in-dim axis
  for specs in (r["adapter_specs"], r["final_adapter_specs"]):
    for module, tensors in specs.items():
      base = p[module + ".weight"] + [None] * (2 - len(p[module + ".weight"]))
      assert (tensors["lora_B.weight"] + [None, None])[:2] == [base[0], None], module
      assert (tensors["lora_A.weight"] + [None, None])[:2] == [None, base[1]], module
    assert specs["model.layers.0.self_attn.q_proj"]["lora_B.weight"] == ["fsdp"]
    assert specs["model.layers.0.mlp.down_proj"]["lora_A.weight"] == [None, "fsdp"]
  # Adam's moments are sharded like the tensors they track; counters are replicated
  opt = r["opt_specs"]
  moments = [k for k in opt if "q_proj" in k and "lora_B" in k]
  assert moments and all(opt[k] == ["fsdp"] for k in moments)
  assert all(v == [] for k, v in opt.items() if "count" in k)

  # the same losses as on one device, also across a crash and a resume on the mesh. Losses are scalars of ~5, far
  # from zero, so a relative bound is their scale: 1e-5 covers the reordered sums of sharded matmuls and
  # all-reduces; the resumed run repeats the very program on the very data, so its first steps are bit-equal.
  assert len(r["first_mesh_losses"]) == 3 and r["resumed_from"] == 2
  np.testing.assert_allclose(r["first_mesh_losses"], r["single_losses"][:3], rtol=1e-5)
  np.testing.assert_allclose(r["mesh_losses"], r["single_losses"], rtol=1e-5)
  np.testing.assert_allclose(r["mesh_losses"][:2], r["first_mesh_losses"][:2], rtol=0, atol=0)
  assert r["compiles"] == 1


if __name__ == "__main__":
  _child(sys.argv[1])
