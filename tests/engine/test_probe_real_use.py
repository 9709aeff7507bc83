"""What broke in real use, at the engine, on real gloo ranks: bad data late in a run, BatchNorm probes, uneven
loaders, and resume from rank 0's state mid-window."""

import pytest
import torch
import torch.distributed as dist
from tests.helpers.dist import run_distributed
from torch import nn

from distprobe.engine import Probe, ProbeConfig
from distprobe.engine.bad_data import REASONS

pytestmark = pytest.mark.distributed

LOCAL_BATCH = 6
STEPS = 8
BAD_STEP = 5  # late in the run, after the first-batch checks


def global_batches(world, steps=STEPS, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = world * LOCAL_BATCH
    return [(torch.randn(n, 8, generator=g), torch.randint(0, 4, (n,), generator=g)) for _ in range(steps)]


def flat(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()] + [b.flatten() for b in module.buffers()])


def gathered(tensor):
    everyone = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, tensor)
    return everyone


def build(seed, group, make=None, **kwargs):
    torch.manual_seed(seed)
    kwargs.setdefault("optimizer", {"type": "SGD", "lr": 0.1, "momentum": 0.9})
    probe = make() if make is not None else nn.Linear(8, 4)
    return Probe.build(ProbeConfig(name="p", probe=probe, **kwargs), dp_group=group)


# --- bad data on one rank only ------------------------------------------------------------------------------------


def _corrupt(kind, x, y):
    x, y = x.clone(), y.clone()
    if kind == "label":
        y[1] = 99  # a 4-class probe: on CUDA this label is a device-side assert that kills the run
    elif kind == "nan_feature":
        x[2, 3] = float("nan")
    return x, y


def _bad_batch_on_rank1(rank, world, kind, accumulate, make=None):
    probe = build(10 + rank, dist.group.WORLD, make, accumulate_grad_batches=accumulate)
    history = []
    for step, (x, y) in enumerate(global_batches(world)):
        x, y = x[rank::world], y[rank::world]
        if step == BAD_STEP and rank == 1:
            x, y = _corrupt(kind, x, y)
        out = probe.train_step(x, y)
        history.append(bool(out.bad))
        mine = flat(probe.module)
        assert all(torch.equal(mine, other) for other in gathered(mine)), f"replicas diverged at step {step}"
    counts = probe.compute_train_metrics()
    return {
        "skipped": int(probe.skipped_steps),
        "weights": flat(probe.module),
        "bad_seen_here": history,
        "counts": {k: float(v) for k, v in counts.items() if "bad_batches" in k},
    }


def test_bad_batch_on_one_rank_keeps_batchnorm_statistics_identical():
    """The running statistics of a skipped window go back on every rank, not only on the rank with the bad batch."""
    ranks = run_distributed(_bad_batch_on_rank1, 2, "nan_feature", 2, mae_head, timeout=120)
    assert [r["skipped"] for r in ranks] == [1, 1]
    assert torch.equal(ranks[0]["weights"], ranks[1]["weights"])  # weights and running statistics (flat() has both)


def _reference_skipping(accumulate, world):
    """One process on the union of the ranks' batches, skipping the window that holds the bad batch."""
    probe = build(10, None, accumulate_grad_batches=accumulate)
    bad_window = BAD_STEP // accumulate
    for step, (x, y) in enumerate(global_batches(world)):
        if step // accumulate == bad_window:
            continue  # the whole window is skipped: no update, no state change
        probe.train_step(x, y)
    return flat(probe.module)


@pytest.mark.parametrize("kind", ["label", "nan_feature"])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_bad_batch_on_one_rank_is_skipped_on_every_rank_without_a_hang(kind, accumulate):
    ranks = run_distributed(_bad_batch_on_rank1, 2, kind, accumulate, timeout=120)
    for result in ranks:
        assert result["skipped"] == 1  # counted on both ranks, though only rank 1 saw bad data
    assert ranks[0]["bad_seen_here"][BAD_STEP] is False and ranks[1]["bad_seen_here"][BAD_STEP] is True
    assert torch.equal(ranks[0]["weights"], ranks[1]["weights"])
    reason = "targets_out_of_range" if kind == "label" else "nonfinite_features"
    for result in ranks:  # the reason, summed over ranks (one flat sync), is the same everywhere
        assert result["counts"] == {f"train/p_bad_batches/{r}": float(r == reason) for r in REASONS}
    # Skipping the window leaves the probe exactly as if that window had never happened (SGD with momentum: a
    # skipped step must not advance the momentum either).
    if accumulate == 1:
        torch.testing.assert_close(ranks[0]["weights"], _reference_skipping(accumulate, 2), rtol=0, atol=1e-5)


# --- a BatchNorm probe --------------------------------------------------------------------------------------------


def mae_head():
    """The MAE protocol: a BatchNorm without affine before the linear head."""
    return nn.Sequential(nn.BatchNorm1d(8, affine=False, eps=1e-6), nn.Linear(8, 4))


def mlp_with_bn():
    return nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))


