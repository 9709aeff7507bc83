"""A probe and a bank on their own data (``every_n_steps=3``) write each step's loss to the loggers once.

Between their steps they log nothing, and Lightning wrote their last step values again at every logging step (it
keeps a step value until the epoch ends): with ``log_every_n_steps=1`` each loss appeared under 3 steps of a CSV log.
Now each is written once, at the main batch the probe trained on. The windowed monitor's case is
tests/monitors/test_monitor_window_logs.py. One real `lightning.Trainer` fit with a `CSVLogger`.
"""

from __future__ import annotations

import csv

import torch
from lightning.pytorch.loggers import CSVLogger
from tests.helpers.models import EMBED_DIM, NUM_CLASSES, Backbone, SeparableData, loader, trainer
from torch import nn
from torch.utils.data import DataLoader

from distprobe.callbacks import OnlineProbe, OnlineProbeBank

BATCHES, EVERY = 7, 3


def _embed(pl_module: Backbone, batch: dict) -> torch.Tensor:
    return pl_module.backbone(batch["x"])


def _own() -> dict:
    return {"data": DataLoader(SeparableData(36, seed=5), batch_size=6), "features": _embed, "every_n_steps": EVERY}


def test_own_data_losses_are_written_at_the_probe_steps_only(tmp_path):
    keys = {"input": "embedding", "target": "label"}
    torch.manual_seed(0)
    probe = OnlineProbe(None, "p", probe=nn.Linear(EMBED_DIM, NUM_CLASSES), **keys, **_own())
    bank = OnlineProbeBank(None, "b", num_classes=NUM_CLASSES, lr=[0.1], **keys, **_own())
    logger = CSVLogger(tmp_path)
    trainer([probe, bank], max_epochs=1, logger=logger, log_every_n_steps=1).fit(
        Backbone(), loader(n=BATCHES * 8, batch_size=8)
    )
    with open(f"{logger.log_dir}/metrics.csv") as file:
        rows = list(csv.DictReader(file))
    probe_steps = [batch - 1 for batch in range(EVERY, BATCHES + 1, EVERY)]  # main batches 3 and 6: steps 2 and 5
    for key in ("train/p_loss", "hparams/lr_p", "train/p_skipped_steps", "train/b_loss", "train/b_skipped_steps"):
        assert [int(row["step"]) for row in rows if row.get(key)] == probe_steps, key
