"""The real-use figures of issue 12, for any version of distprobe.

Four measurements: resume from rank 0's state inside an accumulation window (2 gloo ranks), a BatchNorm probe on
2 ranks against one process, the schedule length each rank gets from uneven loaders, and the rates of OneCycleLR and
CyclicLR named by string in a real Lightning fit. Run from the repository root, pointing PYTHONPATH at the ``src``
of the version to measure (a git worktree of an older commit, say) and at the repository for the test helpers:

    PYTHONPATH=src:. python benchmarks/real_use_figures.py
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from tests.helpers.dist import run_distributed
from tests.helpers.models import EMBED_DIM, NUM_CLASSES, Backbone, loader, trainer
from torch import nn

from distprobe.callbacks import OnlineProbe
from distprobe.engine import Probe, ProbeConfig


def batches(world, steps=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = world * 6
    return [(torch.randn(n, 8, generator=g), torch.randint(0, 4, (n,), generator=g)) for _ in range(steps)]


def mae_head():
    return nn.Sequential(nn.BatchNorm1d(8, affine=False, eps=1e-6), nn.Linear(8, 4))


def build(seed, group, make=None, **kwargs):
    torch.manual_seed(seed)
    kwargs.setdefault("optimizer", {"type": "SGD", "lr": 0.1, "momentum": 0.9})
    return Probe.build(ProbeConfig(name="p", probe=make() if make else nn.Linear(8, 4), **kwargs), dp_group=group)


def flat(module):
    return torch.cat(
        [p.detach().flatten() for p in module.parameters()] + [b.flatten().float() for b in module.buffers()]
    )


def resume(rank, world):
    data = batches(world)
    straight = build(40 + rank, dist.group.WORLD, accumulate_grad_batches=2)
    for x, y in data:
        straight.train_step(x[rank::world], y[rank::world])
    first = build(40 + rank, dist.group.WORLD, accumulate_grad_batches=2)
    for x, y in data[:3]:
        first.train_step(x[rank::world], y[rank::world])
    state = first.state_dict()  # every rank calls it; only rank 0's copy is kept, as Lightning writes it
    kept = [state if rank == 0 else None]
    dist.broadcast_object_list(kept, src=0)
    resumed = build(999 + rank, dist.group.WORLD, accumulate_grad_batches=2)
    resumed.load_state_dict(kept[0])
    for x, y in data[3:]:
        resumed.train_step(x[rank::world], y[rank::world])
    return (flat(straight.module) - flat(resumed.module)).abs().max().item()


def batchnorm(rank, world):
    probe = build(20 + rank, dist.group.WORLD, mae_head)
    for x, y in batches(world):
        probe.train_step(x[rank::world], y[rank::world])
    return flat(probe.module)


def uneven(rank, world):
    probe = build(30, dist.group.WORLD, scheduler="CosineAnnealingLR")
    probe.set_total_steps(10 if rank == 0 else 13)
    return probe.scheduler.T_max


class RecordLR(pl.Callback):
    def __init__(self, probe):
        self.probe = probe
        self.lrs = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.lrs.append(self.probe.probe.optimizer.param_groups[0]["lr"])


def main():
    print("resume max |diff| per rank:", run_distributed(resume, 2))
    ranks = run_distributed(batchnorm, 2)
    reference = build(20, None, mae_head)
    for x, y in batches(2):
        order = torch.cat([torch.arange(r, x.shape[0], 2) for r in range(2)])
        reference.train_step(x[order], y[order])
    print("BN probe max |diff| vs one process:", [(r - flat(reference.module)).abs().max().item() for r in ranks])
    print("T_max per rank with uneven loaders:", run_distributed(uneven, 2))
    for name in ("OneCycleLR", "CyclicLR"):
        cb = OnlineProbe(
            None,
            name="l",
            input="embedding",
            target="label",
            probe=nn.Linear(EMBED_DIM, NUM_CLASSES),
            optimizer={"type": "SGD", "lr": 0.1, "momentum": 0.9},
            scheduler=name,
        )
        record = RecordLR(cb)
        trainer([cb, record], max_epochs=2, limit_val_batches=0).fit(Backbone(), loader())
        print(f"{name}: first lr {record.lrs[0]:.5f}, peak lr {max(record.lrs):.5f}")


if __name__ == "__main__":
    main()
