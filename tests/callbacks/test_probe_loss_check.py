"""A probe whose loss refuses the first batch's targets is refused at that batch by name, as docs/online-probe.md says
of any exception the probe raises there.

``loss_fn=nn.BCEWithLogitsLoss()`` with integer multi-hot targets (what ``one_hot`` returns) passed the first-batch
checks, then failed in the first training step with torch's ``RuntimeError: result type Float can't be cast to the
desired output type Long``, naming neither the probe nor the loss. Now the check calls the loss once on the first
batch (no gradient) and reports the failure with the shapes, the dtype and the fix. One real fit per case.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tests.helpers.models import EMBED_DIM, NUM_CLASSES, Backbone, loader, trainer
from torch import nn
from torchmetrics.classification import MultilabelF1Score

from distprobe.callbacks import OnlineProbe


class Tags(Backbone):
    """Adds multi-hot tags (each sample's class, as ``one_hot`` gives it: int64) to the step's outputs."""

    def _tags(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        tags = nn.functional.one_hot(batch["label"], NUM_CLASSES)
        return {"tags": tags, "float_tags": tags.float()}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return {**super().training_step(batch, batch_idx), **self._tags(batch)}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return {**super().validation_step(batch, batch_idx), **self._tags(batch)}


def _probe(target: str) -> OnlineProbe:
    torch.manual_seed(0)
    return OnlineProbe(
        None,
        "tags",
        input="embedding",
        target=target,
        probe=nn.Linear(EMBED_DIM, NUM_CLASSES),
        loss_fn=nn.BCEWithLogitsLoss(),
        optimizer={"type": "SGD", "lr": 0.1},
        metrics={"f1": MultilabelF1Score(NUM_CLASSES)},
    )


def test_a_loss_that_refuses_the_targets_is_reported_at_the_first_batch_by_name():
    expected = (
        r"^probe 'tags': its loss \(BCEWithLogitsLoss\) fails on the probe's outputs of shape \(32, 3\) and the targets"
        r" of shape \(32, 3\) and dtype torch.int64 \(RuntimeError: .*\); give it targets .*\.float\(\)"
    )
    with pytest.raises(ValueError, match=expected):
        trainer([_probe("tags")], max_epochs=1, limit_train_batches=2).fit(Tags(), loader())


def test_the_same_loss_on_float_targets_trains():
    t = trainer([_probe("float_tags")], max_epochs=1, limit_train_batches=3)
    t.fit(Tags(), loader(), loader(n=16, seed=1))
    assert float(t.callback_metrics["eval/tags_f1"]) > 0.0
