"""`ProbeSet.evaluate(..., positions=)`: a torchrun loop makes its banks and ridge probes choose on the same samples
at any world size, whatever its sampler deals.

Before, `evaluate` took no positions: a bank's and a ridge's selection split followed each rank's running count,
read as if an unshuffled `DistributedSampler` had dealt the samples, so under a shuffled sampler 2 ranks chose and
reported on other samples than one process. Now the loop passes the indices its sampler dealt; without them the
running count stays the rule. Real parts: 2 gloo ranks, a real shuffled `DistributedSampler`.
"""

from __future__ import annotations

import pytest
import torch
from tests.helpers.dist import run_distributed
from tests.helpers.models import RandomPoints
from torch.utils.data import DataLoader, DistributedSampler

from distprobe.loop import ProbeSet
from distprobe.metrics.exact import dealt_order, valid_in_loader_batch

DIM, CLASSES = 8, 3


def _probes() -> ProbeSet:
    bank = {"name": "bank", "input": "x", "target": "y", "num_classes": CLASSES, "lr": (0.01, 0.3, 3.0)}
    bank.update(weight_decay=(0.0, 0.1), in_features=DIM)
    ridge = {"name": "ridge", "input": "x", "target": "y", "num_classes": CLASSES, "l2": (1e-3, 1.0, 30.0, 1e3)}
    return ProbeSet.build([], banks=[bank], ridges=[ridge])


def _evaluate(world_size: int, pass_positions: bool) -> dict[str, float]:
    torch.manual_seed(0)
    probes = _probes()
    train = RandomPoints(64, 0, DIM, CLASSES)
    for i in range(0, 64, 8):  # every rank the same batches: the heads and sums are one process's
        probes.step({"x": train.x[i : i + 8]}, {"y": train.y[i : i + 8]})
    val = RandomPoints(41, 20, DIM, CLASSES)  # odd: rank 1's share ends with a padding repeat
    sampler = DistributedSampler(val, shuffle=True, seed=5) if world_size > 1 else None
    loader = DataLoader(val, batch_size=4, sampler=sampler)
    order = dealt_order(sampler, torch.device("cpu")) if sampler is not None else torch.arange(len(val))
    for batch_idx, batch in enumerate(loader):
        x, y = batch["x"], batch["label"]
        positions = order[batch_idx * 4 : batch_idx * 4 + len(y)] if pass_positions else None
        num_valid = valid_in_loader_batch(loader, batch_idx, len(y))
        probes.evaluate({"x": x}, {"y": y}, num_valid=num_valid, positions=positions)
    return {k: float(v) for k, v in probes.compute_metrics().items() if "best" in k}


def _rank(rank: int, world_size: int) -> dict[str, float]:
    return _evaluate(world_size, pass_positions=True)


@pytest.mark.distributed
def test_two_ranks_with_dealt_positions_choose_as_one_process():
    reference = _evaluate(1, pass_positions=True)
    two = run_distributed(_rank, 2)
    assert two[0] == two[1]
    assert {"eval/bank_best_head", "eval/bank_best_top1", "eval/ridge_best_l2", "eval/ridge_best_top1"} <= set(two[0])
    for key, value in reference.items():
        assert two[0][key] == pytest.approx(value, abs=1e-9), key


def test_without_positions_the_running_count_decides():
    # One process reading the set in order: the running count is each sample's index, as before.
    assert _evaluate(1, pass_positions=False) == _evaluate(1, pass_positions=True)


@pytest.mark.parametrize("positions", [torch.arange(3), torch.zeros(4), [0, 1, 2, 2.5], torch.zeros(4, 1).long()])
def test_bad_positions_are_refused_naming_the_argument(positions):
    probes = _probes()
    probes.step({"x": torch.randn(8, DIM)}, {"y": torch.randint(0, CLASSES, (8,))})
    with pytest.raises(ValueError, match=r"argument 'positions' got .*expected a 1-D integer tensor"):
        probes.evaluate({"x": torch.randn(4, DIM)}, {"y": torch.zeros(4).long()}, positions=positions)
