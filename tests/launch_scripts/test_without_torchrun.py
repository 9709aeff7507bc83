"""A launch script started with plain ``python`` (no torchrun), as a new user first tries it: a world of one process.

Before, the plain-torch scripts failed in torch's rendezvous ("environment variable RANK expected, but not set").
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # one interpreter start with torch (and the script's 3 steps): about 4 s on 2 idle cores

REPO = Path(__file__).resolve().parents[2]


def test_a_plain_torch_script_runs_without_torchrun_as_one_process(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    script = REPO / "launch" / "torchrun_ddp.py"
    command = [sys.executable, str(script), "--steps", "3"]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    tail = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 0, tail
    assert "torchrun_ddp: world=1 " in proc.stdout and "OK (probe replicas identical on every rank)" in proc.stdout
