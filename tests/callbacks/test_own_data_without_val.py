"""Callbacks on their own labeled data with ``val_data=None`` evaluate nothing, and so log no ``eval/`` value.

docs/own-data.md: with ``data=``, the probe ignores the main validation batches; ``val_data`` is its own validation
loader, "or None". Before the fix each callback still computed its validation metrics over zero samples at every
validation end and logged them as values: ``eval/{name}_top1`` 0.0 for a probe and a kNN, NaN for a bank and a ridge
probe (with ``eval/{name}_best_head`` 0), which read as a probe that learned nothing. One real fit on one process,
whose main validation batches carry labels (so nothing but the rule keeps them out), beside a bank that has its own
``val_data`` and must still log.
"""

from __future__ import annotations

import torch
from tests.helpers.models import EMBED_DIM, NUM_CLASSES, Backbone, SeparableData, loader, trainer
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

from distprobe.callbacks import OnlineKNN, OnlineProbe, OnlineProbeBank, OnlineRidge


def _embed(pl_module: Backbone, batch: dict) -> torch.Tensor:
    return pl_module.backbone(batch["x"])


def _own(**kwargs) -> dict:
    return {"data": DataLoader(SeparableData(24, seed=5), batch_size=6), "features": _embed, **kwargs}


def test_own_data_without_val_data_logs_no_eval_values():
    keys = {"input": "embedding", "target": "label"}
    torch.manual_seed(0)
    silent = [
        OnlineProbe(
            None,
            "probe",
            probe=nn.Linear(EMBED_DIM, NUM_CLASSES),
            metrics=MulticlassAccuracy(NUM_CLASSES),
            **keys,
            **_own(),
        ),
        OnlineProbeBank(None, "bank", num_classes=NUM_CLASSES, lr=0.1, **keys, **_own()),
        OnlineKNN(None, "knn", num_classes=NUM_CLASSES, queue_length=12, k=3, **keys, **_own()),
        OnlineRidge(None, "ridge", num_classes=NUM_CLASSES, l2=1.0, **keys, **_own()),
    ]
    own_val = DataLoader(SeparableData(10, seed=6), batch_size=4)
    evaluated = OnlineProbeBank(None, "evaluated", num_classes=NUM_CLASSES, lr=0.1, **keys, **_own(val_data=own_val))
    t = trainer([*silent, evaluated], max_epochs=2, limit_train_batches=3)
    t.fit(Backbone(), loader(n=32), loader(n=13, seed=1, batch_size=8))

    logged = set(t.callback_metrics)
    for name in ("probe", "bank", "knn", "ridge"):
        assert not [key for key in logged if key.startswith(f"eval/{name}")], name
    assert {"train/probe_MulticlassAccuracy", "train/bank_loss_epoch"} <= logged  # they trained
    assert silent[1].best_head_id is None  # nothing chose a head
    assert {"eval/evaluated_best_top1", "eval/evaluated_best_head"} <= logged
    assert evaluated.best_head_id is not None
