"""`distprobe eval` on real Lightning checkpoints: in this process, and as a 2-task submitit job on gloo.

The training is a real Lightning fit (tests/service/models.py) that writes checkpoints; the evaluation reads them
back the way a user's run would, with the config file a user would write.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.knn.reference import dense_knn, stored
from tests.service.models import eval_config, labeled
from tests.service.test_convex_service import convex_probes

from distprobe.service.checkpoints import CheckpointError
from distprobe.service.config import EvalConfig
from distprobe.service.job import evaluate_checkpoint
from distprobe.service.store import ResultsStore
from distprobe.service.training_log import CSV_NAME, find_log_dir

REPO = Path(__file__).resolve().parents[2]
HEADS = 3 * 2  # the test config's lr x weight-decay grid


@pytest.fixture(scope="module")
def run(trained_run):
    """A training run directory with checkpoints at steps 10, 20 and 30 (the session's)."""
    return trained_run


def _rows(store: ResultsStore, checkpoint: str) -> dict[tuple[str, str, str], float]:
    return {(probe, head, metric): value for _, _, probe, head, metric, value, _ in store.results(checkpoint)}


def test_in_process_eval_stores_every_number_once_and_the_knn_equals_a_dense_reference(run, tmp_path):
    out, checkpoints = run
    config = eval_config(tmp_path / "eval.yaml", features={"keep": True, "cache_dir": str(tmp_path / "cache")})
    summary = evaluate_checkpoint(checkpoints[0], config, run_dir=out)
    store = ResultsStore(summary["store"])
    rows = _rows(store, checkpoints[0])
    assert summary["step"] == 10
    assert summary["rows"] == len(rows) == HEADS + 1 + 1 + 2  # each head, the best, the selected head, 2 k's
    assert store.checkpoint(checkpoints[0]).state == "done"

    # The cached features are the backbone's, from the checkpoint's weights, each sample once.
    state = torch.load(checkpoints[0], map_location="cpu", weights_only=True)["state_dict"]
    from tests.service.models import encoder

    backbone = encoder()
    backbone.load_state_dict({k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")})
    (cache,) = (tmp_path / "cache").iterdir()
    with torch.no_grad():
        for split in ("train", "val"):
            data = labeled(split)
            meta = json.loads((cache / f"{split}.json").read_text())
            features = torch.from_file(str(cache / f"{split}.features"), size=meta["size"] * meta["dim"])
            labels = torch.from_file(str(cache / f"{split}.labels"), size=meta["size"], dtype=torch.int64)
            torch.testing.assert_close(features.view(meta["size"], meta["dim"]), backbone(data.points))
            assert torch.equal(labels, data.labels)

    # The kNN's accuracies are those of a dense kNN over the whole training set (same cached features).
    train = torch.from_file(str(cache / "train.features"), size=200 * 16).view(200, 16)
    val = torch.from_file(str(cache / "val.features"), size=75 * 16).view(75, 16)
    preds = dense_knn(val, stored(train, torch.float32), labeled("train").labels, (5, 20), 4, 0.1)
    for column, k in enumerate((5, 20)):
        expected = (preds[:, column] == labeled("val").labels).double().mean().item()
        assert rows[("knn", f"k{k}", "top1")] == pytest.approx(expected, abs=1e-7)

    # The selected head is one of the grid; its accuracy on the report split lies in [0, 1].
    (selected,) = [head for (_, head, metric) in rows if metric == "selected"]
    assert selected.startswith("features/lr=")
    assert 0.0 <= rows[("bank", "best", "top1")] <= 1.0

    # Run again: the same numbers replace the old rows (exactly once in the store), never add to them.
    again = evaluate_checkpoint(checkpoints[0], config, run_dir=out)
    assert _rows(store, checkpoints[0]) == rows and again["rows"] == summary["rows"]


def test_results_reach_the_trainings_own_log_at_the_checkpoints_step(run, tmp_path):
    out, checkpoints = run
    config = eval_config(tmp_path / "eval.yaml", results={"store": str(tmp_path / "store.sqlite")})
    evaluate_checkpoint(checkpoints[1], config, run_dir=out)
    kind, directory = find_log_dir(out)
    if kind == "tensorboard":  # Lightning picked TensorBoardLogger: tensorboard or tensorboardX is installed
        assert list(directory.glob("events.out.tfevents.*.distprobe"))
        return
    with (directory / CSV_NAME).open() as handle:
        logged = {row["key"]: row for row in csv.DictReader(handle)}
    assert (directory / "metrics.csv").exists()  # Lightning's own file, left alone
    assert logged["ckpt/bank_best_top1"]["step"] == "20"
    assert logged["ckpt/knn_k20_top1"]["checkpoint"] == checkpoints[1]
    assert any(key.startswith("ckpt/bank/features/lr=") for key in logged)


def test_a_truncated_checkpoint_is_an_error_naming_it_and_writes_no_row(run, tmp_path):
    out, checkpoints = run
    broken = tmp_path / "checkpoints" / "epoch=9-step=90.ckpt"
    broken.parent.mkdir()
    data = Path(checkpoints[0]).read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    config = eval_config(tmp_path / "eval.yaml")
    with pytest.raises(CheckpointError) as err:
        evaluate_checkpoint(broken, config)
    assert str(broken) in str(err.value)
    store = tmp_path / "distprobe_eval" / "results.sqlite"
    assert not store.exists() or ResultsStore(store).results(str(broken)) == []


@pytest.mark.distributed
def test_cli_eval_as_a_two_task_local_job_equals_one_process(run, tmp_path):
    out, checkpoints = run
    one = tmp_path / "one"
    two = tmp_path / "two"
    for where in (one, two):
        where.mkdir()
        shutil.copy(checkpoints[1], where / "last-epoch.ckpt")
    # The convex probes too: ridge's statistics, logreg's C grid and the few-shot episodes are spread over the ranks.
    config = eval_config(tmp_path / "eval.yaml", results={"logger": "none"}, probes=convex_probes())
    in_process = evaluate_checkpoint(one / "last-epoch.ckpt", config)
    command = [
        sys.executable,
        "-m",
        "distprobe",
        "eval",
        str(two / "last-epoch.ckpt"),
        "--config",
        str(config),
        "--cluster",
        "local",
        "--tasks-per-node",
        "2",
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step" in result.stdout and "last-epoch.ckpt" in result.stdout  # the summary and the table
    local = ResultsStore(two / "distprobe_eval" / "results.sqlite")
    reference = ResultsStore(in_process["store"])
    two_ranks = _rows(local, str(two / "last-epoch.ckpt"))
    one_rank = _rows(reference, str(one / "last-epoch.ckpt"))
    assert two_ranks.keys() == one_rank.keys()
    for key, value in one_rank.items():
        # The same global batches on 1 and 2 ranks: the heads differ by the all-reduce's rounding only.
        assert two_ranks[key] == pytest.approx(value, abs=1e-6), key
    assert EvalConfig.load(config).fingerprint == local.results()[0][-1]
    # The bootstrap intervals come from per-sample results gathered over the ranks: the same ones.
    intervals = {
        name: {(r.probe, r.head, r.metric): (r.low, r.high) for *_, r in store.result_rows()}
        for name, store in (("one", reference), ("two", local))
    }
    assert intervals["one"] == intervals["two"]
    assert sum(low is not None for low, _ in intervals["one"].values()) >= 10


def test_a_checkpoint_holding_objects_needs_them_named_in_weights_safe_globals(run, tmp_path):
    import argparse

    out, checkpoints = run
    checkpoint = torch.load(checkpoints[0], map_location="cpu", weights_only=False)
    checkpoint["hyper_parameters"] = {"args": argparse.Namespace(lr=0.1)}  # what save_hyperparameters(args) writes
    with_objects = tmp_path / "checkpoints" / "epoch=0-step=10.ckpt"
    with_objects.parent.mkdir()
    torch.save(checkpoint, with_objects)
    with pytest.raises(CheckpointError, match=r"argparse.Namespace.*weights.safe_globals"):
        evaluate_checkpoint(with_objects, eval_config(tmp_path / "strict.yaml"))
    allowed = eval_config(
        tmp_path / "allowed.yaml", weights={"prefix": "backbone.", "safe_globals": ["argparse.Namespace"]}
    )
    assert evaluate_checkpoint(with_objects, allowed)["step"] == 10
