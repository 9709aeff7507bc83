"""A fit resumed from a checkpoint written at an epoch's last training batch logs the next epoch's own values.

``ModelCheckpoint(every_n_train_steps=N)`` writes at the last batch of an epoch whenever N divides the epoch's length.
Resuming from it, Lightning (2.6) starts the next epoch without calling ``on_train_epoch_start`` (nor the saved epoch's
``on_train_epoch_end``), and the callbacks reset their epoch state in those hooks only: the probe's and bank's train
metrics, the ridge's statistics and the monitor's sums of the saved epoch, restored from the checkpoint, were counted
again in the next epoch's values. Now each member resets when it first sees a batch of another epoch than the one its
saved state belongs to (the epoch is saved beside the state). Real fits on one process, with a resumable training
loader so the resumed fit sees the uninterrupted fit's batches; the backbone trains, so its features change.
"""

from __future__ import annotations

from typing import Any

import lightning
import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from packaging.version import Version
from tests.helpers.models import EMBED_DIM, NUM_CLASSES, Backbone, ResumableBatches, SeparableData, loader
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from distprobe.callbacks import EmbeddingMonitor, OnlineProbe, OnlineProbeBank, OnlineRidge

BATCHES, BATCH, EPOCHS = 5, 8, 2
DATA = SeparableData(BATCHES * BATCH, seed=3)


class EpochValues(pl.Callback):
    """The training values logged at each epoch's end, by epoch."""

    def __init__(self) -> None:
        self.values: dict[int, dict[str, float]] = {}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logged = trainer.callback_metrics.items()
        self.values[trainer.current_epoch] = {k: float(v) for k, v in logged if k.startswith("train/")}


def _fit(root: Any, ckpt_path: str | None = None) -> tuple[dict[int, dict[str, float]], torch.Tensor]:
    keys = {"input": "embedding", "target": "label"}
    torch.manual_seed(0)
    probe = OnlineProbe(
        None, "probe", probe=nn.Linear(EMBED_DIM, NUM_CLASSES), metrics={"top1": MulticlassAccuracy(3)}, **keys
    )
    ridge = OnlineRidge(None, "ridge", num_classes=NUM_CLASSES, l2=1.0, **keys)
    members = [
        probe,
        OnlineProbeBank(None, "bank", num_classes=NUM_CLASSES, lr=[0.1, 0.01], **keys),
        ridge,
        EmbeddingMonitor(None, "monitor", input="embedding"),
    ]
    values = EpochValues()
    checkpoints = ModelCheckpoint(dirpath=root, every_n_train_steps=BATCHES, save_top_k=-1)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=EPOCHS,
        callbacks=[*members, values, checkpoints],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(Backbone(), ResumableBatches(DATA, BATCH), loader(n=16, seed=1), ckpt_path=ckpt_path)
    return values.values, ridge.ridge.stats.flat.clone()


@pytest.mark.skipif(
    Version(lightning.__version__) < Version("2.6"),
    reason="Lightning 2.4.0 (the floor) resumes a checkpoint written at an epoch's last batch by running one more "
    "batch of that epoch, from a restarted loader (measured), so the backbone itself trains on another stream",
)
def test_a_resume_from_an_epochs_last_batch_logs_the_next_epochs_values_alone(tmp_path):
    whole, whole_stats = _fit(tmp_path / "whole")
    (checkpoint,) = (tmp_path / "whole").glob(f"epoch=0-step={BATCHES}.ckpt")
    resumed, resumed_stats = _fit(tmp_path / "resumed", ckpt_path=str(checkpoint))

    last = EPOCHS - 1
    expected = whole[last]
    assert {"train/probe_top1", "train/probe_loss_epoch", "train/bank_loss_epoch", "train/monitor_rankme"} <= set(
        expected
    )
    assert set(resumed[last]) == set(expected)
    for key, value in expected.items():
        assert resumed[last][key] == pytest.approx(value, rel=1e-5), key
    assert torch.allclose(resumed_stats, whole_stats, rtol=1e-10)  # the ridge's sums: the last epoch's batches alone
