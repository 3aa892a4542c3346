"""PEFT's switches in the training params (compile, use_gc, use_amp, autocast_adapter_dtype, attn_implementation,
init_kv_cache_prefix): each is honoured by a backend, or refused before the model loads with an error naming it."""

import json
import os
import re
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from backends import get_backend
from backends.tiny import TINY_LORA, make_batch, make_experiment_assets, make_tiny_llama, write_json
from experiments import common, runners
from jpeft.config import JpeftError

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VOCAB = 320
LORA = TINY_LORA
# init_lora_weights False: B != 0, so the adapter changes the loss from the first step
LORA_NONZERO = dict(LORA, init_lora_weights=False)
PREFIX = {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4, "task_type": "CAUSAL_LM"}
# a budget for runners that are set up but not trained
SMALL = dict(
  max_steps=2,
  eval_steps=0,
  batch_size=2,
  batch_size_eval=2,
  n_train=4,
  n_valid=0,
  n_test=1,
  max_seq_length=256,
  pad_multiple=256,
  n_forgetting=1,
  forgetting_max_length=32,
)
# remat: jax.checkpoint's primitive ("remat2" in jax 0.4-0.10, "checkpoint" in later versions)
REMAT = re.compile(r"\b(remat2?|checkpoint)\[")

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  """A tiny random Llama, a tiny byte-level BPE tokenizer, and experiment folders (LoRA, prefix tuning)."""
  return make_experiment_assets(
    tmp_path_factory.mktemp("training_params"),
    {"lora/tiny": {"adapter_config.json": LORA}, "prefixtuning/tiny": {"adapter_config.json": PREFIX}},
    vocab_size=VOCAB,
  )


def _runner(assets, backend, experiment="lora/tiny", *, model=None, **params):
  """A runner for a tiny experiment, its config checked (as run_experiment does before loading)."""
  exp = common.load_experiment(str(assets["exps"] / experiment), dict(SMALL, **params))
  config = common.make_train_config(exp, progress=False)
  runner = runners.get_runner(backend)(
    exp, config, model_source=model or assets["model"], tokenizer_source=assets["tokenizer"]
  )
  runner.check_config()
  return runner


def _set_up(assets, backend, experiment="lora/tiny", **params):
  """A runner loaded and set up (adapter, optimizer, train step) as for its first step; nothing trained."""
  runner = _runner(assets, backend, experiment, **params)
  runner.load()
  runner.setup(common.load_data(runner.exp.params))
  return runner


def _trainer_jaxpr(trainer) -> str:
  batch, _, _ = trainer.make_batch(trainer.schedule()[0])
  return str(
    jax.make_jaxpr(trainer.train_step)(trainer.trainable, trainer.opt_state, trainer.params, batch, trainer.rng)
  )


# ------------------------------------------------------------------------------------------------------------
# validation: PEFT's defaults load; any other value a backend does not honour is refused before loading


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_peft_defaults_load(backend):
  """PEFT's default_training_params.json values (false / null / true) pass every check on both backends."""
  with open(common.DEFAULT_TRAINING_PARAMS_PATH) as f:
    defaults = json.load(f)
  expected = {
    "compile": False,
    "use_gc": False,
    "use_amp": False,
    "autocast_adapter_dtype": True,
    "attn_implementation": None,
    "init_kv_cache_prefix": None,
  }
  assert {k: defaults[k] for k in expected} == expected
  exp = common.load_experiment(os.path.join(ROOT, "experiments", "lora", "smollm2-rank32"))
  config = common.make_train_config(exp)
  assert {k: getattr(config, k) for k in expected} == expected
  runners.get_runner(backend)(exp, config, model_source="smollm2-135m", tokenizer_source="smollm2-135m").check_config()


