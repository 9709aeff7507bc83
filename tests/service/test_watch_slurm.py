"""`distprobe watch` against a real Slurm (slurm/local-cluster.sh): real sbatch, srun, sacct and scancel.

A real training runs in the background and writes a checkpoint every 10 steps, pausing after each, so the watcher
sees them arrive over time. The watcher is the command a user runs, in its own process.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.helpers.slurm import final_states
from tests.service.models import eval_config, pretrain

from distprobe.service.job import evaluate_checkpoint
from distprobe.service.store import ResultsStore

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def _watch(run: Path, config: Path, *options: str) -> list[str]:
    return [
        sys.executable, "-m", "distprobe", "watch", str(run), "--config", str(config),
        "--poll-s", "1", "--time-min", "20", "--job-name", "distprobe-eval", *options,
    ]  # fmt: skip


def _wait_for(condition, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.3)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def _records(run: Path):  # type: ignore[no-untyped-def]
    store = run / "distprobe_eval" / "results.sqlite"
    return ResultsStore(store).checkpoints() if store.exists() else []


def test_a_training_writes_three_checkpoints_and_each_is_evaluated_once_across_a_watcher_restart(
    slurm_cluster, tmp_path
):
    run = tmp_path / "run"
    # The run directory exists before either process starts, as a user's would: the watcher refuses a missing one,
    # and the training's imports may take longer than the watcher's.
    run.mkdir()
    config = eval_config(tmp_path / "eval.yaml")
    training = subprocess.Popen(
        [sys.executable, "-m", "tests.service.models", str(run), "30", "10", "3"], cwd=REPO, stdout=subprocess.PIPE
    )
    watcher = subprocess.Popen(_watch(run, config), cwd=REPO)
    try:
        # Stop the watcher once it has submitted the first checkpoint's job, while the training still runs.
        _wait_for(lambda: any(r.state != "pending" for r in _records(run)), 120, "the first submission")
        watcher.send_signal(signal.SIGTERM)
        assert watcher.wait(timeout=30) == 0
        assert training.wait(timeout=180) == 0
        restarted = subprocess.run(_watch(run, config, "--until-idle"), cwd=REPO, timeout=600, check=False)
        assert restarted.returncode == 0
    finally:
        for process in (watcher, training):
            process.kill()
    records = _records(run)
    assert [(r.step, r.state, r.tries) for r in records] == [(10, "done", 1), (20, "done", 1), (30, "done", 1)]
    job_ids = [r.job_id for r in records]
    assert len(set(job_ids)) == 3
    for job_id in job_ids:  # each job ran once and completed: no duplicate, no failed attempt
        assert final_states(job_id) == ["COMPLETED"]
    store = ResultsStore(run / "distprobe_eval" / "results.sqlite")
    assert {row[0] for row in store.results()} == {r.path for r in records}
    # The results reached the training's own CSV log at each checkpoint's step.
    (csv_log,) = run.rglob("distprobe_eval.csv")
    steps = {line.split(",")[0] for line in csv_log.read_text().splitlines()[1:]}
    assert steps == {"10", "20", "30"}
    table = subprocess.run(
        [sys.executable, "-m", "distprobe", "results", str(run)], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    assert all(f"step={s}.ckpt" in table for s in (10, 20, 30)) and "trend" in table


def test_a_job_killed_during_feature_extraction_is_submitted_again_and_gives_the_same_result(slurm_cluster, tmp_path):
    run = tmp_path / "run"
    (checkpoint,) = pretrain(str(run), steps=10, every_n_steps=10)
    # Slow extraction (50 ms per training sample: about 10 s) so that the kill lands inside it.
    slow = {
        "train": {"_target_": "tests.service.models.labeled", "split": "train", "delay_s": 0.05},
        "val": {"_target_": "tests.service.models.labeled", "split": "val"},
        "batch_size": 8,
    }
    config = eval_config(tmp_path / "eval.yaml", data=slow, results={"logger": "none"})
    watcher = subprocess.Popen(_watch(run, config, "--until-idle"), cwd=REPO)
    try:
        cache = run / "distprobe_eval" / "cache"
        _wait_for(lambda: any(cache.glob("*/train.features")), 120, "the feature extraction to start")
        (first,) = _records(run)
        assert first.state == "submitted" and first.tries == 1
        subprocess.run(["scancel", first.job_id], check=True)
        assert watcher.wait(timeout=600) == 0
    finally:
        watcher.kill()
    (record,) = _records(run)
    assert (record.state, record.tries) == ("done", 2)
    assert [s.split()[0] for s in final_states(first.job_id)] == ["CANCELLED"]  # "CANCELLED by <uid>"
    assert final_states(record.job_id) == ["COMPLETED"]
    # The same numbers as an evaluation of the same checkpoint in this process (no delay: the same features).
    reference = evaluate_checkpoint(
        checkpoint, eval_config(tmp_path / "fast.yaml", results={"logger": "none", "store": str(tmp_path / "r.db")})
    )
    store = ResultsStore(run / "distprobe_eval" / "results.sqlite")
    via_slurm = {(p, h, m): v for _, _, p, h, m, v, _ in store.results(record.path)}
    in_process = {(p, h, m): v for _, _, p, h, m, v, _ in ResultsStore(reference["store"]).results(record.path)}
    assert via_slurm == in_process
