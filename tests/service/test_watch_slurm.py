"""`distprobe watch` against a real Slurm (slurm/local-cluster.sh): real sbatch, srun, squeue, sacct, scontrol.

A real training runs in the background and writes a checkpoint every 10 steps, pausing after each, so the watcher
sees them arrive over time. The watcher is the command a user runs, in its own process. The scheduler's faults are
real too: the watcher is killed with SIGKILL around a real ``sbatch`` (by a stand-in ``sbatch`` on ``PATH`` that
calls the real one), ``sbatch`` fails, and a running job is requeued with ``scontrol requeue``. The module shares one
Slurm cluster (a session fixture).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.helpers.slurm import final_states, sacct_states
from tests.service.models import eval_config, pretrain

from distprobe.service.store import ResultsStore

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def _watch(run: Path, config: Path, *options: str, job_name: str = "distprobe-eval") -> list[str]:
    return [
        sys.executable, "-m", "distprobe", "watch", str(run), "--config", str(config),
        "--poll-s", "1", "--time-min", "20", "--job-name", job_name, *options,
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


def test_a_watcher_started_before_its_training_evaluates_each_checkpoint_once_across_a_restart(slurm_cluster, tmp_path):
    run = tmp_path / "run"  # made by the training: the watcher, started first, waits for it to appear
    config = eval_config(tmp_path / "eval.yaml")
    watcher = subprocess.Popen(_watch(run, config), cwd=REPO, stderr=subprocess.PIPE, text=True)
    training = subprocess.Popen(
        [sys.executable, "-m", "tests.service.models", str(run), "20", "10", "3"], cwd=REPO, stdout=subprocess.PIPE
    )
    try:
        # Stop the watcher once it has submitted the first checkpoint's job, while the training still runs.
        _wait_for(lambda: any(r.state != "pending" for r in _records(run)), 120, "the first submission")
        watcher.send_signal(signal.SIGTERM)
        assert watcher.wait(timeout=30) == 0
        assert watcher.stderr is not None and watcher.stderr.read().count("Waiting for the run directory") <= 1
        assert training.wait(timeout=180) == 0
        restarted = subprocess.run(_watch(run, config, "--until-idle"), cwd=REPO, timeout=600, check=False)
        assert restarted.returncode == 0
    finally:
        for process in (watcher, training):
            process.kill()
    records = _records(run)
    assert [(r.step, r.state, r.tries) for r in records] == [(10, "done", 1), (20, "done", 1)]
    job_ids = [r.job_id for r in records]
    assert len(set(job_ids)) == 2
    for job_id in job_ids:  # each job ran once and completed: no duplicate, no failed attempt
        assert final_states(job_id) == ["COMPLETED"]
    store = ResultsStore(run / "distprobe_eval" / "results.sqlite")
    assert {row[0] for row in store.results()} == {r.path for r in records}
    # The results reached the training's own CSV log at each checkpoint's step.
    (csv_log,) = run.rglob("distprobe_eval.csv")
    steps = {line.split(",")[0] for line in csv_log.read_text().splitlines()[1:]}
    assert steps == {"10", "20"}
    table = subprocess.run(
        [sys.executable, "-m", "distprobe", "results", str(run)], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    assert all(f"step={s}.ckpt" in table for s in (10, 20)) and "trend" in table
    assert not any("%j" in p.name for p in (run / "distprobe_eval" / "jobs").iterdir())  # one folder per claim


# What the next sbatch call does is read from $FAULT_DIR/mode: kill the watcher (its parent) before or after the real
# sbatch, fail N more times, or pass. Every call is logged in $FAULT_DIR/calls.
STAND_IN_SBATCH = """#!/bin/bash
mode=$(cat "$FAULT_DIR/mode" 2>/dev/null || echo pass)
echo "$mode" >> "$FAULT_DIR/calls"
case "$mode" in
kill-before)
    echo pass > "$FAULT_DIR/mode"; kill -9 $PPID; exit 1 ;;
kill-after)
    echo pass > "$FAULT_DIR/mode"; "$REAL_SBATCH" "$@" > "$FAULT_DIR/lost"; kill -9 $PPID; exit 1 ;;
fail*)
    left=${mode#fail}
    if [ "$left" -gt 0 ]; then
        echo "fail$((left - 1))" > "$FAULT_DIR/mode"
        echo "sbatch: error: Batch job submission failed: Socket timed out on send/recv operation" >&2
        exit 1
    fi
    echo pass > "$FAULT_DIR/mode"; exec "$REAL_SBATCH" "$@" ;;
*)
    exec "$REAL_SBATCH" "$@" ;;