@pytest.mark.parametrize(
  "backend, experiment, params, message",
  [
    (b, "lora/tiny", {"attn_implementation": "flash_attention_2"}, r"attn_implementation 'flash_attention_2'")
    for b in ("jax", "torch")
  ]
  + [
    (b, "lora/tiny", {"init_kv_cache_prefix": "You are a math tutor."}, r"init_kv_cache_prefix .*'LORA'")
    for b in ("jax", "torch")
  ]
  + [
    # jpeft has no prefix tuning yet: the method itself is refused first, naming the adapter config file
    (
      "jax",
      "prefixtuning/tiny",
      {"init_kv_cache_prefix": "You are a math tutor."},
      r"adapter_config.json: .*PREFIX_TUN",
    ),
    ("torch", "lora/tiny", {"use_gc": "yes"}, r"use_gc .*must be true or false, got 'yes'"),
    ("jax", "lora/tiny", {"use_amp": 1}, r"use_amp .*must be true or false, got 1"),
    ("torch", "lora/tiny", {"attn_implementation": 2}, r"attn_implementation .*must be null or a string"),
  ],
)
def test_refused_values_name_the_key_before_loading(assets, no_loading, backend, experiment, params, message):
  with pytest.raises(JpeftError, match=message):  # ExperimentError or a config error, both before loading
    runners.run_experiment(
      str(assets["exps"] / experiment),
      backend,
      overrides=dict(SMALL, **params),
      model=assets["model"],
      tokenizer=assets["tokenizer"],
      progress=False,
      write=False,
    )


def test_compile_is_accepted_on_jax(assets):
  """jpeft always compiles (jit): compile true is accepted and changes nothing."""
  runner = _runner(assets, "jax", compile=True)
  assert runner.config.compile is True and runner.config.jax_unsupported() == []


def test_launcher_reports_one_error_line(assets, tmp_path):
  """``python -m experiments.run`` reports a refused value as its other input errors: one ``error:`` line."""
  folder = tmp_path / "experiments" / "lora" / "flash"
  write_json(str(folder / "adapter_config.json"), LORA)
  write_json(str(folder / "training_params.json"), {"attn_implementation": "flash_attention_2"})
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.run",
      f"--experiment={folder}",
      "--backend=jax",
      f"--model={assets['model']}",
      f"--tokenizer={assets['tokenizer']}",
      f"--results_dir={tmp_path}",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, proc.stderr[-2000:]
  assert "attn_implementation 'flash_attention_2'" in errors[0] and "eager" in errors[0]
  assert not list(tmp_path.glob("*.json"))


# ------------------------------------------------------------------------------------------------------------
# the runners pass every switch on (set up only, no training)


def test_jax_runner_wires_the_switches(assets):
  plain = _set_up(assets, "jax").trainer
  assert not REMAT.search(_trainer_jaxpr(plain)) and plain.train_compute_dtype is None
  runner = _set_up(assets, "jax", use_gc=True, use_amp=True, dtype="bfloat16", autocast_adapter_dtype=False)
  trainer = runner.trainer
  assert REMAT.search(_trainer_jaxpr(trainer)), "use_gc: the train step was built without jax.checkpoint"
  assert trainer.train_compute_dtype == jnp.bfloat16 and trainer.config.compute_dtype is None
  assert {str(v.dtype) for ts in trainer.trainable.values() for v in ts.values()} == {"bfloat16"}
  # the default: a fresh adapter over a bfloat16 base is float32 (PEFT's autocast_adapter_dtype=True)
  trainer = _set_up(assets, "jax", dtype="bfloat16").trainer
  assert {str(v.dtype) for ts in trainer.trainable.values() for v in ts.values()} == {"float32"}


def test_torch_runner_wires_the_switches(assets):
  runner = _set_up(assets, "torch")
  backend = runner.backend
  assert not backend.base_model().is_activation_checkpointing and not backend.amp and not backend.is_compiled
  runner = _set_up(
    assets,
    "torch",
    use_gc=True,
    use_amp=True,
    compile=True,
    attn_implementation="eager",
    dtype="bfloat16",
    autocast_adapter_dtype=False,
  )
  backend = runner.backend
  assert backend.base_model().is_activation_checkpointing and backend.amp and backend.is_compiled
  assert backend.base_model().config._attn_implementation == "eager"
  assert {p.dtype for n, p in backend.model.named_parameters() if "lora_" in n} == {torch.bfloat16}
  runner = _set_up(assets, "torch", dtype="bfloat16")
  assert {p.dtype for n, p in runner.backend.model.named_parameters() if "lora_" in n} == {torch.float32}


