"""A dense bank on its own labeled loader (masks) beside an unlabeled pretraining stream, in a real Trainer: the
backbone trains bitwise as without it, and the bank reports mIoU on its own validation loader."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from bank.family_scenario import DENSE_BANK, Masked, PatchModel
from distprobe.callbacks import OnlineProbeBank
from features.taps.models import IN_DIM, NUM_CLASSES
from helpers.models import RandomPoints


def _fit(callbacks):
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    model = PatchModel(seed=0)
    unlabeled = RandomPoints(24, 0, in_dim=IN_DIM, num_classes=NUM_CLASSES)  # its "label" is never read
    trainer.fit(model, DataLoader(unlabeled, batch_size=4), DataLoader(unlabeled, batch_size=4))
    return model, trainer


def test_dense_bank_on_its_own_masks_leaves_the_backbone_bitwise_unchanged():
    bank = OnlineProbeBank(
        None,
        name="seg",
        input="backbone.blocks.1:patch",
        **DENSE_BANK,
        data=DataLoader(Masked(16, 3), batch_size=4, shuffle=True),
        val_data=DataLoader(Masked(7, 4), batch_size=4),
        every_n_steps=2,
        features=lambda module, batch: module.backbone(batch["x"]),
    )
    probed, trainer = _fit([bank])
    alone, _ = _fit([])
    for mine, theirs in zip(probed.parameters(), alone.parameters(), strict=True):
        assert torch.equal(mine, theirs)
    assert bank.bank.micro_step == 2 * 6 // 2  # every 2nd of 6 main batches, 2 epochs
    assert int(bank.bank.skipped_steps.sum()) == 0
    assert 0.0 <= float(trainer.callback_metrics["eval/seg_best_mIoU"]) <= 1.0
