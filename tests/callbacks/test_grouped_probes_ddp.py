"""`ProbeGroup` on 2 real gloo ranks: equal to the probes' own DDP steps, one bucketed all-reduce per closing window,
identical replicas, N ranks equal to one process, and a Lightning DDP fit resumed mid-window from rank 0's state."""

import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torchmetrics
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from tests.helpers.dist import run_distributed
from tests.helpers.models import EMBED_DIM, NUM_CLASSES, Backbone, SeparableData, trainer
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from distprobe.callbacks import OnlineProbe
from distprobe.engine import Probe, ProbeConfig, ProbeGroup

pytestmark = pytest.mark.distributed

LOCAL_BATCH = 6
STEPS = 7
BAD_STEP = 3
OPTIMIZERS = (
    {"type": "SGD", "lr": 0.1, "momentum": 0.9},
    {"type": "AdamW", "lr": 1e-2},
    "LARS",
)


def make_probes(seed, accumulations, groups):
    torch.manual_seed(seed)  # a different seed on every rank: building the replicas broadcasts rank 0's weights
    return [
        Probe.build(
            ProbeConfig(
                name=f"p{i}",
                probe=nn.Linear(8, 4),
                optimizer=optimizer,
                accumulate_grad_batches=accumulate,
                gradient_clip_val=0.5 if i == 1 else None,
            ),
            dp_group=group,
        )
        for i, (optimizer, accumulate, group) in enumerate(zip(OPTIMIZERS, accumulations, groups, strict=True))
    ]


def global_batches(world, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = world * LOCAL_BATCH
    return [(torch.randn(n, 8, generator=g), torch.randint(0, 4, (n,), generator=g)) for _ in range(STEPS)]


def flat(probe):
    return torch.cat([p.detach().flatten() for p in probe.module.parameters()])


def _local(rank, world, step, x, y):
    x, y = x[rank::world].clone(), y[rank::world].clone()
    if step == BAD_STEP and rank == 1:
        y[0] = 99  # bad data for every probe on rank 1 only: the step is skipped on both ranks
    return x, y


def _grouped_and_separate(rank, world, accumulations, own_groups):
    groups = [dist.group.WORLD] * 3
    if own_groups:  # the same ranks, another group object: another bucket
        groups[2] = dist.new_group(list(range(world)))
    separate = make_probes(10 + rank, accumulations, groups)
    grouped = make_probes(10 + rank, accumulations, groups)
    group = ProbeGroup(grouped)
    counts, identical = [], []
    real_all_reduce = dist.all_reduce

    def counting(*args, **kwargs):
        counts[-1] += 1
        return real_all_reduce(*args, **kwargs)

    for step, (x, y) in enumerate(global_batches(world)):
        x, y = _local(rank, world, step, x, y)
        for probe in separate:
            probe.train_step(x, y)
        counts.append(0)
        dist.all_reduce = counting
        try:
            group.train_step([(x, y)] * 3)
        finally:
            dist.all_reduce = real_all_reduce
        mine = torch.cat([flat(p) for p in grouped])
        everyone = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(everyone, mine)
        identical.append(all(torch.equal(mine, other) for other in everyone))
    return {
        "separate": [flat(p) for p in separate],
        "grouped": [flat(p) for p in grouped],
        "skipped": [(int(a.skipped_steps), int(b.skipped_steps)) for a, b in zip(separate, grouped, strict=True)],
        "all_reduces": counts,
        "identical": identical,
        "replica_types": [type(p.replica).__name__ for p in grouped],
    }


@pytest.mark.parametrize(
    ("accumulations", "own_groups", "expected"),
    [
        ((2, 2, 2), False, [0, 1, 0, 1, 0, 1, 0]),  # windows close together: one bucketed all-reduce
        ((1, 2, 3), False, [1] * STEPS),  # whichever windows close at a step share its one all-reduce
        ((2, 2, 2), True, [0, 2, 0, 2, 0, 2, 0]),  # a probe over another group object: its own bucket
    ],
)
def test_grouped_probes_equal_their_own_ddp_steps_with_one_all_reduce(accumulations, own_groups, expected):
    ranks = run_distributed(_grouped_and_separate, 2, accumulations, own_groups, timeout=120)
    for r in ranks:
        assert r["all_reduces"] == expected
        assert all(r["identical"])  # replicas bitwise identical after every step
        assert r["replica_types"] == ["DistributedDataParallel"] * 3  # the wrappers stay, for Probe.train_step
        for name, (a, b) in zip(("sgd", "adamw", "lars"), r["skipped"], strict=True):
            assert a == b == 1, name  # rank 1's bad batch skipped the window on both ranks
        for a, b in zip(r["separate"], r["grouped"], strict=True):
            torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)
    for a, b in zip(ranks[0]["grouped"], ranks[1]["grouped"], strict=True):
        assert torch.equal(a, b)


