"""The resampled metrics of `distprobe.convex.resampled` and their intervals through `bootstrap_bounds`."""

from __future__ import annotations

import warnings

import pytest
import torch
from tests.convex.test_bootstrap import binomial_two_sided_range
from torchmetrics.functional.classification import multilabel_average_precision, multilabel_f1_score

from distprobe.bank.segmentation import miou_and_accuracy
from distprobe.convex.bootstrap import bootstrap_bounds
from distprobe.convex.resampled import multilabel_f1, multilabel_map, segmentation


def _draws(n: int, resamples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    index = torch.randint(0, n, (resamples, n), generator=torch.Generator().manual_seed(seed))
    counts = torch.zeros(resamples, n, dtype=torch.float64).scatter_add_(1, index, torch.ones(resamples, n).double())
    return index, counts


def _multilabel_problem(n: int = 40, heads: int = 3, classes: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    scores = (torch.rand(n, heads, classes, generator=generator) * 5).round() / 5  # many tied scores
    targets = (torch.rand(n, classes, generator=generator) < 0.25).long()
    targets[:, -1] = 0
    targets[0, -1] = 1  # a rare class: absent from most resamples
    return scores, targets


def test_multilabel_reducers_equal_torchmetrics_on_each_resampled_set():
    scores, targets = _multilabel_problem()
    n, heads, classes = scores.shape
    index, counts = _draws(n, 12, seed=3)
    reduced = {
        "mAP": multilabel_map(scores, targets)(counts),
        "micro": multilabel_f1(scores > 0.5, targets, "micro")(counts),
        "macro": multilabel_f1(scores > 0.5, targets, "macro")(counts),
    }
    missing_rare = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics warns about the resamples without the rare class
        for r in range(index.shape[0]):
            missing_rare += int(targets[index[r], -1].sum() == 0)
            for h in range(heads):
                s, t = scores[index[r], h], targets[index[r]]
                expected = {
                    "mAP": multilabel_average_precision(s, t, classes, average="macro", thresholds=None),
                    "micro": multilabel_f1_score(s, t, classes, average="micro"),
                    "macro": multilabel_f1_score(s, t, classes, average="macro"),
                }
                for name, value in expected.items():
                    assert reduced[name][r, h].item() == pytest.approx(value.item(), abs=1e-6), (name, r, h)
    assert missing_rare > 0  # the rule for a class without positives was exercised


PRIOR, RIGHT = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.9, 0.7, 0.5])


def _segmentation_problem(n: int, pixels: int, generator: torch.Generator, classes: int = 3):
    """Per image ``(n, classes, classes)`` confusion counts (rows: target) of ``pixels`` pixels: target class c with
    probability PRIOR[c], predicted right with probability RIGHT[c], else as one of the other 2 uniformly."""
    target = torch.multinomial(PRIOR.expand(n, -1), pixels, replacement=True, generator=generator)
    shift = torch.randint(1, 3, (n, pixels), generator=generator)
    correct = torch.rand(n, pixels, generator=generator) < RIGHT[target]
    predicted = torch.where(correct, target, (target + shift) % 3)
    cell = torch.nn.functional.one_hot(target * classes + predicted, classes * classes).sum(1)
    return cell.view(n, classes, classes).double()


def _counts(confusion: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One head's per-image intersection ``(n, 1, C)``, predicted ``(n, 1, C)`` and target ``(n, C)`` counts."""
    return confusion.diagonal(dim1=1, dim2=2)[:, None], confusion.sum(1)[:, None], confusion.sum(2)


def _true_miou() -> float:
    inter = PRIOR * RIGHT
    wrong = PRIOR * (1 - RIGHT)
    into = (wrong.sum() - wrong) / 2  # the other classes' errors that land in c
    return float((inter / (PRIOR + into)).mean())


def test_segmentation_reducer_equals_the_confusion_matrix_metrics():
    confusion = _segmentation_problem(30, 40, torch.Generator().manual_seed(5), classes=4)  # class 3 never appears
    index, counts = _draws(30, 6, seed=1)
    reduced = segmentation(*_counts(confusion))(counts)
    for r in range(6):
        miou, accuracy = miou_and_accuracy(confusion[index[r]].sum(0)[None])
        assert reduced[r].tolist() == pytest.approx([miou.item(), accuracy.item()], abs=1e-6)


def test_intervals_are_seeded_and_contain_the_point_estimates():
    scores, targets = _multilabel_problem()
    n = scores.shape[0]
    ones = torch.ones(1, n, dtype=torch.float64)
    for reduce in (
        multilabel_map(scores, targets),
        multilabel_f1(scores > 0.5, targets, "micro"),
        multilabel_f1(scores > 0.5, targets, "macro"),
    ):
        bounds = bootstrap_bounds(n, reduce, resamples=300, seed=11)
        assert torch.equal(bounds, bootstrap_bounds(n, reduce, resamples=300, seed=11))
        assert not torch.equal(bounds, bootstrap_bounds(n, reduce, resamples=300, seed=12))
        value = reduce(ones)[0]
        assert bool(((bounds[0] <= value) & (value <= bounds[1]) & (bounds[0] < bounds[1])).all()), (bounds, value)
    reduce = segmentation(*_counts(_segmentation_problem(50, 40, torch.Generator().manual_seed(2))))
    bounds = bootstrap_bounds(50, reduce, resamples=300, seed=11)
    value = reduce(torch.ones(1, 50, dtype=torch.float64))[0]
    assert torch.equal(bounds, bootstrap_bounds(50, reduce, resamples=300, seed=11))
    assert bool(((bounds[0] <= value) & (value <= bounds[1])).all())


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="n=0, resamples=10"):
        bootstrap_bounds(0, lambda counts: counts, resamples=10)
    with pytest.raises(ValueError, match="average='weighted'"):
        multilabel_f1(torch.ones(2, 1, 3), torch.ones(2, 3), "weighted")


def test_miou_intervals_cover_the_true_miou_about_95_percent_of_the_time():
    generator = torch.Generator().manual_seed(99)
    draws, covered, truth = 200, 0, _true_miou()
    for draw in range(draws):
        reduce = segmentation(*_counts(_segmentation_problem(80, 30, generator)))
        low, high = bootstrap_bounds(80, reduce, resamples=400, seed=draw)[:, 0].tolist()
        covered += low <= truth <= high
    low, high = binomial_two_sided_range(draws, 0.95, alpha=0.001)
    assert low <= covered <= high, (
        f"{covered}/{draws} intervals covered the true mIoU {truth:.4f}; expected {low}..{high}"
    )
