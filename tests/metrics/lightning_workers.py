"""Rank functions running a real lightning.Trainer with OnlineProbes and Lightning's own distributed val sampler."""

from __future__ import annotations

from collections import Counter
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from metric_workers import count_collectives
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassAUROC, MulticlassF1Score

from distprobe.callbacks import OnlineProbe


class Samples(Dataset):
    """Integer-valued features and probe weights: every matmul is exact, whatever the batch size."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"x": self.features[i], "label": self.labels[i]}


class Identity(pl.LightningModule):
    """A backbone that hands its input over as the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Linear(1, 1)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return {"embedding": batch["x"]}


class CountEpochEnd(Callback):
    """Placed first and last among the callbacks: counts the collectives of every probe's validation epoch end."""

    def __init__(self, start: bool, box: dict[str, Any]) -> None:
        self.start, self.box = start, box

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.start:
            self.box["ctx"] = count_collectives()
            self.box["counts"] = self.box["ctx"].__enter__()
        else:
            self.box["ctx"].__exit__(None, None, None)


def _metrics(num_classes: int) -> dict[str, Any]:
    return {
        "top1": MulticlassAccuracy(num_classes, average="micro"),
        "top5": MulticlassAccuracy(num_classes, top_k=min(5, num_classes)),
        "f1": MulticlassF1Score(num_classes, average="macro"),
        "auroc": MulticlassAUROC(num_classes),
    }


def _probe(name: str, weight: torch.Tensor, metrics: dict[str, Any], cls: type = OnlineProbe) -> OnlineProbe:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    return cls(None, name=name, input="embedding", target="label", probe=linear, metrics=metrics)


def validate_case(
    world: int, features: torch.Tensor, labels: torch.Tensor, weights: list[torch.Tensor], batch_size: int
) -> dict[str, Any]:
    """Validate once with one probe per weight; return the logged values, the reference and the collective count."""
    num_classes = weights[0].shape[0]
    probes = [_probe(f"p{i}", w, _metrics(num_classes)) for i, w in enumerate(weights)]
    box: dict[str, Any] = {}
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world,
        strategy="ddp",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[CountEpochEnd(True, box), *probes, CountEpochEnd(False, box)],
    )
    # Lightning's default: a DistributedSampler(shuffle=False, drop_last=False) that pads the ranks.
    trainer.validate(Identity(), DataLoader(Samples(features, labels), batch_size=batch_size), verbose=False)
    logged = {k: v.clone() for k, v in trainer.callback_metrics.items()}
    expected = {}
    for i, w in enumerate(weights):
        reference = MetricCollection(_metrics(num_classes), prefix=f"eval/p{i}_")
        reference.update(features @ w.T, labels)
        expected.update(reference.compute())
    counts: Counter = box["counts"]
    return {"logged": logged, "expected": expected, "counts": dict(counts)}


def lightning_rank(rank: int, world: int, seed: int, n: int, batch_size: int) -> dict[str, Any]:
    """The 5-samples case (true accuracy 0.2) and one random uneven case with 3 probes."""
    out = {}
    if world == 2:
        five = torch.zeros(5, 5)
        five[:, 0] = 1.0  # every sample predicted as class 0; labels 0..4: accuracy 1/5
        out["five"] = validate_case(world, five, torch.arange(5), [torch.eye(5)], batch_size=2)
    g = torch.Generator().manual_seed(seed)
    features = torch.randint(-3, 4, (n, 6), generator=g).float()
    labels = torch.randint(0, 8, (n,), generator=g)
    weights = [torch.randint(-2, 3, (8, 6), generator=g).float() for _ in range(3)]
    out["random"] = validate_case(world, features, labels, weights, batch_size)
    return out
