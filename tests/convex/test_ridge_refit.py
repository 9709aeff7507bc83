"""An `OnlineRidge` callback reused by a second fit starts that fit's first epoch from empty statistics.

Its statistics belong to one training epoch (docs/convex.md: "A new training epoch starts new sums"), and a resume
inside an epoch keeps them by the epoch number saved in the checkpoint. Before the fix the number of the last epoch
seen stayed on the callback: a second fit of the same callback (a new Trainer, fine-tuning stages) whose first epoch is
numbered 0 again kept the first fit's sums, and solved its ridge on both fits' samples (here twice the statistics).
"""

from __future__ import annotations

import torch
from tests.helpers.models import NUM_CLASSES, Backbone, loader, trainer

from distprobe.callbacks import OnlineRidge


def _fit(ridge: OnlineRidge) -> torch.Tensor:
    # A backbone that does not learn: both fits see the same features, so their sums must be equal.
    trainer([ridge], max_epochs=1, limit_train_batches=3).fit(Backbone(lr=0.0), loader(), loader(n=20, seed=1))
    return ridge.ridge.stats.flat.clone()


def test_a_second_fit_of_the_same_ridge_callback_starts_new_statistics():
    ridge = OnlineRidge(None, "ridge", input="embedding", target="label", num_classes=NUM_CLASSES, l2=1.0)
    first = _fit(ridge)
    assert first.abs().sum() > 0
    assert torch.equal(_fit(ridge), first)
