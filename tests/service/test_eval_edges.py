"""The service at a new user's edges: probe names that collide, a result that holds a number twice, a killed eval.

Two probes of one name (a ridge named ``bank``) used to run the whole job, then fail its ingestion with SQLite's
``UNIQUE constraint failed``, again at every ``distprobe results``: the store could no longer be read at all. A
``distprobe eval --cluster debug`` killed with SIGKILL left its claim ``submitted`` for good: every later ``eval`` of
that checkpoint exited 3 ("already being evaluated") naming a job that no longer existed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tests.service.models import eval_config, labeled, run_dir_with

from distprobe.cli import main
from distprobe.service.config import EvalConfig, ServiceConfigError
from distprobe.service.published import RESULT_NAME, PublishedFileError, read_result
from distprobe.service.store import ResultsStore
from distprobe.service.submission import ingest_published

REPO = Path(__file__).resolve().parents[2]


def _config(tmp_path: Path, **probes: object) -> Path:
    return eval_config(tmp_path / "eval.yaml", probes={"epochs": 1, "batch_size": 20, **probes})


@pytest.mark.parametrize(
    ("probes", "words"),
    [
        ({"bank": {"lr": 0.1}, "ridge": {"name": "bank"}}, "probes.ridge.name='bank' is also probes.bank's name"),
        ({"bank": {"name": "knn"}, "knn": {"k": 5}}, "probes.knn.name='knn' is also probes.bank's name"),
        ({"bank": None, "logreg": {}, "fewshot": {"name": "logreg"}}, "probes.fewshot.name='logreg' is also"),
        ({"bank": {"name": ""}}, "probes.bank.name=''; expected a non-empty string without '/'"),
        ({"bank": None, "ridge": {"name": "a/b"}}, "probes.ridge.name='a/b'; expected a non-empty string"),
    ],
)
def test_probe_names_that_collide_or_break_keys_are_refused_at_load(tmp_path, probes, words):
    path = _config(tmp_path, **probes)
    with pytest.raises(ServiceConfigError) as caught:
        EvalConfig.load(path)
    assert str(caught.value).startswith(f"{path}: ") and words in str(caught.value)
    assert "fix:" in str(caught.value)


def test_distinct_names_are_accepted(tmp_path):
    config = EvalConfig.load(_config(tmp_path, bank={"lr": 0.1}, ridge={"name": "ridge2"}, knn={"name": "ridge"}))
    assert config.probes.ridge == {"name": "ridge2"} and config.probes.knn == {"name": "ridge"}


def test_a_result_holding_a_number_twice_is_refused_and_the_store_stays_readable(tmp_path):
    store = ResultsStore(tmp_path / "results.sqlite")
    job_dir = tmp_path / "jobs" / "c1"
    assert store.claim("a.ckpt", "h", 3, claim="c1", owner="elsewhere:1", job_dir=str(job_dir), job_name="x.c1",
                       allow_final=False) is None  # fmt: skip
    assert store.set_job("a.ckpt", "h", "c1", "4711", str(job_dir / "log"))
    job_dir.mkdir(parents=True)
    row = ["bank", "best", "top1", 0.5]
    payload = {"format": 1, "checkpoint": "a.ckpt", "step": 3, "config_hash": "h", "claim": "c1", "rows": [row, row]}
    (job_dir / RESULT_NAME).write_text(json.dumps(payload))
    with pytest.raises(PublishedFileError, match=r"the same \(probe, head, metric\) given twice.*'bank', 'best'"):
        read_result(job_dir)
    assert ingest_published(store) == 0  # raised sqlite3.IntegrityError before, at every `distprobe results`
    assert store.results() == [] and store.checkpoint("a.ckpt", "h").state == "submitted"
    assert main(["results", str(tmp_path), "--store", str(tmp_path / "results.sqlite"), "--format", "json"]) == 0


@pytest.mark.slow
@pytest.mark.distributed
def test_an_eval_after_a_killed_eval_ends_the_dead_claim_and_evaluates(tmp_path, checkpoints, capsys, caplog):
    run = run_dir_with(tmp_path, checkpoints[:1])
    (checkpoint,) = (run / "checkpoints").iterdir()
    slow = {
        "train": {"_target_": "tests.service.models.labeled", "split": "train", "delay_s": 0.03},  # ~6 s
        "val": {"_target_": "tests.service.models.labeled", "split": "val"},
        "batch_size": 8,
    }
    config = eval_config(tmp_path / "eval.yaml", data=slow, results={"logger": "none"})
    command = [sys.executable, "-m", "distprobe", "eval", str(checkpoint), "--config", str(config)]
    command += ["--cluster", "debug"]  # the job runs inside the eval's process: SIGKILL ends both
    first = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        cache = run / "distprobe_eval" / "cache"
        deadline = time.monotonic() + 120
        while not any(cache.glob("*/train.features")) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert any(cache.glob("*/train.features")), "the first evaluation never started extracting"
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    store = ResultsStore(run / "distprobe_eval" / "results.sqlite")
    killed = store.checkpoint(str(checkpoint))
    assert killed.state == "submitted" and killed.job_id.startswith("DEBUG_")
    assert main(command[3:]) == 0, capsys.readouterr().err
    record = store.checkpoint(str(checkpoint))
    assert (record.state, record.tries) == ("done", 2) and record.claim != killed.claim
    assert "ran in its submitter" in caplog.text  # the dead claim's end, in the log
    assert list(cache.iterdir()) == []  # the killed job's cache went with its claim


@pytest.mark.distributed
def test_a_debug_eval_whose_job_fails_exits_1_with_the_error(tmp_path, checkpoints):
    """The in-process job ended inside the submission: its failure is read at once, never waited for."""
    run = run_dir_with(tmp_path, checkpoints[:1])
    (checkpoint,) = (run / "checkpoints").iterdir()
    config = eval_config(tmp_path / "eval.yaml", backbone={"_target_": "tests.service.models.no_such_factory"})
    command = [sys.executable, "-m", "distprobe", "eval", str(checkpoint), "--config", str(config)]
    # stdin closed: submitit's debug executor opens pdb on the failure, which then reads end-of-file and goes on.
    done = subprocess.run(
        [*command, "--cluster", "debug"],
        cwd=REPO,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert "backbone could not be built" in done.stderr.splitlines()[-1]
    assert ResultsStore(run / "distprobe_eval" / "results.sqlite").checkpoint(str(checkpoint)).state == "failed"


@pytest.mark.parametrize(("resamples", "level", "needed"), [(1, 0.95, 40), (39, 0.95, 40), (19, 0.9, 20)])
def test_too_few_resamples_for_the_level_are_refused(tmp_path, resamples, level, needed):
    """``resamples: 1`` used to give every number a "95%" interval made of one resample and the number itself."""
    path = _config(tmp_path, intervals={"resamples": resamples, "level": level})
    with pytest.raises(ServiceConfigError) as caught:
        EvalConfig.load(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: probes.intervals.resamples={resamples}; ")
    assert f"needs at least {needed} resamples" in message and "or 0 for no intervals" in message
    EvalConfig.load(_config(tmp_path, intervals={"resamples": needed, "level": level}))
    EvalConfig.load(_config(tmp_path, intervals={"resamples": 0, "level": level}))


def test_a_value_or_list_field_says_what_it_takes_once(tmp_path):
    """``fewshot.reg`` (``float | list[float]``) used to say "expected a number or a number or a list of them"."""
    path = _config(tmp_path, bank=None, fewshot={"reg": "x"})
    with pytest.raises(ServiceConfigError, match=r"probes\.fewshot\.reg='x'; expected a number or a list of them$"):
        EvalConfig.load(path)


def test_retry_takes_the_config_hash_as_the_table_shows_it(tmp_path, capsys):
    """The table shows a config's first 8 characters; ``retry --config-hash`` used to match the whole hash only, so
    the hash copied from the table retried nothing ("0 checkpoint(s) pending", or "not in the store")."""
    store = ResultsStore(tmp_path / "distprobe_eval" / "results.sqlite")
    checkpoint = str((tmp_path / "a.ckpt").resolve())
    for config_hash in ("d9c98461a84564de", "0123456789abcdef"):
        store.record_results(checkpoint, 10, config_hash, [])
    assert main(["results", str(tmp_path)]) == 0
    assert "d9c98461" in capsys.readouterr().out
    assert main(["retry", str(tmp_path), "--checkpoint", checkpoint, "--config-hash", "d9c98461"]) == 0
    assert "pending again" in capsys.readouterr().out
    assert store.checkpoint(checkpoint, "d9c98461a84564de").state == "pending"
    assert store.checkpoint(checkpoint, "0123456789abcdef").state == "done"
    assert main(["retry", str(tmp_path), "--failed", "--config-hash", "ffff"]) == 2
    assert "--config-hash 'ffff' matches 0 of the store's configs" in capsys.readouterr().err


def test_a_one_sample_validation_set_publishes_every_defined_number(tmp_path, checkpoints, caplog):
    """With one validation sample the best heads' report split is empty and their top-1 is NaN. The job published
    it, the reader refused the whole file ("not a distprobe result file") and every other number was lost."""
    from distprobe.service.job import evaluate_checkpoint

    run = run_dir_with(tmp_path, checkpoints[:1])
    (checkpoint,) = (run / "checkpoints").iterdir()
    data = {
        "train": {"_target_": "tests.service.models.labeled", "split": "train"},
        "val": {"_target_": "tests.service.models.labeled", "split": "val", "n": 1},
    }
    probes = {"epochs": 1, "batch_size": 20, "bank": {"lr": 0.1}, "ridge": {"l2": 0.01}, "knn": {"k": 5}}
    config = eval_config(tmp_path / "eval.yaml", data=data, probes=probes, results={"logger": "none"})
    job_dir = tmp_path / "job"
    evaluate_checkpoint(checkpoint, config, run_dir=run, job_dir=job_dir, claim="c1")
    result = read_result(job_dir)
    got = {(r.probe, r.head, r.metric) for r in result.rows}
    assert ("bank", "features/lr=0.1/wd=0/norm=none", "top1") in got and ("knn", "k5", "top1") in got
    assert ("ridge", "l2=0.01", "top1") in got and ("ridge", "best", "l2") in got
    assert ("bank", "best", "top1") not in got and ("ridge", "best", "top1") not in got
    assert "bank/best/top1=nan" in caplog.text and "data.val has 1 sample(s)" in caplog.text


def without_class(split: str, absent: int) -> torch.utils.data.Subset:
    """The labeled split without one class (a config's factory: ``tests.service.test_eval_edges.without_class``)."""
    points = labeled(split)
    return torch.utils.data.Subset(points, [i for i, y in enumerate(points.labels.tolist()) if y != absent])


def test_fewshot_with_a_class_missing_from_train_fails_before_any_probe_trains(tmp_path, checkpoints, monkeypatch):
    """Episodes run last: a class with too few training samples used to fail the job after every other probe."""
    import distprobe.service.job as job

    def no_training(*args, **kwargs):
        raise AssertionError("a probe trained before the few-shot shots were checked")

    monkeypatch.setattr(job, "run_probes", no_training)
    run = run_dir_with(tmp_path, checkpoints[:1])
    (checkpoint,) = (run / "checkpoints").iterdir()
    data = {
        "train": {"_target_": "tests.service.test_eval_edges.without_class", "split": "train", "absent": 3},
        "val": {"_target_": "tests.service.models.labeled", "split": "val"},
    }
    probes = {"epochs": 1, "batch_size": 20, "bank": {"lr": 0.1}, "fewshot": {"shots": [1, 5]}}
    config = eval_config(tmp_path / "eval.yaml", data=data, probes=probes, results={"logger": "none"})
    with pytest.raises(ServiceConfigError) as caught:
        job.evaluate_checkpoint(checkpoint, config, run_dir=run)
    message = str(caught.value)
    assert message.startswith(f"{config}: probes.fewshot.shots=[1, 5]: class 3 has 0 sample(s) in data.train")
    assert "(1 of num_classes=4 classes have fewer than 5)" in message and "remove probes.fewshot" in message


def test_no_store_says_where_it_looked_and_how_to_point_elsewhere(tmp_path, capsys):
    for command in (["results", str(tmp_path)], ["retry", str(tmp_path), "--failed"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert f"no results store at {tmp_path / 'distprobe_eval' / 'results.sqlite'}" in err and "--store" in err
