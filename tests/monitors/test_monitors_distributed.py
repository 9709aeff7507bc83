"""RankMe and LiDAR on N real gloo ranks equal one process on the concatenated features, with one flat all-reduce
for all monitors per compute and no gather of features."""

import pytest
import torch
import torch.distributed as dist
from tests.helpers.dist import run_distributed
from tests.monitors.test_maths import direct_lidar, direct_rankme, low_rank_views

from distprobe.metrics.flat_sync import compute_metrics_synced
from distprobe.monitors import LiDAR, RankMe

pytestmark = pytest.mark.distributed

STEPS = 3
SAMPLES_PER_RANK = 5
VIEWS = 3
DIM = 10


def global_batches(world):
    """Per step, (world * SAMPLES_PER_RANK, VIEWS, DIM) views; rank r takes the samples r, r + world, ..."""
    views = low_rank_views(n=STEPS * world * SAMPLES_PER_RANK, q=VIEWS, d=DIM, rank=4, seed=world)
    return list(views.split(world * SAMPLES_PER_RANK))


def monitors():
    return [RankMe(DIM), RankMe(DIM, centered=True), LiDAR(DIM)]


def _counting(calls, name, original):
    def wrapper(*args, **kwargs):
        calls.append((name, tuple(args[0].shape) if name == "all_reduce" else None))
        return original(*args, **kwargs)

    return wrapper


def _monitors_on_ranks(rank, world):
    calls = []
    for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast", "barrier"):
        setattr(dist, name, _counting(calls, name, getattr(dist, name)))
    metrics = monitors()
    rankme, centered, lidar = metrics
    for step, views in enumerate(global_batches(world)):
        mine = views[rank::world]
        rankme.update(mine)
        centered.update(mine.reshape(-1, DIM))
        # Rows in another order, with dataset-like ids: the grouping must not depend on the layout.
        ids = torch.arange(mine.shape[0]).repeat_interleave(VIEWS) + 1000 * step
        perm = torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(rank))
        lidar.update(mine.reshape(-1, DIM)[perm], ids[perm])
    values = compute_metrics_synced(metrics, dist.group.WORLD)
    again = compute_metrics_synced(metrics, dist.group.WORLD)  # local states were kept: the same values
    return [v.item() for v in values], [v.item() for v in again], calls


@pytest.mark.parametrize("world", [2, 4])
def test_monitors_on_n_ranks_equal_one_process_with_one_all_reduce(world):
    ranks = run_distributed(_monitors_on_ranks, world, timeout=120)
    everything = torch.cat(global_batches(world))
    reference = monitors()
    for metric in reference:
        metric.update(everything)
    expected = [m.compute().item() for m in reference]
    direct = [direct_rankme(everything.reshape(-1, DIM)), direct_rankme(everything.reshape(-1, DIM), True)]
    direct.append(direct_lidar(everything))
    torch.testing.assert_close(torch.tensor(expected, dtype=torch.float64), torch.stack(direct), atol=1e-6, rtol=1e-6)
    flat_numel = 2 * (1 + DIM + DIM * DIM) + (2 + DIM + 2 * DIM * DIM)
    for values, again, calls in ranks:
        torch.testing.assert_close(
            torch.tensor(values, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64), atol=1e-5, rtol=1e-5
        )
        assert again == values
        # Two computes: exactly one flat all-reduce each, holding every state of the three monitors; no gather.
        assert calls == [("all_reduce", (flat_numel,))] * 2
    assert all(r[0] == ranks[0][0] for r in ranks)
