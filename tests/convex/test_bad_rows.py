"""Bad rows in the offline convex probes: a training sample with a non-finite feature or a label out of range is left
out (the result equals the one without it), a validation sample with one is not counted.

Before: one NaN feature in 300 training rows turned `logreg_grid`'s standardiser and weights to NaN and its top-1
from 0.99 to a class's share, silently; a label out of range raised torch's "Target 7 is out of bounds"; a NaN row
drawn into a few-shot episode raised ``linalg.eigh: The algorithm failed to converge``, and NaN validation rows were
scored as answers.
"""

from __future__ import annotations

import pytest
import torch

from distprobe.convex import logreg_grid, run_fewshot

from .helpers import gaussian_classes

GRID = (0.01, 1.0)


@pytest.fixture(scope="module")
def data():
    return gaussian_classes(300, 100, num_classes=3)


def _drop(x: torch.Tensor, y: torch.Tensor, row: int) -> tuple[torch.Tensor, torch.Tensor]:
    keep = torch.arange(x.shape[0]) != row
    return x[keep], y[keep]


@pytest.mark.parametrize("bad", ["nan", "inf", "label"])
def test_logreg_leaves_out_a_bad_training_row(data, bad):
    tx, ty, vx, vy = data
    x, y = tx.clone(), ty.clone()
    if bad == "label":
        y[7] = 3  # num_classes=3
    else:
        x[7, 2] = float(bad)
    clean = logreg_grid(*_drop(tx, ty, 7), vx, vy, 3, c_grid=GRID)
    result = logreg_grid(x, y, vx, vy, 3, c_grid=GRID)
    assert result.val_top1 == clean.val_top1 > 0.8
    assert result.best_c == clean.best_c and torch.equal(result.val_correct, clean.val_correct)
    assert torch.equal(result.model.weight, clean.model.weight)
    assert result.skipped_train == 1


def test_logreg_does_not_count_a_bad_validation_row(data):
    tx, ty, vx, vy = data
    x, y = vx.clone(), vy.clone()
    x[3, 0], y[10] = float("nan"), -1
    result = logreg_grid(tx, ty, x, y, 3, c_grid=GRID)
    keep = torch.ones(100, dtype=torch.bool)
    keep[[3, 10]] = False
    clean = logreg_grid(tx, ty, vx[keep], vy[keep], 3, c_grid=GRID)
    assert result.val_top1 == clean.val_top1
    assert result.val_counted.sum() == 98 and not result.val_correct[[3, 10]].any()
    assert torch.equal(result.counted_correct, clean.val_correct)


def test_logreg_takes_one_value_of_c_and_refuses_a_bad_one_on_every_rank(data):
    tx, ty, vx, vy = data
    assert logreg_grid(tx, ty, vx, vy, 3, c_grid=0.5).c_grid == (0.5,)
    assert logreg_grid(tx, ty, vx, vy, 3, c_grid=torch.tensor(0.5)).best_c == 0.5
    with pytest.raises(ValueError, match=r"c_grid=\(0.0, 1.0\).*finite C values > 0"):
        logreg_grid(tx, ty, vx, vy, 3, c_grid=(0.0, 1.0))  # raised only on the rank whose chain held 0 before


def test_logreg_refuses_a_training_set_with_no_usable_row(data):
    tx, ty, vx, vy = data
    with pytest.raises(ValueError, match=r"every one of the 300 training samples.*num_classes=2 right"):
        logreg_grid(tx, ty + 2, vx, vy, 2, c_grid=GRID)


@pytest.mark.parametrize("solver", ["ridge", "logreg"])
def test_fewshot_never_draws_a_bad_training_row(data, solver):
    tx, ty, vx, vy = data
    row = int(torch.nonzero(ty == 0)[0])
    members = int((ty == 0).sum())
    x = tx.clone()
    x[row, 1] = float("nan")
    shots = [2, members - 1]  # the NaN row was drawn into most of these episodes
    clean = run_fewshot(*_drop(tx, ty, row), vx, vy, 3, shots=shots, seeds=3, solver=solver, reg=0.5)
    episodes = run_fewshot(x, ty, vx, vy, 3, shots=shots, seeds=3, solver=solver, reg=0.5)
    assert [e.id for e in episodes] == [e.id for e in clean]
    for got, want in zip(episodes, clean, strict=True):
        assert torch.equal(got.val_correct, want.val_correct) and got.top1 == want.top1


def test_fewshot_does_not_count_a_bad_validation_row(data):
    tx, ty, vx, vy = data
    x = vx.clone()
    x[5] = float("inf")
    keep = torch.arange(100) != 5
    clean = run_fewshot(tx, ty, vx[keep], vy[keep], 3, shots=[3], seeds=2, solver="ridge", reg=0.1)
    episodes = run_fewshot(tx, ty, x, vy, 3, shots=[3], seeds=2, solver="ridge", reg=0.1)
    for got, want in zip(episodes, clean, strict=True):
        assert got.top1 == want.top1
        assert not got.val_correct[5] and torch.equal(got.counted_correct, want.val_correct)


def test_fewshot_takes_one_shot_count_and_one_number_as_users_write_them(data):
    tx, ty, vx, vy = data
    listed = run_fewshot(tx, ty, vx, vy, 3, shots=[5], seeds=1, solver="ridge", reg=0.1)
    for shots, reg in [(5, 0.1), ([5, 5], 0.1), (5, torch.tensor(0.1, dtype=torch.float64))]:
        got = run_fewshot(tx, ty, vx, vy, 3, shots=shots, seeds=1, solver="ridge", reg=reg)
        assert [e.id for e in got] == ["shots=5/seed=0"]  # a repeated shot count is not solved twice
        assert torch.equal(got[0].val_correct, listed[0].val_correct)
    with pytest.raises(ValueError, match=r"reg=True for solver 'ridge'"):
        run_fewshot(tx, ty, vx, vy, 3, shots=5, seeds=1, solver="ridge", reg=True)


def test_logreg_fits_the_classes_train_holds_as_scikit_learn_does(data):
    """num_classes=6 over labels 0..2: the fit is the 3-class one, bit for bit, and an absent class is never predicted.

    Before, the absent classes were fitted too: their unpenalised biases drifted towards -inf for as many L-BFGS
    iterations as allowed (a 20-class fit of 10 present classes took 3 times as long), and the weights differed from
    the fit over the present classes (by 3e-7 here).
    """
    tx, ty, vx, vy = data
    three = logreg_grid(tx, ty, vx, vy, 3, c_grid=GRID)
    six = logreg_grid(tx, ty, vx, vy, 6, c_grid=GRID)
    assert torch.equal(six.model.weight[:, :3], three.model.weight)
    assert torch.equal(six.model.bias[:3], three.model.bias)
    assert torch.equal(six.holdout_top1, three.holdout_top1) and torch.equal(six.val_correct, three.val_correct)
    assert not six.model.weight[:, 3:].any() and six.model.bias[3:].eq(-torch.inf).all()
