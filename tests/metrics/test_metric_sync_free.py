"""Sync-free train-step metrics: same names, same states, same values as torchmetrics (CPU cannot see syncs)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torchmetrics import Accuracy, F1Score, MeanMetric
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassF1Score,
    MulticlassFBetaScore,
    MulticlassPrecision,
    MulticlassRecall,
    MulticlassSpecificity,
    MulticlassStatScores,
)

from distprobe.metrics import SYNC_FREE_EQUIVALENTS, ProbeMetrics, to_sync_free

NUM_CLASSES = 7
CLASSES = [
    MulticlassAccuracy,
    MulticlassPrecision,
    MulticlassRecall,
    MulticlassF1Score,
    MulticlassSpecificity,
    MulticlassStatScores,
]


def _batches(seed: int, labels: bool):
    g = torch.Generator().manual_seed(seed)
    for i in range(5):
        n = int(torch.randint(1, 12, (), generator=g))
        preds = torch.randn(n, NUM_CLASSES, generator=g)
        preds[:, 3] = preds[:, 2]  # ties: top-k must break them as torchmetrics does
        if i == 2:
            preds = preds.half().float()
        targets = torch.randint(0, NUM_CLASSES, (n,), generator=g)
        yield (preds.argmax(1) if labels else preds), targets


@pytest.mark.parametrize(
    ("cls", "average", "top_k"),
    list(itertools.product(CLASSES, ["micro", "macro", "weighted", "none"], [1, 2, 5])),
)
def test_values_and_states_match_torchmetrics(cls, average, top_k):
    reference = cls(num_classes=NUM_CLASSES, average=average, top_k=top_k)
    fast = to_sync_free(cls(num_classes=NUM_CLASSES, average=average, top_k=top_k))
    assert type(fast) is SYNC_FREE_EQUIVALENTS[cls]
    assert isinstance(fast, cls)
    for labels in [False, True] if top_k == 1 else [False]:
        for preds, targets in _batches(seed=top_k, labels=labels):
            step_ref, step_fast = reference(preds, targets), fast(preds, targets)  # forward: per-step values
            assert torch.equal(step_ref, step_fast)
    assert torch.equal(reference.compute(), fast.compute())
    for state in ("tp", "fp", "tn", "fn"):
        assert torch.equal(getattr(reference, state), getattr(fast, state))


def test_fbeta_keeps_its_arguments():
    reference = MulticlassFBetaScore(beta=0.5, num_classes=NUM_CLASSES, average="weighted", zero_division=1)
    fast = to_sync_free(reference)
    assert (fast.beta, fast.zero_division, fast.average) == (0.5, 1, "weighted")
    for preds, targets in _batches(seed=3, labels=False):
        reference.update(preds, targets)
        fast.update(preds, targets)
    assert torch.equal(reference.compute(), fast.compute())
    assert fast is not reference


def test_empty_batch_is_a_no_op():
    """A batch made only of sampler padding leaves nothing to count (torchmetrics' own top-k update rejects it)."""
    fast = to_sync_free(MulticlassAccuracy(num_classes=NUM_CLASSES, top_k=5))
    preds, targets = next(_batches(seed=0, labels=False))
    fast.update(preds[:0], targets[:0])
    fast.update(preds, targets)
    reference = MulticlassAccuracy(num_classes=NUM_CLASSES, top_k=5)
    reference.update(preds, targets)
    assert torch.equal(fast.compute(), reference.compute())


@pytest.mark.parametrize(
    "metric",
    [
        MulticlassAccuracy(num_classes=NUM_CLASSES, ignore_index=0),
        MulticlassAccuracy(num_classes=NUM_CLASSES, multidim_average="samplewise"),
        MulticlassAUROC(num_classes=NUM_CLASSES),
        MeanMetric(),
        type("MyAccuracy", (MulticlassAccuracy,), {})(num_classes=NUM_CLASSES),
    ],
    ids=["ignore_index", "samplewise", "auroc", "mean", "subclass"],
)
def test_unsupported_metrics_are_kept_as_given(metric):
    assert to_sync_free(metric) is metric


def test_unsupported_inputs_fall_back_to_torchmetrics_update():
    """Extra dimensions (N, C, L) are outside the fast path: torchmetrics' own update counts them."""
    fast = to_sync_free(MulticlassAccuracy(num_classes=NUM_CLASSES))
    reference = MulticlassAccuracy(num_classes=NUM_CLASSES)
    preds, targets = torch.randn(4, NUM_CLASSES, 3), torch.randint(0, NUM_CLASSES, (4, 3))
    fast.update(preds, targets)
    reference.update(preds, targets)
    assert torch.equal(fast.compute(), reference.compute())


def test_probe_metrics_convert_transparently_and_keep_names():
    spec = {
        "top1": Accuracy(task="multiclass", num_classes=NUM_CLASSES),
        "top5": MulticlassAccuracy(num_classes=NUM_CLASSES, top_k=5),
        "f1": F1Score(task="multiclass", num_classes=NUM_CLASSES, average="micro"),
        "auroc": MulticlassAUROC(num_classes=NUM_CLASSES),
    }
    metrics = ProbeMetrics(spec, "linear")
    assert sorted(metrics.train.keys()) == sorted(f"train/linear_{k}" for k in spec)
    assert sorted(metrics.val.keys()) == sorted(f"eval/linear_{k}" for k in spec)
    converted = {k.rsplit("_", 1)[1]: type(m).__name__ for k, m in metrics.train.items()}
    assert converted == {
        "top1": "SyncFreeMulticlassAccuracy",
        "top5": "SyncFreeMulticlassAccuracy",
        "f1": "SyncFreeMulticlassF1Score",
        "auroc": "MulticlassAUROC",
    }
    for preds, targets in _batches(seed=9, labels=False):
        values = metrics.train(preds, targets)
        expected = {f"train/linear_{k}": m(preds, targets) for k, m in spec.items()}
        assert values.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(values[key], value), key


def test_checkpoint_state_round_trips_through_plain_torchmetrics_names():
    metrics = ProbeMetrics({"top5": MulticlassAccuracy(num_classes=NUM_CLASSES, top_k=5)}, "linear")
    for preds, targets in _batches(seed=1, labels=False):
        metrics.val.update(preds, targets)
    saved = metrics.metric_states()
    assert set(saved["val.top5"]["state"]) == {"tp", "fp", "tn", "fn"}
    restored = ProbeMetrics({"top5": MulticlassAccuracy(num_classes=NUM_CLASSES, top_k=5)}, "linear")
    restored.load_metric_states(saved)
    assert torch.equal(restored.val.compute()["eval/linear_top5"], metrics.val.compute()["eval/linear_top5"])
