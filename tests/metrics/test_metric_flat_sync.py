"""N ranks with Lightning's padding validation sampler give exactly the single-process metric values, in few syncs.

Each world size is spawned once (module cache) and its checks are read by several tests.
"""

from __future__ import annotations

import functools
import random
from typing import Any

import pytest
import torch
from metric_workers import all_checks_rank, make_case, single_process_values

from helpers.dist import run_distributed

pytestmark = pytest.mark.distributed

IDLE_CASE = (11, 13)  # seed, number of samples


def _random_cases(world: int, count: int) -> list[tuple[int, int, int, int]]:
    rng = random.Random(world)
    # Uneven on purpose: n not a multiple of world (or of the batch size); 1 or 3 probes of 4 metrics each.
    cases = [(1000 * world + i, rng.randint(1, 47), rng.randint(1, 9), rng.choice([1, 3])) for i in range(count)]
    cases.append((7, world - 1, 2, 2))  # fewer samples than ranks: the last rank holds only padding
    return cases


@functools.cache
def _run(world: int) -> tuple[list[tuple[int, int, int, int]], list[dict[str, Any]]]:
    cases = _random_cases(world, count=6)
    return cases, run_distributed(all_checks_rank, world, cases, IDLE_CASE, timeout=180)


def _assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], context: str) -> None:
    assert set(actual) == set(expected), context
    for key, value in expected.items():
        assert torch.equal(actual[key], value), f"{context} {key}: {actual[key]} != {value}"


@pytest.mark.parametrize("world", [2, 3, 4])
def test_uneven_cases_give_the_single_process_values(world):
    """Top-1, top-5, F1 and AUROC, exactly equal (torch.equal), for the flat sync and for torchmetrics' own."""
    cases, per_rank = _run(world)
    for case_idx, (seed, n, batch_size, num_probes) in enumerate(cases):
        preds, targets = make_case(seed, n)
        expected = single_process_values(preds, targets, num_probes)
        for rank in range(world):
            got = per_rank[rank]["cases"][case_idx]
            context = f"world={world} n={n} batch={batch_size} probes={num_probes} rank={rank}"
            for p in range(num_probes):
                _assert_same(got["flat"][p], expected[p], context)
                _assert_same(got["torchmetrics"][p], expected[p], context)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_one_collective_per_reduction_type_whatever_the_number_of_probes(world):
    cases, per_rank = _run(world)
    for case_idx, (_, _, _, num_probes) in enumerate(cases):
        for rank in range(world):
            got = per_rank[rank]["cases"][case_idx]
            # The int64 sums (stat scores, plus AUROC's shapes) in one all-reduce; AUROC's float preds and int
            # targets in one gather each; 1 probe or 3 alike.
            assert got["counts"] == {"all_reduce": 1, "all_gather": 2}
            # torchmetrics: barrier + size gather + data gather per state (4 per stat-score metric, 2 for AUROC).
            assert got["torchmetrics_counts"]["barrier"] == (3 * 4 + 2) * num_probes


def test_five_samples_on_two_ranks_is_exact():
    """The padding case of field-facts: true accuracy 0.2, where the naive sync reports 0.333."""
    _, per_rank = _run(2)
    for got in per_rank:
        assert got["five"]["exact"] == pytest.approx(0.2)
        assert got["five"]["naive"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("world", [2, 3])
def test_rank_without_any_batch_does_not_hang_or_change_the_value(world):
    _, per_rank = _run(world)
    preds, targets = make_case(*IDLE_CASE)
    expected = single_process_values(preds, targets, 1)[0]
    for got in per_rank:
        _assert_same(got["idle"]["values"], expected, f"world={world}")
        assert got["idle"]["counts"] == {"all_reduce": 1, "all_gather": 2}


def test_other_dtypes_and_reductions():
    """float32 sums get their own all-reduce; a metric with dist_reduce_fx=None keeps torchmetrics' own sync."""
    _, per_rank = _run(2)
    for got in per_rank:
        fallback = got["fallback"]
        assert fallback["values"]["mean"].item() == pytest.approx(7.0)  # mean of 0..4 and 10..14
        assert fallback["values"]["best"].item() == 14.0
        # 2 flat all-reduces (int64, float32), then torchmetrics: barrier + gather for the one scalar state.
        assert fallback["counts"] == {"all_reduce": 2, "barrier": 1, "all_gather": 1}
