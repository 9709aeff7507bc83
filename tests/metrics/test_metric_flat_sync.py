"""N ranks with Lightning's padding validation sampler give exactly the single-process metric values, in few syncs."""

from __future__ import annotations

import random

import pytest
import torch
from helpers.dist import run_distributed
from metric_workers import exact_eval_rank, idle_rank_eval, make_case, single_process_values

pytestmark = pytest.mark.distributed


def _random_cases(world: int, count: int) -> list[tuple[int, int, int, int]]:
    rng = random.Random(world)
    # Uneven on purpose: n not a multiple of world (or of the batch size), sometimes fewer samples than ranks.
    cases = [(1000 * world + i, rng.randint(1, 47), rng.randint(1, 9), rng.choice([1, 3])) for i in range(count)]
    cases.append((7, world - 1, 2, 2))  # one rank holds only padding
    return cases


def _assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], context: str) -> None:
    assert set(actual) == set(expected), context
    for key, value in expected.items():
        assert torch.equal(actual[key], value), f"{context} {key}: {actual[key]} != {value}"


@pytest.mark.parametrize("world", [2, 3, 4])
def test_exact_values_and_one_collective_per_reduction(world):
    cases = _random_cases(world, count=6)
    per_rank = run_distributed(exact_eval_rank, world, cases)
    for case_idx, (seed, n, batch_size, num_probes) in enumerate(cases):
        preds, targets = make_case(seed, n)
        expected = single_process_values(preds, targets, num_probes)
        for rank in range(world):
            got = per_rank[rank][case_idx]
            context = f"world={world} n={n} batch={batch_size} probes={num_probes} rank={rank}"
            for p in range(num_probes):
                _assert_same(got["flat"][p], expected[p], context)
                _assert_same(got["torchmetrics"][p], expected[p], context)
            # int64 sums (stat scores + AUROC shapes) in one all-reduce; AUROC's float preds and int targets in one
            # gather each, whatever the number of probes and metrics.
            assert got["counts"] == {"all_reduce": 1, "all_gather": 2}, context
            assert sum(got["torchmetrics_counts"].values()) >= 3 * 4 * num_probes


def test_five_samples_on_two_ranks_is_exact():
    """The padding case of field-facts: true accuracy 0.2, a naive sync reports 0.333."""
    per_rank = run_distributed(_five_samples_rank, 2)
    for rank_values in per_rank:
        assert rank_values["exact"] == pytest.approx(0.2)
        assert rank_values["naive"] == pytest.approx(1 / 3)


def _five_samples_rank(rank: int, world: int) -> dict[str, float]:
    import torch.distributed as dist
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
    from torchmetrics.classification import MulticlassAccuracy

    from distprobe.metrics import ProbeMetrics, compute_synced, valid_in_loader_batch

    preds = torch.nn.functional.one_hot(torch.zeros(5, dtype=torch.long), 5).float()
    targets = torch.arange(5)
    sampler = DistributedSampler(range(5), num_replicas=world, rank=rank, shuffle=False)
    loader = DataLoader(TensorDataset(preds, targets), batch_size=2, sampler=sampler)
    exact = ProbeMetrics({"acc": MulticlassAccuracy(5, average="micro")}, "lin")
    naive = MulticlassAccuracy(5, average="micro")
    for batch_idx, (x, y) in enumerate(loader):
        num_valid = valid_in_loader_batch(loader, batch_idx, len(y))
        exact.val.update(x[:num_valid], y[:num_valid])
        naive.update(x, y)
    values = compute_synced([exact.val], dist.group.WORLD)[0]
    return {"exact": values["eval/lin_acc"].item(), "naive": naive.compute().item()}


@pytest.mark.parametrize("world", [2, 3])
def test_rank_without_any_batch_does_not_hang_or_change_the_value(world):
    seed, n = 11, 13
    per_rank = run_distributed(idle_rank_eval, world, seed, n, timeout=120)
    preds, targets = make_case(seed, n)
    expected = single_process_values(preds, targets, 1)[0]
    for got in per_rank:
        _assert_same(got["values"], expected, f"world={world}")
        assert got["counts"] == {"all_reduce": 1, "all_gather": 2}
