"""On CUDA, the converted metrics' train-step path never synchronises the host (torchmetrics' own update does)."""

from __future__ import annotations

import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassPrecision, MulticlassRecall

from distprobe.metrics import ProbeMetrics

pytestmark = pytest.mark.gpu

NUM_CLASSES = 1000


def _spec() -> dict[str, object]:
    return {
        "top1": MulticlassAccuracy(NUM_CLASSES),
        "top5": MulticlassAccuracy(NUM_CLASSES, top_k=5, average="micro"),
        "f1": MulticlassF1Score(NUM_CLASSES, average="macro"),
        "f1_micro": MulticlassF1Score(NUM_CLASSES, average="micro"),
        "precision": MulticlassPrecision(NUM_CLASSES),
        "recall": MulticlassRecall(NUM_CLASSES),
    }


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(128, NUM_CLASSES, device="cuda"), torch.randint(0, NUM_CLASSES, (128,), device="cuda")


def test_torchmetrics_update_syncs():
    """The baseline this module exists for: if this stops raising, torchmetrics became sync-free by itself."""
    metric = MulticlassAccuracy(NUM_CLASSES).cuda()
    preds, targets = _batch()
    metric.update(preds, targets)  # warm-up: lazy CUDA initialisation may sync once
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            metric.update(preds, targets)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("stage", ["train", "val"])
def test_converted_update_does_not_sync(stage):
    metrics = ProbeMetrics(_spec(), "linear").to("cuda")
    collection = metrics[stage]
    preds, targets = _batch()
    collection.update(preds, targets)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            collection.update(preds, targets)
            collection.update(preds[:0], targets[:0])  # a batch of sampler padding only
    finally:
        torch.cuda.set_sync_debug_mode("default")
    reference = {k: m.cuda() for k, m in _spec().items()}
    for key, metric in reference.items():
        for _ in range(4):
            metric.update(preds, targets)
        assert torch.equal(collection[f"{stage}/linear_{key}".replace("val/", "eval/")].compute(), metric.compute())


def test_converted_forward_does_not_sync():
    """The train step logs per-step values through the collection's forward (update + compute of the batch)."""
    collection = ProbeMetrics(_spec(), "linear").to("cuda").train
    preds, targets = _batch()
    collection(preds, targets)
    torch.cuda.set_sync_debug_mode("error")
    try:
        values = collection(preds, targets)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert set(values) == {f"train/linear_{k}" for k in _spec()}
