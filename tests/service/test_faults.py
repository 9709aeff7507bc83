"""The probing service under injected faults, with real parts: submitit's local executor (real processes), a real
SQLite store, real tmpfs mounts for full disks, the real command line.

tests/service/test_watch_slurm.py injects the scheduler's faults (kill -9 around sbatch, a failing sbatch, a
requeued job) on the real local Slurm.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from tests.service.models import eval_config, local_watcher, run_dir_with

from distprobe.cli import main
from distprobe.service.checkpoints import CheckpointError, detect, load_backbone_state
from distprobe.service.config import EvalConfig
from distprobe.service.job import evaluate_checkpoint
from distprobe.service.store import ResultsStore
from distprobe.service.watch import WatchConfig

REPO = Path(__file__).resolve().parents[2]


# Polls fast: these tests wait on real local jobs.
_watcher = functools.partial(local_watcher, poll_s=0.2)


@contextlib.contextmanager
def _tmpfs(where: Path, size: str):
    """A real tmpfs of ``size`` at ``where`` (a full disk on demand); skips where mounting is not permitted."""
    where.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _resize(where: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True)


def _values(store: ResultsStore, checkpoint: str) -> dict[tuple[str, str, str], float]:
    return {(p, h, m): v for _, _, p, h, m, v, _ in store.results(checkpoint)}


def test_a_full_cache_disk_is_a_clear_error_the_cache_is_cleaned_and_retry_evaluates_it_again(tmp_path, checkpoints):
    run = run_dir_with(tmp_path, checkpoints[:1])
    with _tmpfs(tmp_path / "cache", "8k") as cache:  # the train split needs 200 x 16 x 4 + 200 x 8 = 14,400 bytes
        config = eval_config(tmp_path / "eval.yaml", features={"cache_dir": str(cache)}, results={"logger": "none"})
        watcher = _watcher(run, config, max_tries=1)
        watcher.run(until_idle=True)
        (record,) = watcher.store.checkpoints()
        assert record.state == "failed" and record.tries == 1
        assert "needs 14400 bytes in " + str(cache) in record.error and "features.cache_dir" in record.error
        assert list(cache.iterdir()) == []  # the failed claim's cache is gone
        # Make room, put it back to pending from the command line, and the same watcher evaluates it.
        _resize(cache, "1m")
        assert main(["retry", str(run), "--failed"]) == 0
        watcher.run(until_idle=True)
        (record,) = watcher.store.checkpoints()
        assert (record.state, record.tries) == ("done", 1)
        assert list(cache.iterdir()) == []  # deleted after success too (features.keep is off)
    jobs = run / "distprobe_eval" / "jobs"
    assert len(list(jobs.iterdir())) == 2 and not any("%j" in p.name for p in jobs.iterdir())


def test_a_locked_a_full_and_a_corrupt_store_are_said_in_one_line_and_the_watcher_goes_on(
    tmp_path, checkpoints, caplog, capsys
):
    run = run_dir_with(tmp_path, checkpoints[:1])
    with _tmpfs(tmp_path / "store", "256k") as folder:
        path = folder / "results.sqlite"
        config = eval_config(tmp_path / "eval.yaml", results={"logger": "none", "store": str(path)})
        watcher = _watcher(run, config, store_timeout_s=0.2)
        assert watcher.store.checkpoints() == []  # creates the file
        results = ["results", str(run), "--store", str(path), "--timeout-s", "0.2"]

        # Locked: another process's writer holds it (a real second SQLite connection, mid-transaction).
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        with caplog.at_level(logging.ERROR, logger="distprobe.service.watch"):
            assert watcher.run(max_polls=2) == 0
        assert caplog.text.count("Poll failed") == 2 and "is locked by another process" in caplog.text
        assert main(results) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "locked" in err and "try again" in err
        holder.execute("ROLLBACK")
        holder.close()

        # Full: the disk the store is on has no room left.
        with contextlib.suppress(OSError), (folder / "filler").open("wb") as filler:
            while True:
                filler.write(b"\0" * 4096)
                filler.flush()
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="distprobe.service.watch"):
            assert watcher.run(max_polls=1) == 0
        assert "disk is full" in caplog.text and str(folder) in caplog.text
        (folder / "filler").unlink()
        assert watcher.discover() == 1  # room again: the next poll records the checkpoint

        # Corrupt: not a database any more.
        path.write_bytes(b"this is not an SQLite database " * 64)
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="distprobe.service.watch"):
            assert watcher.run(max_polls=1) == 0
        assert "is corrupt" in caplog.text
        assert main(results) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "corrupt" in err and f"mv {path} {path}.corrupt" in err


def test_results_json_and_csv_round_trip_by_config_and_retry_puts_checkpoints_back(tmp_path, capsys):
    import csv
    import io
    import json

    from distprobe.service.store import ResultRow

    run = tmp_path / "run"
    run.mkdir()
    store = ResultsStore(run / "distprobe_eval" / "results.sqlite")
    a, b, c = (str(run / f"step={s}.ckpt") for s in (10, 20, 30))
    head = "features/lr=0.1/wd=0/norm=none"
    rows_a = [
        ResultRow("bank", "best", "top1", 0.123456789012345),
        ResultRow("bank", head, "top1", 0.5),
        ResultRow("bank", head, "selected", 1.0),
        ResultRow("knn", "k20", "top1", 0.75),
    ]
    store.record_results(a, 10, "aaaa1111", rows_a)
    store.record_results(a, 10, "bbbb2222", [ResultRow("bank", "best", "top1", 0.25)])
    store.add("aaaa1111", [(b, 20, "failed", "boom"), (c, 30, "pending", None)])

    assert main(["results", str(run), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by_key = {(r["checkpoint"], r["config_hash"]): r for r in rows}
    assert set(by_key) == {(a, "aaaa1111"), (a, "bbbb2222"), (b, "aaaa1111"), (c, "aaaa1111")}
    first = by_key[(a, "aaaa1111")]
    assert (first["step"], first["state"], first["selected"]) == (10, "done", {"bank": head})
    assert first["values"] == {
        "ckpt/bank_best_top1": 0.123456789012345,  # the exact float, not a rounded one
        f"ckpt/bank/{head}_top1": 0.5,
        "ckpt/knn_k20_top1": 0.75,
    }
    assert by_key[(a, "bbbb2222")]["values"] == {"ckpt/bank_best_top1": 0.25}  # configs never mixed
    assert by_key[(b, "aaaa1111")]["state"] == "failed" and by_key[(b, "aaaa1111")]["values"] == {}

    assert main(["results", str(run), "--format", "csv", "--config-hash", "aaaa"]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["checkpoint"], r["config_hash"], r["state"]) for r in table] == [
        (a, "aaaa1111", "done"),
        (b, "aaaa1111", "failed"),
        (c, "aaaa1111", "pending"),
    ]
    assert float(table[0]["ckpt/bank_best_top1"]) == 0.123456789012345 and table[1]["ckpt/bank_best_top1"] == ""

    assert main(["results", str(run)]) == 0
    text = capsys.readouterr().out
    assert "config" in text.splitlines()[0] and "aaaa1111" in text and "bbbb2222" in text
    assert "trend bank_best_top1 (config aaaa1111)" in text and "trend bank_best_top1 (config bbbb2222)" in text

    # retry: failed ones back to pending with no tries; one chosen checkpoint; nothing chosen is an error.
    assert main(["retry", str(run)]) == 2
    assert "--failed" in capsys.readouterr().err
    assert main(["retry", str(run), "--failed"]) == 0
    assert store.checkpoint(b, "aaaa1111").state == "pending"
    assert main(["retry", str(run), "--checkpoint", a, "--config-hash", "bbbb2222"]) == 0
    assert store.checkpoint(a, "bbbb2222").state == "pending" and store.checkpoint(a, "aaaa1111").state == "done"


@pytest.mark.slow
def test_a_second_eval_while_the_first_extracts_refuses_naming_the_job_and_the_store_holds_the_lone_value(
    tmp_path, checkpoints, capsys
):
    run = run_dir_with(tmp_path, checkpoints[1:2])
    (checkpoint,) = (run / "checkpoints").iterdir()
    slow = {
        "train": {"_target_": "tests.service.models.labeled", "split": "train", "delay_s": 0.03},  # ~6 s
        "val": {"_target_": "tests.service.models.labeled", "split": "val"},
        "batch_size": 8,
    }
    config = eval_config(tmp_path / "eval.yaml", data=slow, results={"logger": "none"})
    # --cluster debug: the job runs inside the first eval's process (one interpreter start, not two).
    command = [sys.executable, "-m", "distprobe", "eval", str(checkpoint), "--config", str(config)]
    command += ["--cluster", "debug"]
    first = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        cache = run / "distprobe_eval" / "cache"
        deadline = time.monotonic() + 120
        while not any(cache.glob("*/train.features")) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert any(cache.glob("*/train.features")), "the first evaluation never started extracting"
        # The second eval runs in this process (its imports are done), so it asks while the first still extracts.
        second = main(command[3:])
        assert first.poll() is None, "the first evaluation ended before the second asked"
        second_err = capsys.readouterr().err
        out, err = first.communicate(timeout=300)
    finally:
        first.kill()
    store = ResultsStore(run / "distprobe_eval" / "results.sqlite")
    record = store.checkpoint(str(checkpoint))
    assert second == 3, second_err
    assert "is already being evaluated" in second_err and f"job {record.job_id}" in second_err
    assert first.returncode == 0, err[-3000:]
    assert (record.state, record.tries) == ("done", 1)
    # The numbers are those of a lone evaluation of the same checkpoint (in this process, no delay).
    lone = evaluate_checkpoint(
        checkpoint, eval_config(tmp_path / "lone.yaml", results={"logger": "none", "store": str(tmp_path / "lone.db")})
    )
    reference = _values(ResultsStore(lone["store"]), str(checkpoint))
    stored = _values(store, str(checkpoint))
    assert stored.keys() == reference.keys()
    for key, value in reference.items():
        assert stored[key] == pytest.approx(value, abs=1e-6), key


class _Planted:
    """Unpickling this creates a file: proof that someone unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (str(self.marker), "w"))


