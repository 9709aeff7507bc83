"""The launcher and the templates against a real Slurm (slurm/local-cluster.sh): real sbatch, srun, sacct.

The training is the demo's (`distprobe.demo:train`: SimCLR on digits with a linear and an MLP online probe, DDP on
gloo over the job's 2 tasks). Preemption is sent as Slurm sends it before a timeout: `scancel --signal=USR2 JOB`, which
reaches the tasks of the srun step that submitit starts.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import time
from pathlib import Path

import pytest
from launch_helpers import DEMO, DEMO_ARGS, STEPS, max_probe_difference, wait_for_progress
from tests.helpers.slurm import final_states

from distprobe.cluster import ClusterConfig, submit
from distprobe.cluster.cli import add_submit_arguments, run_submit
from distprobe.cluster.sbatch import render_sbatch

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.distributed]

# Long enough that submitit counts a USR2 as a preemption, not a timeout (it calls a job "timed out" after
# min(80% of the limit, limit - 10 min)).
TIME_MIN = 20


def _restarts(job_id: str) -> int:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, check=True).stdout
    return int(out.split("Restarts=", 1)[1].split()[0])


def test_slurm_two_tasks_get_the_torch_distributed_environment(slurm_cluster, tmp_path):
    config = ClusterConfig(tasks_per_node=2, folder=str(tmp_path / "%j"), time_min=TIME_MIN)
    job = submit("distprobe.cluster.smoke:environment", config)
    results = job.results()
    assert [(r["rank"], r["world_size"], r["local_rank"]) for r in results] == [(0, 2, 0), (1, 2, 1)]
    assert [r["rank_sum"] for r in results] == [1, 1]
    assert final_states(job.job_id) == ["COMPLETED"]


def test_slurm_submit_cli_trains_the_demo_to_completion(slurm_cluster, tmp_path, capsys, reference_weights):
    parser = argparse.ArgumentParser()
    add_submit_arguments(parser)
    args = parser.parse_args(
        [
            "--tasks-per-node=2",
            f"--folder={tmp_path}/%j",
            f"--time-min={TIME_MIN}",
            "--wait",
            DEMO,
            *(f"{name}={value}" for name, value in DEMO_ARGS.items()),
        ]
    )
    assert run_submit(args) == 0
    out = capsys.readouterr().out.splitlines()
    job_id = out[0].split(" job ", 1)[1].split(";", 1)[0]
    results = json.loads(out[-1])
    assert [(r["rank"], r["world_size"], r["global_step"]) for r in results] == [(0, 2, STEPS), (1, 2, STEPS)]
    assert max_probe_difference(results[0]["probe_weights"], reference_weights) <= 1e-6
    # The probe metrics land in the job's folder, next to submitit's logs.
    [metrics] = (tmp_path / job_id).glob("logs/version_*/metrics.csv")
    with metrics.open() as f:
        rows = list(csv.DictReader(f))
    assert {"train/linear_loss", "train/mlp_loss", "eval/linear_top1", "eval/mlp_top1"} <= rows[0].keys()
    assert len([row for row in rows if row["eval/linear_top1"]]) == DEMO_ARGS["epochs"]
    saved = json.loads((tmp_path / job_id / "demo-result.json").read_text())
    assert saved["probe_weights"] == results[0]["probe_weights"]
    assert final_states(job_id) == ["COMPLETED"]


def test_slurm_preemption_of_the_demo_checkpoints_requeues_resumes_and_matches(
    slurm_cluster, tmp_path, reference_weights
):
    start = time.monotonic()
    config = ClusterConfig(tasks_per_node=2, folder=str(tmp_path / "%j"), time_min=TIME_MIN)
    job = submit(DEMO, config, **DEMO_ARGS, step_delay_s=0.2)
    folder = Path(job.paths.folder)
    wait_for_progress(folder, 5, job)
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)
    results = job.results()
    states = final_states(job.job_id)
    wall_s = time.monotonic() - start

    checkpoints = sorted(p.name for p in (folder / "checkpoints").glob("preempt-*.ckpt"))
    assert len(checkpoints) == 1, f"expected one preemption checkpoint, found {checkpoints}"
    step = int(checkpoints[0].split("-")[1].split(".")[0])
    assert 5 < step < STEPS, f"the checkpoint is not mid-run: step {step}"
    assert all(r["resumed_from"] == str(folder / "checkpoints" / checkpoints[0]) for r in results)
    assert states == ["REQUEUED", "COMPLETED"], states
    assert _restarts(job.job_id) == 1
    assert [r["restarts"] for r in results] == [1, 1]
    assert [r["global_step"] for r in results] == [STEPS, STEPS]
    assert max_probe_difference(results[0]["probe_weights"], reference_weights) <= 1e-6
    assert results[0]["probe_weights"] == results[1]["probe_weights"]
    # Both runs logged their probe metrics in the job's folder (the requeued one as a new CSV version).
    assert len(list(folder.glob("logs/version_*/metrics.csv"))) == 2
    job.get_info(mode="force")
    assert job.state == "COMPLETED"
    print(f"\npreemption test: {wall_s:.1f} s from submit to COMPLETED (checkpoint {checkpoints[0]})")


def test_slurm_runs_a_rendered_template_and_refuses_a_hostile_partition(slurm_cluster, tmp_path):
    program = ["-m", "distprobe.cluster.smoke", "environment"]
    hostile = render_sbatch(
        "single-node", ClusterConfig(partition="a;touch pwned", folder=str(tmp_path / "%j")), program
    )
    script = tmp_path / "hostile.sbatch"
    script.write_text(hostile)
    refused = subprocess.run(["sbatch", str(script)], capture_output=True, text=True, cwd=tmp_path, check=False)
    assert refused.returncode != 0
    assert "a;touch pwned" in refused.stderr  # sbatch saw one partition name, the whole string
    assert not (tmp_path / "pwned").exists()

    config = ClusterConfig(tasks_per_node=2, folder=str(tmp_path / "runs" / "%j"), time_min=TIME_MIN)
    script.write_text(render_sbatch("single-node", config, program))
    (tmp_path / "runs").mkdir()
    job_id = subprocess.run(
        ["sbatch", "--parsable", str(script)], capture_output=True, text=True, cwd=tmp_path, check=True
    ).stdout.strip()
    assert final_states(job_id, timeout=120) == ["COMPLETED"]
    lines = (tmp_path / "runs" / f"distprobe-{job_id}.out").read_text().splitlines()
    reports = sorted((json.loads(line) for line in lines if line.startswith("{")), key=lambda r: r["rank"])
    assert [(r["rank"], r["world_size"], r["local_rank"], r["rank_sum"]) for r in reports] == [
        (0, 2, 0, 1),
        (1, 2, 1, 1),
    ]
