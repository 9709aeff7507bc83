#!/usr/bin/env bash
# Build the environment in which tests/compat runs distprobe beside the real stable-pretraining 0.1.8.
#
#   bash tests/compat/setup_spt_env.sh [VENV_DIR]     (default: .venv-spt at the repository root)
#
# Kept apart from .venv: `import stable_pretraining` pulls in about 80 distributions (wandb, datasets, kornia,
# transformers, ...) that distprobe never needs. Re-running it on an existing environment only fills in what is
# missing. `make test-spt` runs it once and keeps a stamp, as the main venv's target does.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
VENV="${1:-$ROOT/.venv-spt}"
PY="${PY:-python3}"

"$PY" -m venv "$VENV"
BIN="$VENV/bin"

pip_install() {
    # The machine's pip configuration names package folders that may be absent; pip warns once per package.
    local status=0
    "$BIN/python" -m pip install -q "$@" 2>&1 | { grep -v "^WARNING: Location '.*' is ignored" || true; } || status=$?
    return "$status"
}

pip_install --upgrade pip
# torch first and pinned: 2.13.0 is the CPU build on local disk; an unpinned torch pulls a multi-GB CUDA build. The
# constraint keeps stable-pretraining's dependencies (torchvision above all) from moving it afterwards.
pip_install torch==2.13.0
CONSTRAINTS="$VENV/torch-constraint.txt"
echo "torch==2.13.0" >"$CONSTRAINTS"
pip_install -c "$CONSTRAINTS" "stable-pretraining==0.1.8" -e "$ROOT" "pytest>=8"

# PyPI's torchvision is built against CUDA torch and cannot load its operators beside the CPU build; without two
# operator schemas it does not even import (see torchvision_cpu_ops.py). A .pth line makes every interpreter of this
# environment define them before torchvision is first imported: pytest, the ranks it spawns, a user's script.
SITE="$("$BIN/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cp "$ROOT/tests/compat/torchvision_cpu_ops.py" "$SITE/_spt_torchvision_cpu_ops.py"
echo "import _spt_torchvision_cpu_ops; _spt_torchvision_cpu_ops.install()" >"$SITE/_spt_torchvision_cpu_ops.pth"

# Fail here, not in the tests, when the environment cannot import what they use.
LOGURU_LEVEL=WARNING "$BIN/python" -c "
import stable_pretraining as spt
from stable_pretraining.callbacks import OnlineProbe
from distprobe.callbacks import OnlineProbe as DistprobeOnlineProbe
assert spt.__version__ == '0.1.8', spt.__version__
print('stable-pretraining', spt.__version__, 'and distprobe import in', '$VENV')
"