def test_nothing_planted_in_the_run_directory_is_unpickled_by_the_watcher_or_the_job(tmp_path, checkpoints):
    import pickle

    run = run_dir_with(tmp_path, checkpoints[:1])
    config = eval_config(tmp_path / "eval.yaml", results={"logger": "none"})
    watcher = _watcher(run, config, max_tries=1)
    watcher.discover()
    (record,) = watcher.store.checkpoints()
    # A claim whose job (a process that has ended) "left" submitit's result pickle, planted by someone else.
    ended = subprocess.Popen(["true"])
    ended.wait()
    job_dir = run / "distprobe_eval" / "jobs" / "planted"
    job_dir.mkdir(parents=True)
    store = watcher.store
    assert store.claim(record.path, record.config_hash, 10, claim="planted", owner="elsewhere:1",
                       job_dir=str(job_dir), job_name="x.planted", allow_final=False) is None  # fmt: skip
    assert store.set_job(record.path, record.config_hash, "planted", str(ended.pid), str(job_dir / "log"))
    marker = tmp_path / "unpickled"
    (job_dir / f"{ended.pid}_0_result.pkl").write_bytes(pickle.dumps(_Planted(marker)))
    (job_dir / "result.json").write_text('{"format": 1, "rows": "__import__(\'os\')"}')  # not a result: refused
    watcher.follow()
    assert not marker.exists()
    (record,) = store.checkpoints()
    assert record.state == "failed" and "not a distprobe result file" in record.error

    # A DCP checkpoint whose .metadata pickle would run code is refused, and runs nothing.
    dcp = run / "checkpoints" / "planted-dcp"
    dcp.mkdir()
    (dcp / ".metadata").write_bytes(pickle.dumps(_Planted(marker)))
    torch.save({"global_step": 7}, dcp / "meta.pt")
    with pytest.raises(CheckpointError, match=r"open is not allowed in a DCP \.metadata"):
        load_backbone_state(detect(dcp))
    assert not marker.exists()


