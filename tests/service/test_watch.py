"""The watcher with submitit's local executor (real processes): once each, restarts, retention, failures, the lock.

tests/service/test_watch_slurm.py runs the same service against the real local Slurm.
"""

from __future__ import annotations

import functools
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from tests.service.models import eval_config, local_watcher, run_dir_with

from distprobe.cli import main
from distprobe.report.results_table import render
from distprobe.service.store import ResultsStore
from distprobe.service.watch import candidates

# Each test runs submitit local jobs: real processes that import Lightning (31-75 s a test on 2 loaded cores).
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


# Polls fast: these tests wait on real local jobs.
_watcher = functools.partial(local_watcher, poll_s=0.3)


def _states(store: ResultsStore) -> dict[str, tuple[str, int]]:
    return {Path(r.path).name: (r.state, r.tries) for r in store.checkpoints()}


def test_each_checkpoint_is_evaluated_once_and_a_restarted_watcher_submits_no_duplicate(tmp_path, checkpoints):
    run = run_dir_with(tmp_path, checkpoints[:2])
    config = eval_config(tmp_path / "eval.yaml", results={"logger": "none"})
    first = _watcher(run, config, max_in_flight=1)
    first.run(max_polls=1)  # submits one job, then stops (as if killed): the job keeps running
    store = first.store
    submitted = {r.path: r.job_id for r in store.checkpoints(where="state != 'pending'")}
    assert len(submitted) == 1
    second = _watcher(run, config, max_in_flight=2)
    second.run(until_idle=True)
    records = store.checkpoints()
    assert [(r.step, r.state, r.tries) for r in records] == [(10, "done", 1), (20, "done", 1)]
    assert {r.path: r.job_id for r in records if r.path in submitted} == submitted  # picked up, not resubmitted
    assert len({r.job_id for r in records}) == 2
    assert {row[0] for row in store.results()} == {r.path for r in records}
    table = render(store)
    assert "epoch=1-step=20.ckpt" in table and "trend bank_best_top1" in table
    assert not any("%j" in p.name for p in (run / "distprobe_eval" / "jobs").iterdir())
    # A third watcher finds nothing to do.
    third = _watcher(run, config)
    assert third.poll() == (0, 0)


def test_every_k_and_every_steps_skip_checkpoints_and_deleted_ones_are_reported_missing(tmp_path, checkpoints):
    run = run_dir_with(tmp_path, checkpoints)
    config = eval_config(tmp_path / "eval.yaml", results={"logger": "none"})
    every_other = _watcher(run, config, every=2, max_in_flight=1)
    every_other.discover()
    assert _states(every_other.store) == {
        "epoch=0-step=10.ckpt": ("pending", 0),
        "epoch=1-step=20.ckpt": ("skipped", 0),
        "epoch=2-step=30.ckpt": ("pending", 0),
    }
    (run / "checkpoints" / "epoch=2-step=30.ckpt").unlink()  # the training's retention got there first
    every_other.run(until_idle=True)
    assert _states(every_other.store)["epoch=2-step=30.ckpt"] == ("missing", 0)
    assert _states(every_other.store)["epoch=0-step=10.ckpt"] == ("done", 1)
    assert "missing: " in render(every_other.store)

    by_step = tmp_path / "by_step"
    shutil.copytree(run / "checkpoints", by_step / "checkpoints")
    watcher = _watcher(by_step, config, every_steps=20)
    watcher.discover()
    assert {name: state for name, (state, _) in _states(watcher.store).items()} == {
        "epoch=0-step=10.ckpt": "skipped",
        "epoch=1-step=20.ckpt": "pending",
    }


def test_incomplete_and_unreadable_checkpoints_and_failing_jobs(tmp_path, checkpoints):
    run = run_dir_with(tmp_path, checkpoints[:1])
    folder = run / "checkpoints"
    data = Path(checkpoints[1]).read_bytes()
    (folder / "epoch=1-step=20.ckpt").write_bytes(data[: len(data) // 3])  # still being written
    with zipfile.ZipFile(folder / "epoch=5-step=60.ckpt", "w") as archive:  # complete, but no checkpoint in it
        archive.writestr("notes.txt", "hello")
    shutil.copy(checkpoints[1], folder / "last.ckpt")  # overwritten in place by the training: left out
    assert {p.name for p in candidates(run)} == {"epoch=0-step=10.ckpt", "epoch=1-step=20.ckpt", "epoch=5-step=60.ckpt"}
    # A wrong weights prefix makes every job fail: retried, then marked failed with the job's log.
    config = eval_config(tmp_path / "eval.yaml", weights={"prefix": "encoder."}, results={"logger": "none"})
    watcher = _watcher(run, config, max_tries=2)
    watcher.run(until_idle=True)
    records = {Path(r.path).name: r for r in watcher.store.checkpoints()}
    assert set(records) == {"epoch=0-step=10.ckpt", "epoch=5-step=60.ckpt"}  # the partial file is not seen yet
    unreadable = records["epoch=5-step=60.ckpt"]
    assert unreadable.state == "failed" and unreadable.tries == 0 and "epoch=5-step=60.ckpt" in unreadable.error
    failing = records["epoch=0-step=10.ckpt"]
    assert failing.state == "failed" and failing.tries == 2
    assert "encoder." in failing.error and Path(failing.log_path).exists()
    assert watcher.store.results() == []  # no half-written result of any of them
    text = render(watcher.store)
    assert "failed: " in text and failing.log_path in text


def test_one_watcher_per_run_directory_and_sigterm_stops_it_cleanly(tmp_path, checkpoints, capsys):
    run = run_dir_with(tmp_path, checkpoints[:1])
    config = eval_config(tmp_path / "eval.yaml", results={"logger": "none"})
    command = [sys.executable, "-m", "distprobe", "watch", str(run), "--config", str(config), "--cluster", "local"]
    watcher = subprocess.Popen([*command, "--poll-s", "0.5"], cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        store = run / "distprobe_eval" / "results.sqlite"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (store.exists() and ResultsStore(store).checkpoints()):
            time.sleep(0.2)
        assert main(command[3:]) == 2  # the second watcher, the same command, in this process
        assert "another watcher" in capsys.readouterr().err
        watcher.send_signal(signal.SIGTERM)
        assert watcher.wait(timeout=30) == 0
    finally:
        watcher.kill()
    # The job it submitted finishes on its own and publishes its result; the next watcher ingests it.
    later = _watcher(run, config)
    later.run(until_idle=True)
    assert [(r.state, r.tries) for r in later.store.checkpoints()] == [("done", 1)]
