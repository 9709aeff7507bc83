"""`SelectsOnSplit`: the adapter side of choosing a best configuration on the hashed selection split.

A bank chooses its best head, a ridge its best lambda, on a fixed share of the validation samples, and reports it on
the rest (`distprobe.bank.selection`). Which samples those are must not depend on the world size or the sampler's
shuffling, so the Lightning adapters give the engine each sample's position as its loader dealt it.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from distprobe.callbacks.base import ProbeCallback
from distprobe.metrics.exact import ValidationPositions


class SelectsOnSplit(ProbeCallback):
    """A callback whose engine chooses its best configuration on the hashed selection split: a bank's head, a lambda.

    The split is `distprobe.bank.selection`'s; `OnlineProbeBank` and `distprobe.callbacks.OnlineRidge` choose on it.
    A main validation sample's place in the split follows its position in its own validation dataloader, the index
    its `DistributedSampler` dealt it (`distprobe.metrics.exact.ValidationPositions`), so that the same samples choose
    at any world size, shuffled or not; each loader counts from 0 at each validation.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._positions = ValidationPositions()

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._positions.reset()
        super().on_validation_epoch_start(trainer, pl_module)

    @override
    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *batch_args: Any) -> None:
        # ``batch_args``: (outputs, batch, batch_idx), then dataloader_idx when there are several validation loaders.
        # The base evaluates the batch while its loader, which says the samples' positions, is known.
        loader_idx = int(batch_args[3]) if len(batch_args) > 3 else 0
        with self._positions.reading(trainer.val_dataloaders, loader_idx):
            super().on_validation_batch_end(trainer, pl_module, *batch_args)

    def evaluate_on_split(self, engine: Any, read: Any, num_valid: int | None) -> torch.Tensor | None:
        """``engine.eval_step`` of a read ``(features, targets)`` batch, with the batch's positions in the split."""
        features, targets = read
        positions = self.split_positions(targets, engine)
        return engine.eval_step(features, targets, num_valid=num_valid, positions=positions)

    def split_positions(self, targets: torch.Tensor | None, engine: Any) -> torch.Tensor | None:
        """The positions of the validation batch being evaluated, for ``engine.eval_step(..., positions=...)``.

        None for the callback's own validation data (``val_data``): the engine's running count, as distprobe shards
        that data in order. None too for a batch that lacked the member's keys (no targets): the engine skips it, and
        its size, unknown, does not advance the loader's positions on this rank.
        """
        if targets is None:
            return None
        return self._positions.current(int(targets.shape[0]), engine.dp_group, engine.device)
