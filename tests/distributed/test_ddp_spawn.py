"""Under ddp_spawn the callback's tensors reach the workers in shared memory: each rank must get its own probe."""

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from tests.helpers.models import EMBED_DIM, NUM_CLASSES, Backbone, loader, trainer
from torch import nn

from distprobe.callbacks import OnlineProbe

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


class AssertReplicasIdentical(pl.Callback):
    def __init__(self, probe):
        self.probe = probe

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        mine = torch.cat([p.detach().flatten() for p in self.probe.probe.module.parameters()])
        everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(everyone, mine)
        # With shared storage both ranks would step the same tensor: the weights would move twice per step and
        # still look identical, so also check that this rank's storage is not the one the parent process holds.
        assert all(torch.equal(everyone[0], w) for w in everyone), "probe replicas diverged"
        assert not self.probe.probe.module.weight.is_shared(), "probe weights still in shared memory"


def test_ddp_spawn_keeps_replicas_identical_and_private():
    cb = OnlineProbe(
        None, name="linear", input="embedding", target="label", probe=nn.Linear(EMBED_DIM, NUM_CLASSES), optimizer="SGD"
    )
    t = trainer([cb, AssertReplicasIdentical(cb)], max_epochs=1, strategy="ddp_spawn", devices=2, limit_val_batches=0)
    t.fit(Backbone(), loader())
    assert t.state.finished
