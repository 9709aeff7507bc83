"""A multi-label attentive bank and a dense bank in one real `lightning.Trainer` on 2 gloo ranks (`distprobe_ddp`):
sizes from the first batch, one value for every grid argument, uneven batches (3 and 5 samples a step), int32
masks with an unlabeled micro-batch on one rank, windows of 2 micro-batches, and a resume from the epoch-0
checkpoint, which falls mid-window (rank 0's callback state carries every rank's partial gradient).

The resumed fit ends where the uninterrupted one did, bitwise; replicas agree; every logged loss is finite.
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Dataset

from distprobe.callbacks import OnlineProbeBank
from features.taps.models import IN_DIM, NUM_CLASSES, TokenModel
from features.taps.scenario import STRATEGY_RUNS, _dp
from features.taps.scenario import _trainer as tap_trainer
from helpers.dist import run_distributed

#: Per rank, samples a training step: uneven, and 3 steps an epoch on both ranks (odd: epoch 0 ends mid-window).
BATCH = {0: 3, 1: 5}
STEPS, SIDE = 3, 8


class _Rows(Dataset):
    """Points with a multi-hot target of int64 and an int32 (8, 8) mask; the first ``unlabeled`` masks are all 255."""

    def __init__(self, size: int, seed: int, unlabeled: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(size, IN_DIM, generator=g)
        self.labels = (torch.rand(size, NUM_CLASSES, generator=g) < 0.5).long()
        masks = torch.randint(0, NUM_CLASSES, (size, SIDE, SIDE), generator=g)
        masks[:unlabeled] = 255
        self.masks = masks.to(torch.int32)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"x": self.x[i], "labels": self.labels[i], "mask": self.masks[i]}


class _Data(pl.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        rank, _ = _dp(self.trainer)
        # Rank 0's first step has no labeled pixel.
        return DataLoader(_Rows(BATCH[rank] * STEPS, rank, unlabeled=3 if rank == 0 else 0), batch_size=BATCH[rank])

    def val_dataloader(self) -> DataLoader:
        rank, _ = _dp(self.trainer)
        return DataLoader(_Rows(4, 10 + rank), batch_size=2)


def _banks() -> list[OnlineProbeBank]:
    grid: dict[str, Any] = dict(
        num_classes=NUM_CLASSES,
        lr=0.05,
        weight_decay=0.01,
        normalization=None,
        optimizer={"type": "AdamW"},
        accumulate_grad_batches=2,
    )
    return [
        OnlineProbeBank(
            None,
            name="ml",
            input="backbone.blocks.1:tokens",
            target="labels",
            head="attentive",
            head_options={"num_heads": 2, "depth": 2},
            multilabel=True,
            **grid,
        ),
        OnlineProbeBank(None, name="seg", input="backbone.blocks.1:patch", target="mask", head="dense", **grid),
    ]


def _state(banks: list[OnlineProbeBank], trainer: pl.Trainer) -> dict[str, Any]:
    return {
        "flat": {b.name: b.bank.heads.flat.detach().clone() for b in banks},
        "micro_step": {b.name: b.bank.micro_step for b in banks},
        "logged": {k: float(v) for k, v in trainer.callback_metrics.items()},
    }


def _run(rank: int, world_size: int, tmp: str) -> dict[str, Any]:
    ckpt_dir = os.path.join(tmp, "ckpt")
    banks = _banks()
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    trainer = tap_trainer(STRATEGY_RUNS["ddp"], [*banks, checkpoint], max_epochs=2, enable_checkpointing=True)
    trainer.fit(TokenModel(seed=0), datamodule=_Data())
    results = {"straight": _state(banks, trainer)}
    saved = torch.load(os.path.join(ckpt_dir, "epoch=0.ckpt"), weights_only=False)["callbacks"]
    results["saved_micro_step"] = {k: v["micro_step"] for k, v in saved.items() if "OnlineProbeBank" in k}
    banks = _banks()
    trainer = tap_trainer(STRATEGY_RUNS["ddp"], list(banks), max_epochs=2)
    trainer.fit(TokenModel(seed=0), datamodule=_Data(), ckpt_path=os.path.join(ckpt_dir, "epoch=0.ckpt"))
    results["resumed"] = _state(banks, trainer)
    return results


@pytest.mark.distributed
@pytest.mark.slow
def test_families_resume_mid_window_on_two_ranks_with_uneven_batches(tmp_path):
    ranks = run_distributed(_run, 2, str(tmp_path), timeout=300.0)
    first = ranks[0]
    assert set(first["saved_micro_step"].values()) == {STEPS}  # 3 micro-batches, windows of 2: mid-window
    for result in ranks:
        straight, resumed = result["straight"], result["resumed"]
        for name, flat in straight["flat"].items():
            assert torch.equal(flat, first["straight"]["flat"][name]), name  # replicas agree
            assert torch.equal(resumed["flat"][name], flat), name
            assert resumed["micro_step"][name] == straight["micro_step"][name] == 2 * STEPS
        for key in ("train/seg_loss_epoch", "train/ml_loss_epoch", "eval/seg_best_mIoU", "eval/ml_best_mAP"):
            assert torch.isfinite(torch.tensor(straight["logged"][key])), (key, straight["logged"])
