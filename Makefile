# One-command set-up: every target creates .venv and installs what it needs on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: 2.13.0 is the CPU build on local disk; an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev,demo,deepspeed]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/distprobe demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks launch
	$(BIN)/ruff format --check src tests benchmarks launch
	$(BIN)/mypy

# pytest exits 5 when it collects nothing: that must fail, not pass as "no failures".
test: lint
	@$(BIN)/python -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) lightning_logs distprobe_runs .pytest_cache .mypy_cache .ruff_cache

# stable-pretraining drop-in tests (tests/compat): the real stable-pretraining 0.1.8 in its own environment, beside
# distprobe installed editable. Built once (about 1.5-2.5 min from scratch here); the stamp keeps later runs fast.
SPT_VENV := .venv-spt
SPT_STAMP := $(SPT_VENV)/.installed

.PHONY: test-spt

$(SPT_STAMP): pyproject.toml tests/compat/setup_spt_env.sh tests/compat/torchvision_cpu_ops.py
	bash tests/compat/setup_spt_env.sh $(SPT_VENV)
	touch $(SPT_STAMP)

test-spt: $(SPT_STAMP)
	@$(SPT_VENV)/bin/python -m pytest -q tests/compat $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc
