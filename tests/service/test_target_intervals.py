"""Intervals of multi-label (mAP, F1) and dense (mIoU, pixel accuracy) rows in a real service job's store and in
``distprobe results``: the jobs of tests/service/test_target_kinds.py, run again here with its fixtures."""

from __future__ import annotations

import tests.service.test_target_kinds as target_kinds
import torch

from distprobe import keys
from distprobe.bank.segmentation import HeadConfusion
from distprobe.report.results_table import render
from distprobe.service.store import ResultsStore
from distprobe.service.target_intervals import dense_counts

# The jobs of tests/service/test_target_kinds.py (module-scoped fixtures: run once more for this module).
multilabel_job = target_kinds.multilabel_job
dense_job = target_kinds.dense_job


def _intervals(summary) -> dict[tuple[str, str, str], tuple[float, float | None, float | None]]:
    """Every stored row's value and interval, by (probe, head, metric)."""
    return {
        (row.probe, row.head, row.metric): (row.value, row.low, row.high)
        for *_, row in ResultsStore(summary["store"]).result_rows()
    }


def _check(rows, probe: str, metrics: tuple[str, ...]) -> int:
    checked = 0
    for (p, _head, metric), (value, low, high) in rows.items():
        if p == probe and metric in metrics:
            assert low is not None and high is not None, f"{p} {_head} {metric} has no interval"
            assert low <= value + 1e-6 and value - 1e-6 <= high, f"{p} {_head} {metric}: {value} not in [{low}, {high}]"
            assert high - low > 0
            checked += 1
    return checked


def test_multilabel_rows_have_intervals_around_their_values(multilabel_job):
    _, summary, *_ = multilabel_job
    rows = _intervals(summary)
    metrics = ("mAP", "f1_micro", "f1_macro")
    assert _check(rows, "bank", metrics) == 3 * (3 + 1)  # three heads and the best
    assert _check(rows, "knn", metrics) == 3 * 2  # k=5 and k=20
    value, low, high = rows[("bank", keys.BEST, "mAP")]
    assert f"{value:.4f} [{low:.4f}, {high:.4f}]" in render(ResultsStore(summary["store"]))  # `distprobe results`


def test_dense_rows_have_intervals_around_their_values(dense_job):
    _, summary, *_ = dense_job
    rows = _intervals(summary)
    assert _check(rows, "bank", ("mIoU", "pixel_acc")) == 2 * (2 + 1)
    value, low, high = rows[("bank", keys.BEST, "mIoU")]
    assert f"{value:.4f} [{low:.4f}, {high:.4f}]" in render(ResultsStore(summary["store"]))


def test_per_image_dense_counts_sum_to_the_banks_confusion_matrices():
    generator = torch.Generator().manual_seed(0)
    b, k, c, size = 5, 3, 4, (12, 10)
    logits = torch.randn(b, k, c, 3, 5, generator=generator)
    masks = torch.randint(0, c, (b, *size), generator=generator)
    masks[:, :2] = 255  # ignored pixels count nowhere
    confusion = HeadConfusion(k, c, 255, max_heads=2, max_elements=2 * c * size[0] * size[1])  # several chunks
    confusion.update(logits, masks, torch.ones(b, dtype=torch.bool))
    inter, pred, target = dense_counts(logits, masks, confusion)
    matrix = confusion.confusion.double()
    assert torch.equal(inter.view(b, k, c).sum(0), matrix.diagonal(dim1=1, dim2=2))
    assert torch.equal(pred.view(b, k, c).sum(0), matrix.sum(1))
    assert torch.equal(target.sum(0).expand(k, c), matrix.sum(2))
    assert target.sum().item() == b * 10 * 10
