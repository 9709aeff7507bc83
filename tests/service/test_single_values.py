"""The probing service with one head and one ``k``: a config with one ``lr`` and one ``weight_decay``, ``k: 20``,
``k: [20]``, and a ``k`` beyond the training set. Each used to fail every try of every checkpoint (``IndexError`` on
a 0-d tensor); here each job stores its numbers, equal to the dense kNN reference on the cached features.
"""

from __future__ import annotations

import json

import pytest
import torch
from tests.knn.reference import dense_knn, stored
from tests.service.models import CLASSES, eval_config, labeled, pretrain

from distprobe.service.job import evaluate_checkpoint
from distprobe.service.store import ResultsStore

TRAIN_SIZE = 200  # tests.service.models.labeled("train")
HEAD = "features/lr=0.1/wd=0/norm=none"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    (path,) = pretrain(str(out), steps=10, every_n_steps=10)
    return out, path


def _evaluate(run, tmp_path, name, probes):
    out, path = run
    cache = tmp_path / f"cache-{name}"
    config = eval_config(
        tmp_path / f"{name}.yaml",
        probes={"epochs": 2, "batch_size": 20, **probes},
        features={"keep": True, "cache_dir": str(cache)},
        results={"logger": "none", "store": str(tmp_path / f"{name}.sqlite")},
    )
    summary = evaluate_checkpoint(path, config, run_dir=out)
    rows = {
        (probe, head, metric): value
        for _, _, probe, head, metric, value, _ in ResultsStore(summary["store"]).results(path)
    }
    return summary, rows, cache


def _dense_accuracy(cache, k):
    """The kNN's accuracy computed densely over every cached training feature."""
    (folder,) = cache.iterdir()
    splits = {}
    for split in ("train", "val"):
        meta = json.loads((folder / f"{split}.json").read_text())
        splits[split] = torch.from_file(str(folder / f"{split}.features"), size=meta["size"] * meta["dim"]).view(
            meta["size"], meta["dim"]
        )
    train_labels, val_labels = labeled("train").labels, labeled("val").labels
    preds = dense_knn(splits["val"], stored(splits["train"], torch.float32), train_labels, (k,), CLASSES, 0.07)
    return (preds[:, 0] == val_labels).double().mean().item()


def test_one_head_bank_and_one_k_as_an_int(checkpoint, tmp_path):
    summary, rows, cache = _evaluate(
        checkpoint, tmp_path, "one", {"bank": {"lr": [0.1], "weight_decay": [0.0]}, "knn": {"k": 20}}
    )
    assert summary["values"]["best_head"] == HEAD
    assert rows[("bank", HEAD, "selected")] == 1.0
    assert 0.0 <= rows[("bank", HEAD, "top1")] <= 1.0 and 0.0 <= rows[("bank", "best", "top1")] <= 1.0
    assert rows[("knn", "k20", "top1")] == pytest.approx(_dense_accuracy(cache, 20), abs=1e-7)


def test_one_k_as_a_list_and_a_k_beyond_the_training_set(checkpoint, tmp_path):
    _, as_list, cache = _evaluate(checkpoint, tmp_path, "list", {"bank": None, "knn": {"k": [20]}})
    assert as_list == {("knn", "k20", "top1"): pytest.approx(_dense_accuracy(cache, 20), abs=1e-7)}
    # k = 500 > 200 training samples: every sample votes, as k = 200 does.
    _, beyond, cache = _evaluate(checkpoint, tmp_path, "beyond", {"bank": None, "knn": {"k": [500, 200]}})
    assert beyond[("knn", "k500", "top1")] == beyond[("knn", "k200", "top1")]
    assert beyond[("knn", "k500", "top1")] == pytest.approx(_dense_accuracy(cache, TRAIN_SIZE), abs=1e-7)