def test_torch_result_names_the_model_not_its_cache_folder(assets, monkeypatch):
  """A registry name resolves to a cache folder; the result's peft_config names the model as the run did."""
  import backends.torch_backend as torch_backend

  monkeypatch.setattr(torch_backend, "_resolve_model_source", lambda s: assets["model"] if s == "tiny-registry" else s)
  runner = _set_up(assets, "torch", model="tiny-registry")
  assert runner.backend.model.peft_config["default"].base_model_name_or_path == assets["model"]  # PEFT's record
  assert runner.resolved_peft_config()["base_model_name_or_path"] == "tiny-registry"
  # names as given; an absolute path inside the project becomes relative to it
  assert runners.portable_model_name("smollm2-135m") == "smollm2-135m"
  assert runners.portable_model_name(os.path.join(ROOT, "models", "m")) == os.path.join("models", "m")
  assert runners.portable_model_name("/elsewhere/m") == "/elsewhere/m"


# ------------------------------------------------------------------------------------------------------------
# the switches on the backends: numbers


def _train(folder, backend_name, steps, *, config=LORA_NONZERO, batches=None, lr=1e-2, **options):
  backend = get_backend(backend_name)
  backend.load_base(folder)
  backend.attach_adapter(config, seed=0)
  backend.set_training_options(**options)
  backend.configure_optimizer(lr=lr)
  batches = batches or [make_batch(s, 3, 12, VOCAB) for s in range(steps)]
  losses = [backend.train_step(b["input_ids"], b["attention_mask"], b["labels"]) for b in batches[:steps]]
  return backend, losses


@pytest.mark.parametrize("backend_name", ["jax", "torch"])
def test_use_gc_gives_the_same_losses(assets, backend_name):
  plain, expected = _train(assets["model"], backend_name, 3)
  backend, losses = _train(assets["model"], backend_name, 3, gradient_checkpointing=True)
  # Recomputing a layer is the same arithmetic, but XLA fuses a rematerialised layer differently (the first loss
  # already differs in the last fp32 bits on jax), and the later losses carry that into the updates: 1e-5 is
  # ~100 fp32 ulps, far below what a wrong gradient would move after a 1e-2 step. torch's CPU recompute is
  # bit-exact in practice.
  np.testing.assert_allclose(losses, expected, rtol=1e-5)
  assert losses[1] != losses[0]  # the steps trained
  if backend_name == "jax":
    b = make_batch(0, 3, 12, VOCAB)
    args = (backend.trainable, backend._opt[1], backend.params, backend._batch(**b), jax.random.key(0))
    assert REMAT.search(str(jax.make_jaxpr(backend.compiled_train_step)(*args)))
    args = (plain.trainable, plain._opt[1], plain.params, plain._batch(**b), jax.random.key(0))
    assert not REMAT.search(str(jax.make_jaxpr(plain.compiled_train_step)(*args)))
  else:
    assert backend.base_model().is_activation_checkpointing and not plain.base_model().is_activation_checkpointing


@pytest.mark.parametrize("backend_name", ["jax", "torch"])
def test_use_amp_computes_in_bfloat16_and_trains(assets, backend_name):
  batch = make_batch(0, 3, 12, VOCAB)
  _, expected = _train(assets["model"], backend_name, 6, batches=[batch] * 6)
  backend, losses = _train(assets["model"], backend_name, 6, batches=[batch] * 6, amp=True)
  # bfloat16 keeps 8 significant bits (relative rounding 2^-9 per operation); over two layers and a 320-way
  # softmax the loss of this tiny model moves by ~1e-4..1e-3 relative. 2e-2 is a bfloat16-sized bound; an fp32
  # run would be equal to ~1e-6, and fp16/garbage arithmetic or a bf16 loss would miss the bound or the checks below.
  np.testing.assert_allclose(losses, expected, rtol=2e-2)
  assert max(abs(a - b) for a, b in zip(losses, expected)) > 1e-5, "use_amp changed nothing: not in bfloat16"
  assert losses[-1] < losses[0] - 0.1  # it trains (six steps on one batch)
  # the master copy the optimizer updates stays float32
  if backend_name == "jax":
    assert {str(v.dtype) for ts in backend.trainable.values() for v in ts.values()} == {"float32"}
  else:
    assert {p.dtype for n, p in backend.model.named_parameters() if "lora_" in n} == {torch.float32}


