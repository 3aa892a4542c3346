"""The method comparison: PEFT's ``method_comparison/MetaMathQA`` layout, run on the jax (jpeft) or torch
(transformers + PEFT) backend.

* ``experiments/default_training_params.json``: the training params every experiment starts from.
* ``experiments/<method>/<name>/adapter_config.json`` (+ ``training_params.json``, merged into the defaults with a
  shallow ``dict.update`` as PEFT does): one experiment.
* ``python -m experiments.run --experiment=experiments/lora/smollm2-rank32 --backend=jax``: one run, written to
  ``experiments/results/<method>--<name>--<backend>.json`` in PEFT's result schema.
* ``python -m experiments.report``: the table and the Pareto plot over all results.

See ``experiments/README.md``.
"""
