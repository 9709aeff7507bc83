"""The convex solvers on 1 and on 2 gloo ranks: ridge statistics summed over ranks, the logreg grid and few-shot
episodes spread over ranks, and `ProbeSet(ridges=...)` (tests/convex/test_ridge_probe_set.py's run). One spawn per
world size serves every check (both runs under the harness, so thread counts, and so float64 rounding, are the
same)."""

import pytest
import torch
from tests.helpers.dist import run_distributed

from distprobe.convex import RidgeStatistics, logreg_grid, run_fewshot
from distprobe.engine.collectives import default_group

from .helpers import gaussian_classes
from .test_ridge_probe_set import check_probe_set_run, probe_set_run

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _everything(rank: int, world_size: int) -> dict:
    x, y, vx, vy = gaussian_classes(160, 60)
    group = default_group()
    stats = RidgeStatistics(6, 3)
    for batch in range(rank, 10, world_size):  # rank r takes every world-th batch of 16
        stats.update(x[batch * 16 : (batch + 1) * 16], y[batch * 16 : (batch + 1) * 16])
    ridge = stats.all_reduce(group).solve([1e-3, 1.0])
    logreg = logreg_grid(x, y, vx, vy, 3, c_grid=[1e-3, 1e-2, 0.1, 1.0, 10.0], chain=2, group=group)
    episodes = run_fewshot(x, y, vx, vy, 3, shots=[1, 3], seeds=2, solver="logreg", reg=0.5, group=group)
    return {
        "ridge": (ridge.weight, ridge.bias, ridge.predict(vx)),
        "logreg": (logreg.holdout_top1, logreg.best_c, logreg.model.weight, logreg.val_correct),
        "fewshot": [(e.id, e.reg, e.val_correct) for e in episodes],
        "probe_set": probe_set_run(rank, world_size),
    }


@pytest.fixture(scope="module")
def one_and_two():
    return run_distributed(_everything, 1), run_distributed(_everything, 2)


def test_probe_set_ridge_is_exact_starts_again_after_an_evaluation_and_resumes(one_and_two):
    for results in one_and_two:
        for result in results:
            check_probe_set_run(result["probe_set"])


def test_two_ranks_equal_one_process(one_and_two):
    (one,), two = one_and_two
    for rank_result in two:
        # Ridge: the summed statistics differ from one process's only in the order of float64 additions.
        for got, want in zip(rank_result["ridge"][:2], one["ridge"][:2], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        assert torch.equal(rank_result["ridge"][2], one["ridge"][2])
        # Logreg and few-shot: whole problems per rank, so the very same bits at any world size.
        holdout, best_c, weight, val_correct = rank_result["logreg"]
        assert torch.equal(holdout, one["logreg"][0]) and best_c == one["logreg"][1]
        assert torch.equal(weight, one["logreg"][2]) and torch.equal(val_correct, one["logreg"][3])
        assert [e[0] for e in rank_result["fewshot"]] == [
            "shots=1/seed=0",
            "shots=1/seed=1",
            "shots=3/seed=0",
            "shots=3/seed=1",
        ]
        for got, want in zip(rank_result["fewshot"], one["fewshot"], strict=True):
            assert got[:2] == want[:2] and torch.equal(got[2], want[2])
