"""A probe and a bank on their own data run their named schedule over their own steps, not the main batches.

With ``every_n_steps=4`` they step once every 4 main batches, but the schedule's length came from the main batches
alone: ``CosineAnnealingLR`` got ``T_max`` 4 times the probe's steps and ended the fit a quarter of the way down
(lr 0.085 of 0.1 instead of 0). Now the length counts the probe's own steps, and the cosine ends at ``eta_min``.
One real `lightning.Trainer` fit.
"""

from __future__ import annotations

import pytest
import torch
from tests.helpers.models import EMBED_DIM, NUM_CLASSES, Backbone, SeparableData, loader, trainer
from torch import nn
from torch.utils.data import DataLoader

from distprobe.callbacks import OnlineProbe, OnlineProbeBank

MAIN_BATCHES, EPOCHS, EVERY, LR = 8, 2, 4, 0.1


def _embed(pl_module: Backbone, batch: dict) -> torch.Tensor:
    return pl_module.backbone(batch["x"])


def _own() -> dict:
    return {"data": DataLoader(SeparableData(36, seed=5), batch_size=6), "features": _embed, "every_n_steps": EVERY}


def test_own_data_schedules_end_with_the_probes_own_steps():
    keys = {"input": "embedding", "target": "label", "scheduler": "CosineAnnealingLR"}
    torch.manual_seed(0)
    probe = OnlineProbe(None, "p", probe=nn.Linear(EMBED_DIM, NUM_CLASSES), optimizer={"type": "SGD", "lr": LR}, **keys)
    probe_on_own_data = OnlineProbe(
        None, "own", probe=nn.Linear(EMBED_DIM, NUM_CLASSES), optimizer={"type": "SGD", "lr": LR}, **keys, **_own()
    )
    bank_on_own_data = OnlineProbeBank(None, "bank", num_classes=NUM_CLASSES, lr=[LR], **keys, **_own())
    t = trainer([probe, probe_on_own_data, bank_on_own_data], max_epochs=EPOCHS)
    t.fit(Backbone(), loader(n=MAIN_BATCHES * 8, batch_size=8))

    steps = MAIN_BATCHES * EPOCHS
    assert probe.probe.scheduler.T_max == steps  # the main-batch probe: unchanged
    assert probe_on_own_data.probe.scheduler.T_max == steps // EVERY
    assert probe_on_own_data.probe.current_lr() == pytest.approx(0.0, abs=1e-12)
    assert bank_on_own_data.bank.optimizer.rates.current_lrs() == pytest.approx([0.0], abs=1e-12)
