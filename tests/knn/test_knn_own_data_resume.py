"""`OnlineKNN` on its own labeled data, resumed from a checkpoint written inside an epoch (docs/own-data.md said this
was not tested yet).

The buffer is filled from the kNN's own loader every ``every_n_steps`` main batches; the checkpoint holds the buffer
and the own loader's position. A new Trainer resumed from a checkpoint inside an epoch (a resumable main loader, so
the main batches are the uninterrupted fit's) must end with the uninterrupted fit's buffer and validation values.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from tests.helpers.models import NUM_CLASSES, Backbone, ResumableBatches, SeparableData
from torch.utils.data import DataLoader

from distprobe.callbacks import OnlineKNN

BATCHES, BATCH, EPOCHS, EVERY = 6, 8, 2, 2
MAIN = SeparableData(BATCHES * BATCH, seed=3)


def _embed(pl_module: Backbone, batch: dict) -> torch.Tensor:
    return pl_module.backbone(batch["x"])


def _fit(root: Any, ckpt_path: str | None = None) -> tuple[OnlineKNN, dict[str, float]]:
    knn = OnlineKNN(
        None,
        "knn",
        input="embedding",
        target="label",
        num_classes=NUM_CLASSES,
        queue_length=10,  # smaller than what the fit pushes: the ring wraps, so its pointer must resume too
        k=(1, 5),
        data=DataLoader(SeparableData(21, seed=5), batch_size=4, shuffle=True),
        val_data=DataLoader(SeparableData(13, seed=6), batch_size=4),
        features=_embed,
        every_n_steps=EVERY,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=EPOCHS,
        callbacks=[knn, ModelCheckpoint(dirpath=root, every_n_train_steps=3, save_top_k=-1)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    unlabeled_val = DataLoader([{"x": torch.zeros(8)}], batch_size=1)  # only to run validation epochs
    trainer.fit(Backbone(), ResumableBatches(MAIN, BATCH), unlabeled_val, ckpt_path=ckpt_path)
    return knn, {k: float(v) for k, v in trainer.callback_metrics.items()}


@pytest.mark.parametrize("step", [3, 9], ids=["epoch0_batch3", "epoch1_batch3"])
def test_a_knn_on_its_own_data_resumed_inside_an_epoch_ends_as_the_uninterrupted_fit(tmp_path, step):
    whole, whole_values = _fit(tmp_path / "whole")
    (checkpoint,) = (tmp_path / "whole").glob(f"*-step={step}.ckpt")
    resumed, resumed_values = _fit(tmp_path / "resumed", ckpt_path=str(checkpoint))

    assert set(whole_values) == {"eval/knn_top1", "eval/knn_k1_top1", "eval/knn_k5_top1"}
    assert resumed_values == whole_values
    assert torch.equal(resumed.knn.shard.features, whole.knn.shard.features)
    assert torch.equal(resumed.knn.shard.labels, whole.knn.shard.labels)
