"""The scripts in launch/ run end to end under real torchrun: single node, and two "nodes" on localhost.

Each script checks on its ranks that the probe replicas are bitwise identical after training and prints ``OK`` on
rank 0; a failing check, a hang (killed at the timeout) or a crash fails the test.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
TIMEOUT = 180
STEPS = "8"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _torchrun(*flags: str, script: str, args: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *flags, str(LAUNCH / script), "--steps", STEPS, *args]


def _check(proc: subprocess.CompletedProcess, script: str) -> None:
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, f"{script} exited with {proc.returncode}:\n{tail}"
    assert "OK (probe replicas identical on every rank)" in proc.stdout, tail


@pytest.mark.parametrize(
    ("script", "args"),
    [
        ("torchrun_ddp.py", ()),
        ("torchrun_fsdp1.py", ()),
        ("torchrun_fsdp2.py", ("--precision", "bf16")),
        ("torchrun_deepspeed.py", ("--zero-stage", "3")),
        ("lightning_ddp.py", ()),
    ],
)
def test_script_runs_under_torchrun_standalone(script, args):
    if "deepspeed" in script:
        pytest.importorskip("deepspeed")
    cmd = _torchrun("--standalone", "--nproc_per_node=2", script=script, args=args)
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    _check(proc, script)
    assert "world=2" in proc.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_node_rendezvous_on_localhost():
    """Two torchrun agents, one process each, meet through a c10d rendezvous: a world of 2 across "nodes"."""
    endpoint = f"127.0.0.1:{_free_port()}"
    procs = []
    for node_rank in (0, 1):
        flags = (
            "--nnodes=2",
            "--nproc_per_node=1",
            f"--node_rank={node_rank}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={endpoint}",
            "--rdzv-id=distprobe-two-node-test",
        )
        cmd = _torchrun(*flags, script="torchrun_fsdp2.py")
        procs.append(
            subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    outputs = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=TIMEOUT)
            outputs.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for node_rank, proc in enumerate(outputs):
        tail = (proc.stdout + proc.stderr)[-4000:]
        assert proc.returncode == 0, f"node {node_rank} exited with {proc.returncode}:\n{tail}"
    # Global rank 0 prints the summary; either agent may host it, so look at both.
    printed = outputs[0].stdout + outputs[1].stdout
    assert "torchrun_fsdp2: world=2" in printed
    assert "OK (probe replicas identical on every rank)" in printed
