"""Each srun task gets the job's ``cpus_per_task`` on Slurm 22.05 and later.

Since 22.05 srun no longer inherits ``SLURM_CPUS_PER_TASK`` from the job (only ``SRUN_CPUS_PER_TASK``), so the sbatch
templates' and submitit's ``srun`` lines ran every task on one CPU (torchrun's 8 workers and their data loaders
included). The job scripts now export ``SRUN_CPUS_PER_TASK``. The submitit script is caught by a stand-in ``sbatch``
first on PATH (no Slurm controller needed); the templates' line runs in a real bash.
"""

from __future__ import annotations

import os
import stat
import subprocess

import pytest

from distprobe.cluster import ClusterConfig
from distprobe.cluster.sbatch import render_sbatch
from distprobe.cluster.submitit_launcher import submit_job


@pytest.mark.parametrize("template", ["single-node", "multi-node-srun", "multi-node-torchrun", "requeue"])
@pytest.mark.parametrize("cpus", ["6", None])
def test_the_templates_pass_the_jobs_cpus_per_task_to_srun(template, cpus):
    script = render_sbatch(template, ClusterConfig(cpus_per_task=6), ["train.py"])
    (line,) = [line for line in script.splitlines() if "SRUN_CPUS_PER_TASK" in line and not line.startswith("#")]
    assert script.index(line) < script.index("\nsrun ")
    env = {"PATH": os.environ["PATH"], **({"SLURM_CPUS_PER_TASK": cpus} if cpus else {})}
    done = subprocess.run(
        ["bash", "-c", f'set -euo pipefail; {line}\necho "${{SRUN_CPUS_PER_TASK-unset}}"'],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    assert done.stdout.strip() == (cpus or "unset")


@pytest.mark.parametrize(("cpus", "expected"), [(6, "export SRUN_CPUS_PER_TASK=6"), (None, None)])
def test_the_submitit_job_script_exports_it_before_srun(tmp_path, monkeypatch, cpus, expected):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_in = bin_dir / "sbatch"
    stand_in.write_text(f'#!/bin/bash\ncp "$1" {tmp_path}/script.sh\necho "Submitted batch job 4711"\n')
    stand_in.chmod(stand_in.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    config = ClusterConfig(cluster="slurm", cpus_per_task=cpus, folder=str(tmp_path / "%j"))
    job = submit_job("distprobe.cluster.smoke:environment", config, ["echo setup"])
    assert job.job_id == "4711"
    script = (tmp_path / "script.sh").read_text()
    if expected is None:
        assert "SRUN_CPUS_PER_TASK" not in script
    else:
        assert script.index(expected) < script.index("echo setup") < script.index("\nsrun ")