def _grouped_only(rank, world):
    probes = make_probes(10 + rank, (1, 2, 3), [dist.group.WORLD] * 3)
    group = ProbeGroup(probes)
    for x, y in global_batches(world):
        group.train_step([(x[rank::world], y[rank::world])] * 3)
    return [flat(p) for p in probes]


def test_grouped_probes_on_two_ranks_equal_one_process_on_all_batches():
    ranks = run_distributed(_grouped_only, 2, timeout=120)
    reference = make_probes(10, (1, 2, 3), [None] * 3)  # rank 0's seed: the replicas start from its weights
    group = ProbeGroup(reference)
    for x, y in global_batches(2):
        group.train_step([(x, y)] * 3)
    for r in ranks:
        for got, want in zip(r, [flat(p) for p in reference], strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# --- Lightning DDP: several OnlineProbes as one group, resumed mid-window from rank 0's callback state ----------


def online_probes(rank):
    torch.manual_seed(100 + rank)
    return [
        OnlineProbe(
            None,
            name=name,
            input="embedding",
            target="label",
            probe=nn.Linear(EMBED_DIM, NUM_CLASSES),
            optimizer=optimizer,
            accumulate_grad_batches=accumulate,
            metrics={"top1": torchmetrics.classification.MulticlassAccuracy(NUM_CLASSES, average="micro")},
        )
        for name, optimizer, accumulate in (
            ("sgd", {"type": "SGD", "lr": 0.1, "momentum": 0.9}, 2),
            ("adamw", "AdamW", 3),
        )
    ]


def _resume_under_ddp(rank, world, tmp):
    straight = online_probes(rank)
    checkpoint = ModelCheckpoint(dirpath=tmp, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    t = trainer(
        [*straight, checkpoint],
        max_epochs=2,
        strategy=DDPStrategy(),
        devices=world,
        use_distributed_sampler=False,
        limit_val_batches=0,
        enable_checkpointing=True,
    )
    data = SeparableData(80)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(Backbone(lr=0.01), DataLoader(data, batch_size=8, sampler=DistributedSampler(data, shuffle=False)))
    sync_advice = [str(w.message) for w in caught if "sync_dist" in str(w.message)]
    resumed = online_probes(rank + 7)  # other weights, until the checkpoint's state is loaded
    t = trainer(
        resumed,
        max_epochs=2,
        strategy=DDPStrategy(),
        devices=world,
        use_distributed_sampler=False,
        limit_val_batches=0,
    )
    t.fit(
        Backbone(lr=0.01),
        DataLoader(data, batch_size=8, sampler=DistributedSampler(data, shuffle=False)),
        ckpt_path=os.path.join(tmp, "epoch=0.ckpt"),
    )
    return (
        [flat(cb.probe) for cb in straight],
        [flat(cb.probe) for cb in resumed],
        [cb.probe.micro_step for cb in straight],
        sync_advice,
    )


def test_lightning_ddp_group_resumed_mid_window_equals_the_uninterrupted_run(tmp_path):
    ranks = run_distributed(_resume_under_ddp, 2, str(tmp_path), timeout=180)
    for straight, resumed, micro_steps, sync_advice in ranks:
        # Epoch values are reduced by distprobe already: Lightning has no sync_dist advice to give about them.
        assert sync_advice == []
        assert micro_steps == [10, 10]  # 5 per epoch: epoch 0 ends inside the windows of 2 and of 3
        for a, b in zip(straight, resumed, strict=True):
            assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(ranks[0][0], ranks[1][0], strict=True))