@pytest.mark.parametrize("backend_name", ["jax", "torch"])
@pytest.mark.parametrize("autocast", [True, False])
def test_autocast_adapter_dtype_over_a_bfloat16_base(assets, backend_name, autocast):
  backend = get_backend(backend_name)
  backend.load_base(assets["model"], dtype="bfloat16")
  backend.attach_adapter(LORA, seed=0, autocast_adapter_dtype=autocast)
  if backend_name == "jax":
    dtypes = {str(v.dtype) for ts in backend.trainable.values() for v in ts.values()}
    base = {str(backend.params["model.layers.0.self_attn.q_proj.weight"].dtype)}
  else:
    dtypes = {str(p.dtype).removeprefix("torch.") for n, p in backend.model.named_parameters() if "lora_" in n}
    base = {str(backend.base_model().model.layers[0].self_attn.q_proj.base_layer.weight.dtype).removeprefix("torch.")}
  assert base == {"bfloat16"}
  assert dtypes == ({"float32"} if autocast else {"bfloat16"})
  # and it trains in that dtype
  backend.configure_optimizer(lr=1e-2)
  b = make_batch(0, 3, 12, VOCAB)
  assert np.isfinite(backend.train_step(b["input_ids"], b["attention_mask"], b["labels"]))


def test_attn_implementation(assets):
  """torch: passed to from_pretrained; jax: its one softmax attention is the math of "eager" and "sdpa"."""
  b = make_batch(0, 3, 12, VOCAB)
  logits = {}
  for attn in ("eager", "sdpa"):
    backend = get_backend("torch")
    backend.load_base(assets["model"], attn_implementation=attn)
    assert backend.model.config._attn_implementation == attn
    logits[attn] = backend.logits(b["input_ids"], b["attention_mask"])
  jax_backend = get_backend("jax")
  jax_backend.load_base(assets["model"], attn_implementation="eager")
  got = jax_backend.logits(b["input_ids"], b["attention_mask"])
  real = b["attention_mask"].astype(bool)
  for attn in ("eager", "sdpa"):  # fp32: the two agree to rounding (test_llama.py holds the model to 1e-5)
    np.testing.assert_allclose(got[real], logits[attn][real], atol=1e-4, rtol=1e-4)
  with pytest.raises(ValueError, match="flash_attention_2"):
    jax_backend.load_base(assets["model"], attn_implementation="flash_attention_2")


def test_torch_compile_trains_the_same(tmp_path):
  """torch.compile (inductor, gcc) works on this CPU; one layer keeps its compile to ~30 s on 2 cores."""
  folder = make_tiny_llama(
    str(tmp_path / "one_layer"),
    num_hidden_layers=1,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=2,
    num_key_value_heads=1,
  )
  batches = [make_batch(s, 3, 12, 256) for s in range(2)]
  _, expected = _train(folder, "torch", 2, batches=batches)
  backend, losses = _train(folder, "torch", 2, batches=batches, compile=True)
  assert backend.is_compiled
  # inductor fuses and reorders float32 reductions: equal to ~1e-6, not bit for bit
  np.testing.assert_allclose(losses, expected, rtol=1e-5)


def test_init_kv_cache_prefix_on_torch(assets):
  """PEFT's initialize_kv_prefix_from_text: the base model's KV cache of the text becomes the prefix."""
  from peft.tuners.cartridge.utils import prompt_embeddings_from_past_key_values
  from transformers import AutoModelForCausalLM, AutoTokenizer

  text = "You are a careful math tutor. Think step by step and check every sum."
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    fresh = _set_up(assets, "torch", "prefixtuning/tiny").backend.adapter_state_dict()["prompt_embeddings"]
    runner = _set_up(assets, "torch", "prefixtuning/tiny", init_kv_cache_prefix=text)
  got = runner.backend.adapter_state_dict()["prompt_embeddings"]
  tokenizer = AutoTokenizer.from_pretrained(assets["tokenizer"])
  base = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32)
  ids = torch.tensor([tokenizer(text)["input_ids"]])  # the tiny tokenizer has no chat template: plain text
  with torch.no_grad():
    cache = base(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True).past_key_values
  expected = prompt_embeddings_from_past_key_values(cache, num_virtual_tokens=PREFIX["num_virtual_tokens"])
  assert not np.allclose(got, fresh)
  np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-6)
  # and it trains from there
  b = make_batch(0, 2, 12, VOCAB)
  assert np.isfinite(runner.backend.train_step(b["input_ids"], b["attention_mask"], b["labels"]))
