# One-command set-up: every target creates .venv and installs what it needs on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-quick test-exits lint install clean docs

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
	$(BIN)/ruff check src tests benchmarks launch docs/_hooks
	$(BIN)/ruff format --check src tests benchmarks launch docs/_hooks
	$(BIN)/mypy

# The repeated runs that check that processes exit cleanly (24 runs of 2 spawned ranks, 5 ddp_spawn fits): a rare
# SIGABRT at interpreter exit needs many real exits to show, and each pays torch's imports again: the suite's two
# costliest tests. CI runs them as a stage of their own (`make test-exits` in .ci/run), so `make test` keeps its 15 min.
EXIT_CHECKS := tests/engine/test_clean_exit.py \
	tests/strategies/test_ddp_spawn.py::test_repeated_ddp_spawn_fits_with_a_probe_all_exit_cleanly

# pytest exits 5 when it collects nothing: that must fail, not pass as "no failures". The whole suite but
# EXIT_CHECKS (the GPU tests skip without CUDA); --durations names the slowest tests in CI's log.
test: lint
	@$(BIN)/python -m pytest -q --durations=20 $(addprefix --deselect=,$(EXIT_CHECKS)) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-exits: $(STAMP)
	@$(BIN)/python -m pytest -q $(EXIT_CHECKS) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

# The inner loop while changing code: no spawned process groups, nothing marked slow, no lint.
test-quick: $(STAMP)
	@$(BIN)/python -m pytest -q -m "not slow and not distributed" $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

# The documentation site (mkdocs.yml) into site/, warnings as errors. MkDocs and mkdocstrings live in their own
# .venv-docs (mkdocstrings reads the sources without importing them); the strategy matrix page collects the tests
# with the main .venv.
DOCS_VENV := .venv-docs
DOCS_STAMP := $(DOCS_VENV)/.installed

$(DOCS_STAMP): docs/requirements.txt
	$(PY) -m venv $(DOCS_VENV)
	$(DOCS_VENV)/bin/python -m pip install -q --upgrade pip
	$(DOCS_VENV)/bin/python -m pip install -q -r docs/requirements.txt
	touch $(DOCS_STAMP)

docs: $(STAMP) $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 DISTPROBE_TEST_PYTHON=$(BIN)/python $(DOCS_VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) $(FLOORS_VENV) $(DOCS_VENV) site lightning_logs distprobe_runs .pytest_cache .mypy_cache .ruff_cache

# The lowest versions pyproject.toml allows, in their own environment (tests/floors/setup_floors_env.sh pins each
# floor). The tests are the parts of the suite that reach every private torch, Lightning, torchmetrics and DeepSpeed
# internal distprobe uses (README.md, "Supported versions"); about 1 min to build the environment, 3.5-4.5 min to run.
FLOORS_VENV := .venv-floors
FLOORS_STAMP := $(FLOORS_VENV)/.installed
FLOORS_TESTS := tests/floors tests/engine tests/callbacks tests/metrics tests/strategies tests/loop
# Left out: a benchmark's smoke run (tests/metrics/test_metric_flat_sync.py reaches the same internals), the tests of
# the engine and ProbeSet on torch.distributed alone, and the repeated runs that check clean process exits (the
# repeated ddp_spawn fits and tests/engine/test_clean_exit.py; CI pins torch 2.13.0 in both environments, tests/floors/declared.py; revisit if
# its floor moves).
FLOORS_SKIP := --ignore=tests/metrics/test_metric_benchmark.py --ignore=tests/engine/test_probe_ddp.py \
	--ignore=tests/engine/test_probe_real_use.py --ignore=tests/loop/test_probe_set.py \
	--ignore=tests/engine/test_clean_exit.py \
	--deselect=tests/strategies/test_ddp_spawn.py::test_repeated_ddp_spawn_fits_with_a_probe_all_exit_cleanly

.PHONY: test-floors

$(FLOORS_STAMP): pyproject.toml tests/floors/setup_floors_env.sh tests/floors/declared.py
	PY=$(PY) bash tests/floors/setup_floors_env.sh $(FLOORS_VENV)
	touch $(FLOORS_STAMP)

test-floors: $(FLOORS_STAMP)
	@DISTPROBE_FLOORS=1 $(FLOORS_VENV)/bin/python -m pytest -q $(FLOORS_TESTS) $(FLOORS_SKIP) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

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
