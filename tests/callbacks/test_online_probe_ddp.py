"""OnlineProbe under Lightning's DDP on gloo: replicas identical every step, N ranks equal one process."""

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torchmetrics
from lightning.pytorch.strategies import DDPStrategy
from tests.helpers.dist import run_distributed
from tests.helpers.models import EMBED_DIM, NUM_CLASSES, Backbone, SeparableData, trainer
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from distprobe.callbacks import OnlineProbe

pytestmark = pytest.mark.distributed

LOCAL_BATCH = 8


def make_probe(seed):
    torch.manual_seed(seed)
    return OnlineProbe(
        None,
        name="linear",
        input="embedding",
        target="label",
        probe=nn.Linear(EMBED_DIM, NUM_CLASSES),
        optimizer="SGD",
        accumulate_grad_batches=2,
        metrics={"top1": torchmetrics.classification.MulticlassAccuracy(NUM_CLASSES, average="micro")},
    )


class ReplicaCheck(pl.Callback):
    """After every probe step, all-gather the probe's weights and record whether every rank holds the same."""

    def __init__(self, probe):
        self.probe = probe
        self.identical = []

    def on_train_start(self, trainer, pl_module):
        self.replica_type = type(self.probe.probe.replica).__name__  # released again at teardown

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        mine = torch.cat([p.detach().flatten() for p in self.probe.probe.module.parameters()])
        everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(everyone, mine)
        self.identical.append(all(torch.equal(everyone[0], w) for w in everyone))


def _fit_ddp(rank, world):
    cb = make_probe(seed=100 + rank)  # different initial weights on every rank
    check = ReplicaCheck(cb)
    data = SeparableData(96)
    # Lightning's own training sampler always shuffles; this one keeps a known order (rank r: r, r+world, ...).
    train = DataLoader(data, batch_size=LOCAL_BATCH, sampler=DistributedSampler(data, shuffle=False))
    t = trainer(
        [cb, check],
        max_epochs=2,
        strategy=DDPStrategy(),
        devices=world,
        use_distributed_sampler=False,
        limit_val_batches=0,
    )
    module = Backbone(lr=0.0)
    t.fit(module, train)
    probe_params = list(cb.probe.module.parameters())
    main_params = {id(p) for p in t.strategy.model.parameters()}
    return {
        "weights": torch.cat([p.detach().flatten() for p in probe_params]),
        "identical": check.identical,
        "probe_in_main_wrapper": any(id(p) in main_params for p in probe_params),
        "probe_in_main_optimizer": any(
            id(p) in {id(q) for g in opt.param_groups for q in g["params"]}
            for opt in t.optimizers
            for p in probe_params
        ),
        "replica_type": check.replica_type,
        "released_after_fit": cb.probe.replica is cb.probe.module,
    }


def test_lightning_ddp_probe_matches_one_process():
    world = 2
    results = run_distributed(_fit_ddp, world)
    for r in results:
        assert r["replica_type"] == "DistributedDataParallel"
        assert r["released_after_fit"]  # nothing of the probe's holds the process group once fit returns
        assert r["identical"] and all(r["identical"])
        assert not r["probe_in_main_wrapper"] and not r["probe_in_main_optimizer"]
    # One process over the union of the ranks' batches, starting from rank 0's weights.
    cb = make_probe(seed=100)
    t = trainer([cb], max_epochs=2, limit_val_batches=0)
    t.fit(Backbone(lr=0.0), DataLoader(SeparableData(96), batch_size=LOCAL_BATCH * world, shuffle=False))
    reference = torch.cat([p.detach().flatten() for p in cb.probe.module.parameters()])
    for r in results:
        torch.testing.assert_close(r["weights"], reference, atol=1e-5, rtol=1e-5)
