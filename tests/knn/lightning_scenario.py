"""Worker for the Lightning kNN tests: an uninterrupted fit and one resumed from its epoch-0 checkpoint.

Reuses the strategies scenario's backbone, data and Trainer (tests/strategies/scenario.py). Training per rank:
16 samples an epoch in batches of 4, so the 20-slot shards (queue_length 40 on 2 ranks) wrap in epoch 1 and still
hold epoch 0 samples there: the resumed run must have restored them.
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from tests.strategies.scenario import EPOCHS, NUM_CLASSES, DataModule, Spec, _module, _trainer

from distprobe.callbacks import OnlineKNN

KS = (3, 1, 5)


def _knn() -> OnlineKNN:
    return OnlineKNN(
        None, name="knn", input="embedding", target="label", num_classes=NUM_CLASSES, queue_length=40, k=KS
    )


class Recorder(Callback):
    """The kNN's predictions of every validation batch, and its logged values per epoch."""

    def __init__(self) -> None:
        self.preds: list[tuple[int, list[int]]] = []
        self.logged: list[dict[str, float]] = []
        self.facts: dict[str, Any] = {}

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, *_: Any
    ) -> None:
        self.preds.append((trainer.current_epoch, batch["knn_preds"].tolist()))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.logged.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("eval/knn")})
        knn = next(cb for cb in trainer.callbacks if isinstance(cb, OnlineKNN)).knn
        self.facts = {"rows": knn.shard.features.shape[0], "written": knn.shard.written}


def run_all(rank: int, world_size: int, specs: dict[str, Spec], tmp: str) -> dict[str, Any]:
    """`run` for every spec in turn, in one set of processes (a spawn costs seconds of CI)."""
    return {name: run(rank, world_size, spec, os.path.join(tmp, name)) for name, spec in specs.items()}


def run(rank: int, world_size: int, spec: Spec, tmp: str) -> dict[str, Any]:
    """Two fits on this rank: uninterrupted (checkpoint each epoch), then resumed from epoch 0's checkpoint."""
    import distprobe.strategies  # noqa: F401 - registers the strategy names

    ckpt_dir = os.path.join(tmp, "ckpt")
    out: dict[str, Any] = {}
    recorder = Recorder()
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    trainer = _trainer(spec, world_size, [_knn(), recorder, checkpoint])
    trainer.fit(_module(spec, seed=0), datamodule=DataModule())
    out["whole"] = (recorder.preds, recorder.logged, recorder.facts)

    recorder = Recorder()
    trainer = _trainer(spec, world_size, [_knn(), recorder], enable_checkpointing=False)
    trainer.fit(_module(spec, seed=123), datamodule=DataModule(), ckpt_path=os.path.join(ckpt_dir, "epoch=0.ckpt"))
    out["resumed"] = (recorder.preds, recorder.logged, recorder.facts)
    out["epochs"] = EPOCHS
    return out
