"""Worker for the tests that a probe chooses its best configuration on the same validation samples at any world size
(tests/convex/test_ridge_selection_positions.py, tests/bank/test_positions_bank_selection.py): one frozen-backbone
fit per validation layout, of an `OnlineRidge` (``probe="ridge"``) or an `OnlineProbeBank` (``probe="bank"``).

Training: 64 random points, batches of 8. The ridge reads them through Lightning's own (shuffling) training sampler:
its statistics are a sum over the epoch, so every world size sums the same samples. The bank's heads follow their
steps, so every rank takes the same 8 batches in the same order (an iterable that Lightning does not shard): the
all-reduced gradient is each rank's own, and the heads are bitwise those of one process. Validation layouts:

- ``two_loaders``: two validation loaders of 21 and 19 samples (odd: the ranks' shares are uneven), in order;
- ``shuffled``: one loader of 41 samples with ``shuffle=True`` (Lightning's validation `DistributedSampler` then
  shuffles on N ranks; the one-process reference reads the set in order).
"""

from __future__ import annotations

from typing import Any

from tests.helpers.models import IN_DIM, Backbone, RandomPoints, ResumableBatches
from tests.helpers.models import trainer as make_trainer
from torch.utils.data import DataLoader

from distprobe.callbacks import OnlineProbeBank, OnlineRidge

NUM_CLASSES = 3
L2 = (1e-3, 1.0, 30.0, 1e3)
LAYOUTS = ("two_loaders", "shuffled")
PROBES = ("ridge", "bank")


class _Backbone(Backbone):
    """The shared frozen backbone, with several validation loaders."""

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        return super().validation_step(batch, batch_idx)


def _val_loaders(layout: str, world_size: int) -> list[DataLoader]:
    if layout == "two_loaders":
        sizes = (21, 19)
        return [DataLoader(RandomPoints(n, 10 + i, IN_DIM, NUM_CLASSES), batch_size=4) for i, n in enumerate(sizes)]
    return [DataLoader(RandomPoints(41, 20, IN_DIM, NUM_CLASSES), batch_size=4, shuffle=world_size > 1)]


def _probe(kind: str) -> Any:
    if kind == "ridge":
        return OnlineRidge(None, "ridge", input="embedding", target="label", num_classes=NUM_CLASSES, l2=L2)
    lrs, decays = (0.01, 0.3, 3.0), (0.0, 0.1)
    return OnlineProbeBank(None, "bank", "embedding", "label", NUM_CLASSES, lr=lrs, weight_decay=decays)


def _train_data(kind: str) -> Any:
    points = RandomPoints(64, 0, IN_DIM, NUM_CLASSES)
    return DataLoader(points, batch_size=8) if kind == "ridge" else ResumableBatches(points, batch_size=8)


def fit(rank: int, world_size: int, probe: str = "ridge") -> dict[str, dict[str, Any]]:
    """What the probe (one of `PROBES`) logged at the one validation of each layout's fit, on this rank."""
    import distprobe.strategies  # noqa: F401 - registers distprobe_ddp

    logged = {}
    for layout in LAYOUTS:
        callback = _probe(probe)
        strategy = "distprobe_ddp" if world_size > 1 else "auto"
        trainer = make_trainer([callback], max_epochs=1, devices=world_size, strategy=strategy)
        trainer.fit(_Backbone(lr=0.0), _train_data(probe), _val_loaders(layout, world_size))
        values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(f"eval/{probe}")}
        logged[layout] = values
    return logged
