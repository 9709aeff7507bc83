"""A kNN with one ``k`` or a ``k`` beyond its queue, a one-head bank and the split ``metrics`` form, in a real fit.

Each used to end the fit at the first validation epoch's end (``IndexError`` on a 0-d tensor, or a KeyError at
construction). One fit per world size holds all of them (tests/callbacks/single_values_scenario.py); 2 ranks run
as real gloo processes with ``distprobe_ddp``.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from tests.callbacks import single_values_scenario as scenario
from tests.helpers.dist import run_distributed

HEAD = f"embedding/lr={scenario.BANK_LR}/wd=0/norm=none"


def _check(result: dict[str, Any]) -> None:
    logged = result["logged"]
    assert result["finished"] and result["epochs"] == scenario.EPOCHS
    # One k, as an int or a list: the same neighbours, the same values, under the same keys.
    for name in ("knn_int", "knn_list"):
        assert 0.0 <= logged[f"eval/{name}_top1"] == logged[f"eval/{name}_k20_top1"] <= 1.0
    assert logged["eval/knn_int_top1"] == logged["eval/knn_list_top1"]
    # k above the queue: every stored sample votes, as k equal to the queue does on the same buffer.
    assert {k for k in logged if k.startswith("eval/knn_big")} == {
        "eval/knn_big_top1",
        "eval/knn_big_k1_top1",
        "eval/knn_big_k64_top1",
    }
    assert logged["eval/knn_big_k64_top1"] == logged["eval/knn_all_k16_top1"]
    # The one-head bank logs its head, its best (the same head) and its train values.
    assert result["head_ids"] == [HEAD] and result["best_head_id"] == HEAD
    assert logged["eval/one_best_head"] == 0.0
    assert 0.0 <= logged[f"eval/one/{HEAD}_top1"] <= 1.0 and 0.0 <= logged["eval/one_best_top1"] <= 1.0
    assert math.isfinite(logged[f"train/one/{HEAD}_loss"]) and math.isfinite(logged["train/one_loss_epoch"])
    assert logged[f"train/one/{HEAD}_loss"] == logged["train/one_loss_epoch"]  # one head: its mean is itself
    # The split form: train's metric in train, val's in eval, each under its class name.
    assert 0.0 <= logged["train/split_MulticlassAccuracy"] <= 1.0
    assert 0.0 <= logged["eval/split_MulticlassAccuracy"] <= 1.0


def test_one_rank_fit_finishes_and_logs_every_single_value():
    _check(scenario.fit(0, 1))


@pytest.mark.distributed
@pytest.mark.slow
def test_two_rank_fit_finishes_and_logs_every_single_value_alike_on_both_ranks():
    results = run_distributed(scenario.fit, 2)
    for result in results:
        _check(result)
    # Every value reduced over the ranks is the same on both (the step losses are each rank's own micro-batch's).
    step_losses = {"train/one_loss", "train/split_loss"}
    reduced = [{k: v for k, v in result["logged"].items() if k not in step_losses} for result in results]
    assert reduced[0] == reduced[1]
