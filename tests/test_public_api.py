"""The flat public namespace (``jpeft.__all__``) and the README's example, run as written on a tiny model."""

import os
import re

import numpy as np

import jpeft
from backends import get_backend
from backends.tiny import make_batch, make_tiny_llama
from jpeft import registry, tree
from numerics import EPS32, assert_close_to_scale

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_all_names_resolve_and_every_method_config_is_public():
  assert len(set(jpeft.__all__)) == len(jpeft.__all__) and not any(n.startswith("_") for n in jpeft.__all__)
  for name in jpeft.__all__:
    assert getattr(jpeft, name) is not None, name
  for peft_type in registry.registered_peft_types():
    cls = registry.get_config_class(peft_type)
    assert cls.__name__ in jpeft.__all__ and getattr(jpeft, cls.__name__) is cls, peft_type
  for name in ("load_config", "init", "apply", "merge", "save_pretrained", "load_pretrained", "load_model"):
    assert name in jpeft.__all__
  # any Flax tree: init/apply/merge/save_pretrained take one (jpeft.tree), describe gives its layout
  for name in ("describe", "TreeLayout"):
    assert name in jpeft.__all__
  assert jpeft.describe is tree.describe and jpeft.TreeLayout is tree.TreeLayout
  for name in ("init", "apply", "merge", "save_pretrained"):
    assert getattr(jpeft, name) is getattr(tree, name), name
  for name in ("generate", "make_train_step", "make_optimizer", "convert_to_lora"):
    assert callable(getattr(jpeft, name)), name


def _readme_example() -> str:
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    text = f.read()
  section = text[text.index("## Using it") :]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_trains_saves_for_peft_and_merges(tmp_path):
  """The README's code with the tiny model's folder for ``"smollm2-135m"`` and a temporary folder for ``"out/"``:
  the adapter trains, PEFT loads the saved folder with jpeft's logits, and the merged params give them too."""
  base = make_tiny_llama(str(tmp_path / "base"), initializer_range=0.1)
  code = _readme_example()
  assert code.count("\n") <= 12, "the README example should stay short"
  code = code.replace('"smollm2-135m"', repr(base)).replace('"out/"', repr(str(tmp_path / "out")))
  batches = [make_batch(seed, 2, 12, 256) for seed in range(6)]
  batches = [{k: b[k] for k in ("input_ids", "attention_mask", "labels")} for b in batches]
  scope = {"batches": batches}
  exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 -- the documented example, run as written
  adapter, config, params, merged = scope["adapter"], scope["config"], scope["params"], scope["merged"]
  assert float(np.abs(np.asarray(adapter["model.layers.0.self_attn.q_proj"]["lora_B.weight"])).max()) > 0  # trained

  ids, mask = batches[0]["input_ids"], batches[0]["attention_mask"]
  jx = get_backend("jax")
  jx.load_base(base)
  jx.load_adapter(str(tmp_path / "out"))
  expected = jx.logits(ids, mask)
  pt = get_backend("torch")
  pt.load_base(base)
  pt.load_adapter(str(tmp_path / "out"))
  # as the parity tests' LOGIT_REL: fp32, other summation orders (measured below 1.1e-6)
  assert_close_to_scale(pt.logits(ids, mask), expected, 32 * EPS32, what="README adapter in PEFT")
  model_config = scope["model_config"]
  from jpeft.models import forward

  merged_logits = np.asarray(forward(merged, model_config, ids, mask))
  assert_close_to_scale(merged_logits, expected, 32 * EPS32, what="README merged params")
  loaded = jpeft.load_config(str(tmp_path / "out"))
  assert (loaded.peft_type, loaded.r, loaded.lora_alpha) == (config.peft_type, config.r, config.lora_alpha)
  assert set(loaded.target_modules) == set(config.target_modules)
  del params
