"""Worker for tests/convex/test_ridge_selection_positions.py: one frozen-backbone fit per validation layout.

Training: 64 random points, batches of 8, Lightning's own (shuffling) training sampler; the ridge's statistics are
a sum over the epoch, so every world size sums the same samples. Validation layouts:

- ``two_loaders``: two validation loaders of 21 and 19 samples (odd: the ranks' shares are uneven), in order;
- ``shuffled``: one loader of 41 samples with ``shuffle=True`` (Lightning's validation `DistributedSampler` then
  shuffles on N ranks; the one-process reference reads the set in order).
"""

from __future__ import annotations

from typing import Any

from tests.helpers.models import IN_DIM, Backbone, RandomPoints
from tests.helpers.models import trainer as make_trainer
from torch.utils.data import DataLoader

from distprobe.callbacks import OnlineRidge

NUM_CLASSES = 3
L2 = (1e-3, 1.0, 30.0, 1e3)
LAYOUTS = ("two_loaders", "shuffled")


class _Backbone(Backbone):
    """The shared frozen backbone, with several validation loaders."""

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        return super().validation_step(batch, batch_idx)


def _val_loaders(layout: str, world_size: int) -> list[DataLoader]:
    if layout == "two_loaders":
        sizes = (21, 19)
        return [DataLoader(RandomPoints(n, 10 + i, IN_DIM, NUM_CLASSES), batch_size=4) for i, n in enumerate(sizes)]
    return [DataLoader(RandomPoints(41, 20, IN_DIM, NUM_CLASSES), batch_size=4, shuffle=world_size > 1)]


def fit(rank: int, world_size: int) -> dict[str, dict[str, Any]]:
    """What the ridge logged at the one validation of each layout's fit, on this rank."""
    import distprobe.strategies  # noqa: F401 - registers distprobe_ddp

    logged = {}
    for layout in LAYOUTS:
        ridge = OnlineRidge(None, "ridge", input="embedding", target="label", num_classes=NUM_CLASSES, l2=L2)
        strategy = "distprobe_ddp" if world_size > 1 else "auto"
        trainer = make_trainer([ridge], max_epochs=1, devices=world_size, strategy=strategy)
        train = DataLoader(RandomPoints(64, 0, IN_DIM, NUM_CLASSES), batch_size=8)
        trainer.fit(_Backbone(lr=0.0), train, _val_loaders(layout, world_size))
        values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("eval/ridge")}
        logged[layout] = values
    return logged
