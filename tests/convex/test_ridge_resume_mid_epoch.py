"""`OnlineRidge` resumed from a checkpoint taken inside an epoch, in real `lightning.Trainer` fits on one process.

The checkpoint holds the sums of the epoch's batches so far. What the resumed fit adds depends on the training
loader: a resumable one (``state_dict`` / ``load_state_dict``, as torchdata's ``StatefulDataLoader``) continues where
it stopped, and the epoch's sums equal the uninterrupted fit's exactly. A plain DataLoader cannot: Lightning warns
("your dataloader is not resumable") and runs the epoch's remaining number of batches from a fresh pass of the
loader, so the sums hold the first ``k`` batches of the interrupted pass and then the first ``N - k`` batches of a new
one: the same samples the resumed training itself trained on, not the uninterrupted fit's. Both are asserted.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from tests.convex.helpers import gaussian_classes
from torch import nn
from torch.utils.data import DataLoader

from distprobe.callbacks import OnlineRidge
from distprobe.convex import RidgeStatistics

BATCH, BATCHES, STOP_AT, CLASSES, DIM = 8, 8, 3, 3, 6
TRAIN_X, TRAIN_Y, VAL_X, VAL_Y = (t.float() if t.is_floating_point() else t for t in gaussian_classes(64, 40))


def _batch(i: int) -> dict[str, torch.Tensor]:
    rows = slice(i * BATCH, (i + 1) * BATCH)
    return {"x": TRAIN_X[rows], "y": TRAIN_Y[rows]}


class Batches:
    """The training batches in order, as a plain loader gives them: every pass starts at the first batch."""

    def __init__(self) -> None:
        self.start = 0
        self.position = 0

    def __len__(self) -> int:
        return BATCHES

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        start, self.start = self.start, 0
        for i in range(start, BATCHES):
            self.position = i + 1
            yield _batch(i)


class ResumableBatches(Batches):
    """The same batches from a loader that saves its position and continues from it (Lightning's ``_Stateful``)."""

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.start = state["position"]


class Features(pl.LightningModule):
    """The batch's points are the features (the probe reads the batch key ``x``): the model cannot change them."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return (self.weight * batch["x"].sum()).sum() * 0.0

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        return None

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(root, loader, *, max_steps: int = -1, ckpt_path: str | None = None) -> OnlineRidge:
    ridge = OnlineRidge(None, "ridge", input="x", target="y", num_classes=CLASSES, l2=(1e-3, 1.0), in_features=DIM)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        max_steps=max_steps,
        callbacks=[ridge, ModelCheckpoint(dirpath=root, every_n_train_steps=STOP_AT, save_top_k=-1)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    val = DataLoader([{"x": x, "y": y} for x, y in zip(VAL_X, VAL_Y, strict=True)], batch_size=10)
    trainer.fit(Features(), loader, val, ckpt_path=ckpt_path)
    return ridge


def _sums(batches: list[int]) -> torch.Tensor:
    stats = RidgeStatistics(DIM, CLASSES)
    for i in batches:
        stats.update(_batch(i)["x"], _batch(i)["y"])
    return stats.flat


@pytest.mark.parametrize("resumable", [True, False])
def test_a_mid_epoch_resume_sums_the_batches_the_resumed_training_consumed(tmp_path, resumable):
    loader_type = ResumableBatches if resumable else Batches
    whole = _fit(tmp_path / "whole", loader_type())
    assert torch.equal(whole.ridge.stats.flat, _sums(list(range(BATCHES))))

    _fit(tmp_path / "cut", loader_type(), max_steps=STOP_AT)
    (checkpoint,) = (tmp_path / "cut").glob("*.ckpt")
    if resumable:
        resumed = _fit(tmp_path / "resumed", loader_type(), ckpt_path=str(checkpoint))
        assert torch.equal(resumed.ridge.stats.flat, whole.ridge.stats.flat)
        return
    with pytest.warns(UserWarning, match="not resumable"):
        resumed = _fit(tmp_path / "resumed", loader_type(), ckpt_path=str(checkpoint))
    # The interrupted pass's first STOP_AT batches (from the checkpoint), then a fresh pass's first BATCHES - STOP_AT.
    consumed = list(range(STOP_AT)) + list(range(BATCHES - STOP_AT))
    assert torch.allclose(resumed.ridge.stats.flat, _sums(consumed), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(resumed.ridge.stats.flat, whole.ridge.stats.flat)