esac
"""


def _jobs_named(prefix: str) -> dict[str, str]:
    """Every Slurm job (id -> name) whose name starts with ``prefix``: in the queue, or in accounting (which lags)."""
    queue = ["squeue", "-h", "-t", "all", "-o", "%i|%j"]
    accounting = ["sacct", "-n", "-X", "-P", "-S", "now-1days", "-o", "JobID,JobName"]
    out = "".join(subprocess.run(c, capture_output=True, text=True, check=True).stdout for c in (queue, accounting))
    jobs = dict(line.split("|", 1) for line in out.splitlines() if "|" in line)
    return {job: name for job, name in jobs.items() if name.startswith(prefix)}


def _squeue_state(job_id: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout.strip()


def test_kill_9_around_sbatch_a_failing_sbatch_and_a_requeued_job_leave_one_job_per_checkpoint(slurm_cluster, tmp_path):
    run = tmp_path / "run"
    pretrain(str(run), steps=20, every_n_steps=10)
    # Extraction slowed to about 10 s, so that the requeue below lands while the job runs.
    slow = {
        "train": {"_target_": "tests.service.models.labeled", "split": "train", "delay_s": 0.05},
        "val": {"_target_": "tests.service.models.labeled", "split": "val"},
        "batch_size": 8,
    }
    config = eval_config(tmp_path / "eval.yaml", data=slow, results={"logger": "none"})
    name = f"dpfault{os.getpid()}"  # this test's jobs, apart from any other's in accounting
    fault, bin_dir = tmp_path / "fault", tmp_path / "bin"
    fault.mkdir()
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(STAND_IN_SBATCH)
    (bin_dir / "sbatch").chmod(0o755)
    real = shutil.which("sbatch")
    assert real is not None
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAULT_DIR": str(fault), "REAL_SBATCH": real}
    watch = _watch(run, config, "--max-in-flight", "2", job_name=name)

    def watcher(mode: str, *options: str, wait: bool = True) -> subprocess.Popen:
        (fault / "mode").write_text(mode)
        process = subprocess.Popen([*watch, *options], cwd=REPO, env=env, stderr=(fault / f"{mode}.log").open("w"))
        if wait:
            process.wait(timeout=180)
        return process

    # 1. Killed before sbatch: a claim with no job, and no job in Slurm.
    assert watcher("kill-before").returncode == -signal.SIGKILL
    (first, *_) = _records(run)
    assert (first.step, first.state, first.job_id) == (10, "claimed", None) and not _jobs_named(name)
    # 2. Restarted, it releases that claim (its owner is dead, Slurm has no job for it), claims the checkpoint again,
    #    and is killed after the real sbatch answered, before the job id reached the store.
    assert watcher("kill-after").returncode == -signal.SIGKILL
    lost = re.search(r"job (\d+)", (fault / "lost").read_text()).group(1)  # type: ignore[union-attr]
    (first, *_) = _records(run)
    assert (first.state, first.job_id) == ("claimed", None) and list(_jobs_named(name)) == [lost]
    # 3. Restarted again with an sbatch that fails twice: it picks up the lost job by its name, survives both
    #    failures (each poll logs and backs off), submits the second checkpoint, and is killed after the claim update.
    third = watcher("fail2", wait=False)
    try:
        _wait_for(lambda: [bool(r.job_id) for r in _records(run)] == [True, True], 180, "both submissions")
    finally:
        third.kill()
        third.wait()
    first, second = _records(run)
    assert first.job_id == lost and (first.tries, second.tries) == (1, 1)
    assert (fault / "fail2.log").read_text().count("Poll failed (SubmissionError") == 2
    # 4. The second checkpoint's job is requeued by Slurm while it runs (as a preemption does): it keeps its id.
    _wait_for(lambda: _squeue_state(second.job_id) == "RUNNING", 120, "the second job to run")
    subprocess.run(["scontrol", "requeue", second.job_id], check=True)
    # 5. A last watcher waits for both jobs and submits nothing more.
    assert watcher("pass", "--until-idle").returncode == 0
    records = _records(run)
    assert [(r.step, r.state, r.tries) for r in records] == [(10, "done", 1), (20, "done", 1)]
    assert [r.job_id for r in records] == [lost, second.job_id]
    assert sorted(_jobs_named(name)) == sorted([lost, second.job_id])  # two checkpoints, two jobs: no duplicate
    assert (fault / "calls").read_text().split() == ["kill-before", "kill-after", "fail2", "fail1", "fail0"]
    assert final_states(lost) == ["COMPLETED"]
    states = sacct_states(second.job_id)
    assert states[0] == "REQUEUED" and states[-1] == "COMPLETED", states
    store = ResultsStore(run / "distprobe_eval" / "results.sqlite")
    assert {row[0] for row in store.results()} == {r.path for r in records}
