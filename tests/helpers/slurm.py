"""A real single-node Slurm for the tests that need one (slurm/local-cluster.sh), as a session fixture.

The fixture starts the cluster (and stops it afterwards, unless it was already running). Where it cannot start, the
Slurm tests are skipped with the reason, except when the ``CI`` variable is set: then they fail, so CI never passes
without having run them.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SCRIPT = REPO / "slurm" / "local-cluster.sh"


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"CI is set, so the Slurm tests must run, but: {reason}", pytrace=False)
    pytest.skip(reason)


def _cluster_is_up(env: dict[str, str]) -> bool:
    result = subprocess.run(
        ["bash", str(CLUSTER_SCRIPT), "status"], env=env, capture_output=True, text=True, check=False, timeout=60
    )
    return result.returncode == 0


@pytest.fixture(scope="session")
def slurm_cluster() -> Any:
    """A running single-node Slurm with accounting; yields the slurm.conf path."""
    state_dir = Path(os.environ.get("DISTPROBE_SLURM_DIR", "/tmp/distprobe-slurm"))
    conf = state_dir / "etc" / "slurm.conf"
    env = dict(os.environ)
    started_here = False
    if not _cluster_is_up(env):
        if os.geteuid() != 0:
            _skip_or_fail("slurm/local-cluster.sh needs root to install and start Slurm; run the tests as root")
        try:
            result = subprocess.run(
                ["bash", str(CLUSTER_SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=600
            )
        except subprocess.TimeoutExpired:
            _skip_or_fail("slurm/local-cluster.sh start did not finish in 600 s")
        if result.returncode != 0:
            _skip_or_fail(f"slurm/local-cluster.sh start failed:\n{result.stderr[-3000:]}")
        started_here = True
    # The script links /etc/slurm/slurm.conf to its config where it may; SLURM_CONF covers the other case.
    if Path("/etc/slurm/slurm.conf").resolve() != conf.resolve():
        os.environ["SLURM_CONF"] = str(conf)
    yield conf
    if started_here:
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop"], env=env, capture_output=True, timeout=120, check=False)


def sacct_states(job_id: str) -> list[str]:
    """Every record of the job, requeued runs included (-D), oldest first."""
    out = subprocess.run(
        ["sacct", "-n", "-X", "-D", "-P", "-j", job_id, "-o", "State"], capture_output=True, text=True, check=True
    ).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def final_states(job_id: str, timeout: float = 60.0) -> list[str]:
    """The job's sacct records once the last one is final (accounting lags the job by a moment)."""
    deadline = time.monotonic() + timeout
    states = sacct_states(job_id)
    while time.monotonic() < deadline:
        states = sacct_states(job_id)
        if states and states[-1] not in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING"):
            return states
        time.sleep(0.5)
    pytest.fail(f"job {job_id} did not finish in {timeout} s; sacct states: {states}")