def test_watch_waits_for_its_run_directory_and_commands_check_their_numbers(tmp_path, checkpoints, caplog, capsys):
    run = tmp_path / "later"
    config = eval_config(tmp_path / "eval.yaml", results={"logger": "none"})
    watcher = _watcher(run, config, wait_for_run_dir_s=60)
    threading.Timer(1.0, lambda: (run / "checkpoints").mkdir(parents=True)).start()
    with caplog.at_level(logging.INFO, logger="distprobe.service.watch"):
        assert watcher.run(max_polls=1) == 0
    assert caplog.text.count("Waiting for the run directory") == 1
    # A typo'd path fails after the timeout the user set.
    start = time.monotonic()
    assert main(["watch", str(tmp_path / "typo"), "--config", str(config), "--wait-for-run-dir-s", "0.5"]) == 2
    assert "did not appear in 0.5 s" in capsys.readouterr().err and time.monotonic() - start < 30
    assert not (tmp_path / "typo").exists()
    # Every number option is checked before anything runs.
    for option, value in (("--poll-s", "nan"), ("--poll-s", "-1"), ("--max-in-flight", "0"), ("--every", "1.5"),
                          ("--max-tries", "inf"), ("--wait-for-run-dir-s", "nan"), ("--max-polls", "0")):  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            main(["watch", str(run), "--config", str(config), option, value])
        assert exit_info.value.code == 2 and value in capsys.readouterr().err, option
    with pytest.raises(ValueError, match="poll_s=nan"):
        WatchConfig(run_dir=run, config_path=config, poll_s=float("nan"))
    # eval refuses a run directory that does not exist, and does not create it.
    assert main(["eval", checkpoints[0], "--config", str(config), "--run-dir", str(tmp_path / "typo")]) == 2
    assert "no such directory" in capsys.readouterr().err and not (tmp_path / "typo").exists()


