#!/usr/bin/env bash
# Build the environment in which `make test-floors` runs: every dependency at the lowest version pyproject.toml allows.
#
#   bash tests/floors/setup_floors_env.sh [VENV_DIR]     (default: .venv-floors at the repository root)
#
# The pins are read from pyproject.toml: tests/floors/declared.py turns each `name>=X` of the dependencies and of the
# deepspeed extra into `name==X`. Raising a floor there is all it takes to test the new one. The floors' own
# dependencies (numpy, omegaconf, ...) resolve to their newest compatible releases, as for a user.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
VENV="${1:-$ROOT/.venv-floors}"
PY="${PY:-python3}"

"$PY" -m venv --clear "$VENV"
BIN="$VENV/bin"
CONSTRAINTS="$VENV/floors.txt"
"$BIN/python" "$ROOT/tests/floors/declared.py" "$ROOT/pyproject.toml" >"$CONSTRAINTS"
echo "floors: $(tr '\n' ' ' <"$CONSTRAINTS")"
# torch: CI pins 2.13.0, the CPU build on local disk, where the floor lies below it (tests/floors/declared.py, CI_PINS:
# any other torch release on PyPI is a multi-GB CUDA build; the lower floor is proven on the GPU machine).
"$BIN/python" -m pip install -q -r "$CONSTRAINTS"
# distprobe without its dependencies (pinned above), then the test tools, constrained so that none moves a floor.
"$BIN/python" -m pip install -q --no-deps -e "$ROOT"
"$BIN/python" -m pip install -q -c "$CONSTRAINTS" "pytest>=8" "hypothesis>=6"
"$BIN/python" -m pip check
