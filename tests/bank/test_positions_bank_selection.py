"""`OnlineProbeBank` chooses its best head on the same validation samples at any world size.

The split that chooses the best head (a hashed share of the validation samples, `distprobe.bank.selection`) is keyed
by each sample's position. Before, the position was the bank's running count of validation samples, read as if an
unshuffled `DistributedSampler` had dealt them, and it ran on from one validation loader into the next: with two
loaders of odd sizes, or a shuffled validation sampler, 2 ranks chose (and reported) on other samples than one
process, and logged another ``eval/bank_best_head`` and ``eval/bank_best_top1``. Now a sample's position is the
index its loader's sampler dealt it, counted per loader (`distprobe.metrics.exact.ValidationPositions`), as for
`OnlineRidge`. Real fits: a real Trainer on 1 process and on 2 gloo ranks, which train the heads bitwise alike.
"""

from __future__ import annotations

import pytest
import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from tests.convex import ridge_positions_scenario
from tests.convex.ridge_positions_scenario import LAYOUTS
from tests.helpers.dist import run_distributed
from torch.utils.data import DataLoader, DistributedSampler

from distprobe.metrics.exact import ValidationPositions, dealt_order

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def one_and_two_ranks():
    fit = ridge_positions_scenario.fit
    return run_distributed(fit, 1, "bank")[0], run_distributed(fit, 2, "bank")


@pytest.mark.distributed
@pytest.mark.parametrize("layout", LAYOUTS)
def test_two_ranks_choose_the_head_of_one_process(one_and_two_ranks, layout):
    one, two = one_and_two_ranks
    assert two[0][layout] == two[1][layout]
    logged, reference = two[0][layout], one[layout]
    assert set(logged) == set(reference)
    assert {"eval/bank_best_head", "eval/bank_best_top1"} <= set(logged)
    # Every head's value over all samples agrees (the heads are the same); the split's choice must agree too.
    assert logged["eval/bank_best_head"] == reference["eval/bank_best_head"]
    for key, value in reference.items():
        assert logged[key] == pytest.approx(value, abs=1e-9), key


def test_positions_follow_the_loader_being_read():
    positions = ValidationPositions()
    shuffled = DistributedSampler(range(9), num_replicas=2, rank=1, shuffle=True, seed=3)
    loaders = [DataLoader(range(9), batch_size=3, sampler=shuffled), DataLoader(range(4), batch_size=2)]
    dealt = list(shuffled)
    assert positions.current(3, None, CPU) is None  # no main batch read: the engine counts (its own data)
    with positions.reading(loaders, 0):
        assert positions.current(3, None, CPU).tolist() == dealt[:3]
    with positions.reading(loaders, 1):  # another loader counts from 0
        assert positions.current(2, None, CPU).tolist() == [0, 1]
    with positions.reading(loaders, 0):
        assert positions.current(2, None, CPU).tolist() == dealt[3:]
    assert positions.current(2, None, CPU) is None


def test_lightning_wrapper_deals_the_wrapped_order():
    # Lightning's wrapper around a user's sampler deals positions in that sampler's order; this layer never imports
    # Lightning, so it finds the wrapper class among the loaded modules.
    wrapper = DistributedSamplerWrapper(list(range(5)), num_replicas=2, rank=1, shuffle=False)
    assert dealt_order(wrapper, CPU).tolist() == [1, 3, 0]

    class OwnOrder(DistributedSampler):
        def __iter__(self):
            return iter(range(len(self.dataset)))

    assert dealt_order(OwnOrder(range(5), num_replicas=2, rank=0), CPU) is None
