"""`OnlineRidge` chooses its best lambda on the same validation samples at any world size.

The split that chooses the best lambda (a hashed share of the validation samples, `distprobe.bank.selection`) is
keyed by each sample's position. Before, the position was the rank's running count of validation samples read as
if an unshuffled `DistributedSampler` had dealt them, and it ran on from one validation loader into the next: with
two loaders of odd sizes, or a shuffled validation sampler, 2 ranks chose (and reported) on other samples than one
process, and logged another ``eval/ridge_best_top1``. Now a sample's position is the index its loader's sampler
dealt it, counted per loader (docs/convex.md). Real fits: a real Trainer on 1 process and on 2 gloo ranks.
"""

from __future__ import annotations

import pytest
import torch
from tests.convex import ridge_positions_scenario
from tests.convex.ridge_positions_scenario import LAYOUTS
from tests.helpers.dist import run_distributed
from torch.utils.data import DistributedSampler

from distprobe.metrics.exact import ValidationPositions, dealt_order

pytestmark = [pytest.mark.distributed]


@pytest.fixture(scope="module")
def one_and_two_ranks():
    return run_distributed(ridge_positions_scenario.fit, 1)[0], run_distributed(ridge_positions_scenario.fit, 2)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_two_ranks_choose_and_report_on_one_process_samples(one_and_two_ranks, layout):
    one, two = one_and_two_ranks
    assert two[0][layout] == two[1][layout]
    logged, reference = two[0][layout], one[layout]
    assert set(logged) == set(reference) and "eval/ridge_best_top1" in logged
    for key, value in reference.items():
        assert logged[key] == pytest.approx(value, abs=1e-9), key


def test_positions_are_the_dealt_indices_per_loader():
    positions = ValidationPositions()
    cpu = torch.device("cpu")
    shuffled = DistributedSampler(range(9), num_replicas=2, rank=1, shuffle=True, seed=3)
    dealt = list(shuffled)  # the order the loader reads: 5 positions, the last a padding repeat

    class Loader:
        sampler = shuffled

    assert positions.of_batch(Loader, 0, 3, None, cpu).tolist() == dealt[:3]
    assert positions.of_batch(Loader, 0, 2, None, cpu).tolist() == dealt[3:]
    # Another loader counts from 0; a loader without a distributed sampler gives its place in the loader.
    assert positions.of_batch(object(), 1, 2, None, cpu).tolist() == [0, 1]
    positions.reset()
    assert positions.of_batch(object(), 1, 2, None, cpu).tolist() == [0, 1]
    assert dealt_order(torch.utils.data.SequentialSampler(range(3)), cpu) is None
