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
