"""A dense bank's micro-batch without a labeled pixel (every label ``ignore_index``): its step loss is 0, never NaN,
and it weighs nothing in the epoch's loss; in the plain-torch bank and in a real `lightning.Trainer` with its
CSVLogger."""

import csv
import math

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from tests.bank.test_audit_dense import _Masked
from torch.utils.data import DataLoader

from distprobe.bank import BankConfig, ProbeBank
from distprobe.callbacks import OnlineProbeBank
from features.taps.models import NUM_CLASSES, TokenModel
from helpers.models import trainer

D, C, SIDE = 8, 3, 8


def _rows(path: str, key: str) -> list[float]:
    with open(path) as f:
        return [float(row[key]) for row in csv.DictReader(f) if row.get(key)]


def test_a_lightning_fit_logs_a_zero_step_loss_for_a_batch_without_a_labeled_pixel(tmp_path):
    """The unlabeled batch's ``train/seg_loss`` was NaN (0 / 0) in the logger's file; the epoch's value was right."""
    patches = "backbone.blocks.1:patch"
    bank = OnlineProbeBank(
        None, name="seg", input=patches, target="mask", num_classes=NUM_CLASSES, lr=0.1, head="dense"
    )
    logger = CSVLogger(tmp_path, name="run", version=0)
    t = trainer([bank], max_epochs=1, logger=logger, log_every_n_steps=1, limit_val_batches=0)
    # Four batches of 4: the first has no labeled pixel.
    t.fit(TokenModel(seed=0), DataLoader(_Masked(16, 0, torch.int64, unlabeled=4), batch_size=4))
    steps = _rows(f"{logger.log_dir}/metrics.csv", "train/seg_loss")
    assert len(steps) == 4 and all(math.isfinite(v) for v in steps), steps
    assert steps[0] == 0.0 and all(v > 0 for v in steps[1:])
    # The step that had nothing to learn from weighs nothing: the epoch's loss is the mean of the others (equal sizes).
    (epoch,) = _rows(f"{logger.log_dir}/metrics.csv", "train/seg_loss_epoch")
    assert epoch == pytest.approx(sum(steps[1:]) / 3, rel=1e-5)


def _bank() -> ProbeBank:
    config = BankConfig(
        name="seg",
        family="dense",
        inputs=["x"],
        num_classes=C,
        lr=[0.1, 0.2],
        normalization=[None, "batchnorm"],
        in_features=D,
        head_options={"samples_per_step": None},
    )
    return ProbeBank.build(config)


def _batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        masks = torch.randint(0, C, (4, SIDE, SIDE), generator=g)
        out.append((torch.randn(4, 4, D, generator=g), masks))
    out[0][1][:] = 255  # the first micro-batch: unlabeled images only
    return out


def test_the_family_s_mean_loss_is_zero_without_a_labeled_pixel():
    bank = _bank()
    x, masks = _batches(1)[0]
    logits = bank.heads([x])
    assert torch.equal(bank.heads.loss(logits, masks), torch.zeros(4))


def test_the_plain_bank_s_step_loss_is_zero_and_the_epoch_loss_is_unchanged():
    bank = _bank()
    losses = [bank.train_step([x], masks).loss for x, masks in _batches(3)]
    assert torch.equal(losses[0], torch.zeros(4)) and torch.isfinite(torch.stack(losses)).all()
    values = bank.compute_train_metrics()
    expected = torch.stack(losses[1:]).mean(dim=0)  # the other steps, of equal batch sizes
    for head in bank.heads.head_list:
        torch.testing.assert_close(values[f"{head.head_id}_loss"], expected[head.index])
    torch.testing.assert_close(values["loss_epoch"], expected.mean())
