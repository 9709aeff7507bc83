"""One Lightning fit with every callback at size 1, on 1 or 2 ranks: what a new user writes first.

- kNNs with one ``k`` (``k=20`` and ``k=[20]``), and one whose largest ``k`` exceeds its queue (``k=[1, 64]``,
  ``queue_length=16``) beside one asking for exactly the queue (``k=16``): with every stored sample voting, both
  must predict alike;
- a bank with one head (``lr=[0.1]``, the default single weight decay, no normalization);
- a probe with stable-pretraining's split form, ``metrics={"train": acc, "val": acc2}``.

Before the fix each of these killed the fit at the end of its first validation epoch. The backbone, data and
samplers are those of the strategies scenario (tests/strategies/scenario.py): 32 training samples over the ranks,
batches of 4, 11 validation samples (one rank's sampler pads), 2 epochs.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from tests.strategies.scenario import EMBED_DIM, EPOCHS, NUM_CLASSES, NUM_VAL_SAMPLES, Backbone, PointDataset
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from torchmetrics.classification import MulticlassAccuracy

from distprobe.callbacks import OnlineKNN, OnlineProbe, OnlineProbeBank

#: kNN name -> (k, queue_length).
KNNS: dict[str, tuple[Any, int]] = {
    "knn_int": (20, 64),
    "knn_list": ([20], 64),
    "knn_big": ([1, 64], 16),
    "knn_all": (16, 16),
}
BANK_LR = 0.1


class _Data(pl.LightningDataModule):
    """Each rank takes every world-th sample, in order (no shuffling: 1 and 2 ranks see the same global batches)."""

    def _loader(self, dataset: PointDataset) -> DataLoader:
        sampler = DistributedSampler(
            dataset, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False
        )
        return DataLoader(dataset, batch_size=4, sampler=sampler)

    def train_dataloader(self) -> DataLoader:
        return self._loader(PointDataset())

    def val_dataloader(self) -> DataLoader:
        return self._loader(PointDataset(NUM_VAL_SAMPLES, seed=1))


def _callbacks() -> list[pl.Callback]:
    keys = dict(input="embedding", target="label", num_classes=NUM_CLASSES)
    knns = [OnlineKNN(None, name=name, k=k, queue_length=queue, **keys) for name, (k, queue) in KNNS.items()]
    bank = OnlineProbeBank(None, name="one", lr=[BANK_LR], **keys)
    torch.manual_seed(0)
    split = OnlineProbe(
        None,
        name="split",
        input="embedding",
        target="label",
        probe=nn.Linear(EMBED_DIM, NUM_CLASSES),
        metrics={"train": MulticlassAccuracy(NUM_CLASSES), "val": MulticlassAccuracy(NUM_CLASSES, average="micro")},
    )
    return [*knns, bank, split]


def fit(rank: int, world_size: int) -> dict[str, Any]:
    """The fit on this rank: what it logged at the end, how far it ran, and the bank's heads."""
    import distprobe.strategies  # noqa: F401 - registers distprobe_ddp

    callbacks = _callbacks()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world_size,
        strategy="distprobe_ddp" if world_size > 1 else "auto",
        max_epochs=EPOCHS,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    trainer.fit(Backbone(seed=0, probes_in_module_dict=False), datamodule=_Data())
    bank = next(cb for cb in callbacks if isinstance(cb, OnlineProbeBank))
    return {
        "logged": {key: float(value) for key, value in trainer.callback_metrics.items()},
        "finished": trainer.state.finished,
        "epochs": trainer.current_epoch,
        "head_ids": list(bank.head_ids),
        "best_head_id": bank.best_head_id,
    }
