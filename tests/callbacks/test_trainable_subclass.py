"""`TrainableCallback` subclasses as docs/online-probe.md describes them, in a real fit with a validation loader.

A subclass without ``sources`` "calls ``self.probe.train_step(features, targets)`` from its own hooks": the base
reads nothing for it. Before the fix the base still read its (absent) inputs at every validation batch, and the fit
died at the first one with ``IndexError: list index out of range``. Here such a subclass (a decoder reconstructing
the input, with an MSE loss and a metric it updates itself in validation) trains and evaluates through its own
hooks, beside a subclass with ``sources`` that the base feeds and evaluates.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from tests.helpers.models import EMBED_DIM, IN_DIM, NUM_CLASSES, Backbone, loader, trainer
from torch import nn
from torchmetrics import MeanSquaredError
from torchmetrics.classification import MulticlassAccuracy

from distprobe.callbacks import TrainableCallback


class Decoder(TrainableCallback):
    """Reconstructs the backbone's input from its embedding; feeds its probe itself."""

    def __init__(self, name: str) -> None:
        super().__init__(
            None, name, optimizer={"type": "SGD", "lr": 0.1}, loss_fn=nn.MSELoss(), metrics={"mse": MeanSquaredError()}
        )
        self.width = EMBED_DIM  # set after the base's __init__, as the docs say a subclass may

    def configure_model(self, pl_module: pl.LightningModule | None) -> nn.Module:
        return nn.Linear(self.width, IN_DIM)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        assert self.module is not None
        self.initial = self.module.weight.detach().clone()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, *args)
        self.probe.train_step(outputs["embedding"].detach(), args[0]["x"])

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any, **kwargs: Any
    ) -> None:
        super().on_validation_batch_end(trainer, pl_module, outputs, *args, **kwargs)
        self.probe.eval_step(outputs["embedding"], args[0]["x"])


class Linear(TrainableCallback):
    """A linear probe the base feeds from ``sources``."""

    def configure_model(self, pl_module: pl.LightningModule | None) -> nn.Module:
        return nn.Linear(EMBED_DIM, NUM_CLASSES)


def test_subclasses_with_and_without_sources_train_and_evaluate_in_a_fit_with_validation():
    torch.manual_seed(0)
    decoder = Decoder("decoder")
    linear = Linear(None, "linear", sources=["embedding"], target="label", metrics={"top1": MulticlassAccuracy(3)})
    t = trainer([decoder, linear], max_epochs=2, limit_train_batches=4)
    t.fit(Backbone(), loader(), loader(n=20, seed=1, batch_size=8))

    assert t.state.finished
    logged = t.callback_metrics
    assert {"train/decoder_loss_epoch", "eval/decoder_mse", "train/linear_loss_epoch", "eval/linear_top1"} <= set(
        logged
    )
    assert decoder.module is not None
    assert not torch.equal(decoder.module.weight.detach(), decoder.initial)  # its own hooks trained it
    assert float(logged["eval/linear_top1"]) > 0.5  # separable blobs: the fed probe learned
