"""A probe and a kNN on their own labeled data under tensor parallelism: FSDP2 on a 1 x 2 mesh, 2 gloo ranks.

Both ranks form one tensor-parallel group, so they see the same main batches and, their data-parallel group being
themselves, the same own batches; the extra forward is a collective over the pair, and its features are DTensors
sharded on the feature dimension. Checked: the backbone is bitwise what it is without them, the probe replicas agree
at every step, and both ranks log the same own-data accuracies.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

from distprobe.callbacks import OnlineKNN, OnlineProbe
from helpers.dist import run_distributed
from helpers.models import RandomPoints
from strategies.scenario import EMBED_DIM, IN_DIM, NUM_CLASSES, DataModule, Spec, TPBackbone, _trainer

pytestmark = pytest.mark.distributed

SPEC = Spec("distprobe_fsdp2", kind="tp", strategy_kwargs={"data_parallel_size": 1, "tensor_parallel_size": 2})


def _features(module: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    return module(batch["x"])


def _callbacks() -> list[Callback]:
    train, val = RandomPoints(18, 3, IN_DIM, NUM_CLASSES), RandomPoints(7, 4, IN_DIM, NUM_CLASSES)
    torch.manual_seed(7)
    probe = OnlineProbe(
        None,
        name="own",
        input="emb",
        target="label",
        probe=nn.Linear(EMBED_DIM, NUM_CLASSES),
        optimizer={"type": "SGD", "lr": 0.2, "momentum": 0.9},
        metrics={"top1": MulticlassAccuracy(NUM_CLASSES, average="micro")},
        data=DataLoader(train, batch_size=3, shuffle=True),
        val_data=DataLoader(val, batch_size=3),
        every_n_steps=2,
        features=_features,
    )
    knn = OnlineKNN(
        None,
        name="knn",
        input="emb",
        target="label",
        num_classes=NUM_CLASSES,
        queue_length=12,
        k=(3, 1),
        data=DataLoader(train, batch_size=3, shuffle=True),
        val_data=DataLoader(val, batch_size=3),
        features=_features,
    )
    return [probe, knn]


class ProbeWeights(Callback):
    def __init__(self) -> None:
        self.all_ranks: list[list[torch.Tensor]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *_: Any) -> None:
        probe = next(cb for cb in trainer.callbacks if isinstance(cb, OnlineProbe))
        mine = torch.cat([p.detach().flatten() for p in probe.probe.module.parameters()])
        every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(every, mine)
        self.all_ranks.append(every)


def _backbone(model: pl.LightningModule) -> dict[str, torch.Tensor]:
    return {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
        for k, v in model.encoder.state_dict().items()
    }


def _run(rank: int, world: int) -> dict[str, Any]:
    import distprobe.strategies  # noqa: F401 - registers the strategy names

    plain = TPBackbone(seed=0, probes_in_module_dict=False)
    _trainer(SPEC, world, [], enable_checkpointing=False).fit(plain, datamodule=DataModule())
    probed, weights = TPBackbone(seed=0, probes_in_module_dict=False), ProbeWeights()
    trainer = _trainer(SPEC, world, [*_callbacks(), weights], enable_checkpointing=False)
    trainer.fit(probed, datamodule=DataModule())
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("eval/own", "eval/knn"))}
    return {"plain": _backbone(plain), "probed": _backbone(probed), "weights": weights.all_ranks, "logged": logged}


def test_own_data_under_a_tensor_parallel_mesh():
    ranks = run_distributed(_run, 2, timeout=240)
    for rank in ranks:
        assert rank["plain"].keys() == rank["probed"].keys()
        for key, value in rank["plain"].items():
            assert torch.equal(value, rank["probed"][key]), key
        assert rank["weights"], "the probe trained"
        for first, *others in rank["weights"]:
            assert all(torch.equal(first, other) for other in others)
        assert {"eval/own_top1", "eval/knn_top1", "eval/knn_k1_top1"} <= set(rank["logged"])
    assert ranks[0]["logged"] == ranks[1]["logged"]
