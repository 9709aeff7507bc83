"""The engine under real gloo process groups: replicas stay identical, N ranks equal one process."""

import pytest
import torch
import torch.distributed as dist
from tests.helpers.dist import DistributedTestError, run_distributed
from torch import nn

from distprobe.engine import Probe, ProbeConfig
from distprobe.engine.checks import first_batch_problem, raise_if_any_rank_failed

pytestmark = pytest.mark.distributed

LOCAL_BATCH = 8
STEPS = 12


def global_batches(world, steps=STEPS, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = world * LOCAL_BATCH
    return [(torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)) for _ in range(steps)]


def build(seed, accumulate, group):
    torch.manual_seed(seed)
    return Probe.build(
        ProbeConfig(
            name="p",
            probe=nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)),
            optimizer="AdamW",
            scheduler="CosineAnnealingLR",
            accumulate_grad_batches=accumulate,
            gradient_clip_val=0.5,
        ),
        dp_group=group,
        total_steps=STEPS // accumulate,
    )


def flat(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def _train_ranks(rank, world, accumulate):
    # Each rank starts from different weights: the replica's construction must make them identical.
    probe = build(100 + rank, accumulate, dist.group.WORLD)
    reduces = []

    def counting_allreduce(state, bucket):
        reduces.append(probe.micro_step)
        tensor = bucket.buffer().div_(world)
        return dist.all_reduce(tensor, async_op=True).get_future().then(lambda fut: fut.value()[0])

    probe.replica.register_comm_hook(None, counting_allreduce)
    for x, y in global_batches(world):
        out = probe.train_step(x[rank::world], y[rank::world])
        if out.stepped:
            mine = flat(probe.module)
            everyone = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(everyone, mine)
            assert all(torch.equal(everyone[0], other) for other in everyone), "replicas diverged"
    return flat(probe.module), reduces


def _all_scenarios(rank, world):
    # One spawn serves several scenarios: starting processes costs far more than these tiny probes.
    out = {accumulate: _train_ranks(rank, world, accumulate) for accumulate in (1, 3)}
    out["non_finite"] = _non_finite_on_one_rank(rank, world)
    return out


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def ranks(request):
    world = request.param
    return world, run_distributed(_all_scenarios, world)


@pytest.mark.parametrize("accumulate", [1, 3])
def test_replicas_identical_and_equal_to_one_process(ranks, accumulate):
    world, by_rank = ranks
    results = [r[accumulate] for r in by_rank]
    reference = build(100, accumulate, None)  # rank 0's initial weights win the broadcast
    for x, y in global_batches(world):
        # One process sees the union of the ranks' micro-batches.
        order = torch.cat([torch.arange(r, len(y), world) for r in range(world)])
        reference.train_step(x[order], y[order])
    for weights, _ in results:
        torch.testing.assert_close(weights, flat(reference.module), atol=1e-5, rtol=1e-5)
    # One gradient all-reduce per optimizer step, issued by the boundary micro-step, none on the others.
    expected = [step for step in range(STEPS) if (step + 1) % accumulate == 0]
    for _, reduces in results:
        assert reduces == expected


def _non_finite_on_one_rank(rank, world):
    probe = build(0, 1, dist.group.WORLD)
    for i, (x, y) in enumerate(global_batches(world, steps=4)):
        local = x[rank::world].clone()
        if i == 2 and rank == 1:
            local[0, 0] = float("nan")
        probe.train_step(local, y[rank::world])
    return flat(probe.module), int(probe.skipped_steps)


def test_non_finite_on_one_rank_skips_the_step_on_every_rank(ranks):
    _, by_rank = ranks
    results = [r["non_finite"] for r in by_rank]
    assert all(skipped == 1 for _, skipped in results)
    assert all(torch.equal(results[0][0], w) for w, _ in results)
    assert torch.isfinite(results[0][0]).all()


def _bad_labels_on_one_rank(rank, world):
    probe = build(0, 1, dist.group.WORLD)
    x, y = global_batches(world, steps=1)[0]
    y = y[rank::world].clone()
    if rank == 1:
        y[0] = 7
    problem = first_batch_problem(probe, x[rank::world], y, input_key="embedding")
    raise_if_any_rank_failed(problem, probe.dp_group)


def test_bad_input_on_one_rank_raises_on_every_rank_without_hanging():
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_bad_labels_on_one_rank, 2, timeout=60)
    text = str(info.value)
    assert "rank 0: ValueError: rank 1 of the probe's group reported: probe 'p': target labels range over" in text
    assert "rank 1: ValueError: probe 'p': target labels range over [0, 7]" in text