def test_a_truncated_checkpoint_is_logged_once_with_its_path(tmp_path, checkpoints, caplog):
    run = run_dir_with(tmp_path, [])
    data = Path(checkpoints[0]).read_bytes()
    truncated = run / "checkpoints" / "epoch=3-step=40.ckpt"
    truncated.write_bytes(data[: len(data) // 2])
    watcher = _watcher(run, eval_config(tmp_path / "eval.yaml", results={"logger": "none"}), poll_s=0.05)
    with caplog.at_level(logging.WARNING, logger="distprobe.service.watch"):
        watcher.run(max_polls=3)
    assert caplog.text.count(f"{truncated} is not a complete checkpoint") == 1
    assert watcher.store.checkpoints() == []


def _store_reads_of_one_discovery(tmp_path: Path, known: int, new: int) -> int:
    """How many store connections one `discover()` opens with ``known`` checkpoints stored and ``new`` on disk."""
    run = tmp_path / f"run-{known}-{new}"
    folder = run / "checkpoints"
    folder.mkdir(parents=True)
    paths = [folder / f"epoch=0-step={step}.ckpt" for step in range(known + new)]
    whole = tmp_path / "whole.ckpt"
    torch.save({"state_dict": {}}, whole)
    for path in paths[:known]:
        path.touch()  # in the store already: never opened
    for path in paths[known:]:
        shutil.copyfile(whole, path)  # complete checkpoints, so discovery records them (every 2nd: --every 2)
    config = eval_config(tmp_path / f"eval-{known}-{new}.yaml", results={"logger": "none"})
    watcher = _watcher(run, config, every=2)
    watcher.store.add(
        EvalConfig.load(config).fingerprint, [(str(p), s, "done", None) for s, p in enumerate(paths[:known])]
    )
    opened = 0
    connection = watcher.store._connection

    @contextlib.contextmanager
    def counted():
        nonlocal opened
        opened += 1
        with connection() as db:
            yield db

    watcher.store._connection = counted  # type: ignore[method-assign]
    assert watcher.discover() == new
    return opened


def test_discovery_reads_the_store_a_fixed_number_of_times_however_many_checkpoints_are_known_or_new(tmp_path):
    """Discovery is linear: `--every` used to read every row once per new checkpoint (quadratic, 9.5 s for 2,000).

    The time of a poll over 10,000 known checkpoints is a benchmark (benchmarks/service_poll.py; the figure is in
    docs/probing-service.md), not asserted here.
    """
    reads = {
        (known, new): _store_reads_of_one_discovery(tmp_path, known, new) for known, new in [(10, 10), (2000, 500)]
    }
    assert reads[(10, 10)] == reads[(2000, 500)], reads