def _bn_ranks(rank, world, make, accumulate):
    probe = build(20 + rank, dist.group.WORLD, make, accumulate_grad_batches=accumulate)
    for x, y in global_batches(world):
        probe.train_step(x[rank::world], y[rank::world])
    preds = probe.predict(global_batches(world, steps=1, seed=5)[0][0])
    return flat(probe.module), preds


@pytest.mark.parametrize("make", [mae_head, mlp_with_bn], ids=["mae_head", "mlp_with_bn"])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_batchnorm_probe_on_n_ranks_equals_one_process(make, accumulate):
    """Weights and running statistics equal one process on the union of the batches; eval predictions too."""
    ranks = run_distributed(_bn_ranks, 2, make, accumulate, timeout=120)
    reference = build(20, None, make, accumulate_grad_batches=accumulate)
    # The ranks take interleaved samples (rank::world); one process takes them in the same grouping.
    for x, y in global_batches(2):
        order = torch.cat([torch.arange(r, x.shape[0], 2) for r in range(2)])
        reference.train_step(x[order], y[order])
    want = flat(reference.module)
    for weights, preds in ranks:
        torch.testing.assert_close(weights, want, rtol=0, atol=1e-5)
        torch.testing.assert_close(
            preds, reference.predict(global_batches(2, steps=1, seed=5)[0][0]), atol=1e-5, rtol=0
        )
    assert torch.equal(ranks[0][0], ranks[1][0])


# --- schedule lengths from uneven loaders ---------------------------------------------------------------------------


def _uneven_totals(rank, world):
    probe = build(30, dist.group.WORLD, scheduler="CosineAnnealingLR")
    probe.set_total_steps(10 if rank == 0 else 13)  # each rank's own loader length
    lrs = []
    for x, y in global_batches(world, steps=6):
        probe.train_step(x[rank::world], y[rank::world])
        lrs.append(probe.current_lr())
    return probe.scheduler.T_max, lrs, flat(probe.module)


def test_ranks_agree_on_the_schedule_length_with_uneven_loaders():
    ranks = run_distributed(_uneven_totals, 2, timeout=120)
    assert [r[0] for r in ranks] == [13, 13]  # the longest: the schedule never ends before a rank's last step
    assert ranks[0][1] == ranks[1][1]
    assert torch.equal(ranks[0][2], ranks[1][2])


# --- resume from rank 0's state mid-window ---------------------------------------------------------------------


def _resume_from_rank0(rank, world, accumulate, save_at):
    batches = global_batches(world)
    straight = build(40 + rank, dist.group.WORLD, accumulate_grad_batches=accumulate)
    for x, y in batches:
        straight.train_step(x[rank::world], y[rank::world])

    first = build(40 + rank, dist.group.WORLD, accumulate_grad_batches=accumulate)
    for x, y in batches[:save_at]:
        first.train_step(x[rank::world], y[rank::world])
    state = first.state_dict()  # every rank calls it; only rank 0's copy is kept, as Lightning writes it
    kept = [state if rank == 0 else None]
    dist.broadcast_object_list(kept, src=0)
    resumed = build(999 + rank, dist.group.WORLD, accumulate_grad_batches=accumulate)
    resumed.load_state_dict(kept[0])
    for x, y in batches[save_at:]:
        resumed.train_step(x[rank::world], y[rank::world])
    return flat(straight.module), flat(resumed.module)


@pytest.mark.parametrize(("accumulate", "save_at"), [(2, 3), (3, 4), (4, 5)])
def test_resume_from_rank0_state_inside_a_window_equals_the_uninterrupted_run(accumulate, save_at):
    for straight, resumed in run_distributed(_resume_from_rank0, 2, accumulate, save_at, timeout=120):
        assert torch.equal(straight, resumed)


# --- first-batch checks: any exception, agreed over the world -------------------------------------------------


class FailsOnRank1(nn.Module):
    """A probe whose forward raises a non-RuntimeError on rank 1 only (a user's module with a shape assumption)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 4)

    def forward(self, x):
        if dist.get_rank() == 1:
            raise IndexError("tuple index out of range")
        return self.linear(x)


def _first_batch_failure(rank, world):
    from distprobe.loop import ProbeSet

    # Each rank its own one-rank data-parallel group, as under a tensor-parallel mesh: the ranks' probes share no
    # group, so a check agreed within the data-parallel group would leave rank 0 waiting for rank 1 forever.
    groups = [dist.new_group([r]) for r in range(world)]
    probes = ProbeSet.build([{"name": "p", "probe": FailsOnRank1(), "optimizer": "SGD"}], dp_group=groups[rank])
    try:
        x, y = global_batches(world, steps=1)[0]
        probes.step(x[rank::world], y[rank::world])
        dist.barrier()  # where rank 0 would hang if it did not raise too
    except ValueError as err:
        return str(err)
    return None


def test_a_non_runtime_error_on_one_rank_raises_on_every_rank_of_the_world():
    messages = run_distributed(_first_batch_failure, 2, timeout=60)
    assert "IndexError" in messages[1] and "does not fit the probe" in messages[1]
    assert messages[0] is not None and "rank 1" in messages[0]
