"""Counters of what a probe skipped, declared as torchmetrics states so they sync with the other metrics."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric


def mark_updated(metric: Metric) -> None:
    """What torchmetrics' update wrapper records besides the states: an update happened, the cached value is stale.

    Read first and written only when it changes: ``Metric.__setattr__`` costs more host time than the update's
    kernels.
    """
    if metric._update_count == 0:
        metric._update_count = 1
    if metric._computed is not None:
        metric._computed = None


class ReasonCounter(Metric):
    """How many micro-batches held bad data, per reason, summed over the data-parallel group when computed.

    ``update`` adds a device tensor of per-reason counts (no host sync); ``compute`` returns ``{reason: count}``.
    It is never reset by an epoch: the counts run over the whole training, and checkpoints keep them.

    Example:
        >>> counter = ReasonCounter(["nonfinite_features", "targets_out_of_range"])
        >>> counter.update(torch.tensor([0, 1]))
        >>> counter.compute()
        {'nonfinite_features': tensor(0.), 'targets_out_of_range': tensor(1.)}
    """

    full_state_update = False
    counts: torch.Tensor

    def __init__(self, reasons: Sequence[str], key_prefix: str = "") -> None:
        super().__init__(sync_on_compute=True)
        self.reasons = tuple(reasons)
        self.key_prefix = key_prefix
        self.add_state("counts", torch.zeros(len(self.reasons), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, counts: torch.Tensor) -> None:
        """Add one micro-batch's per-reason counts."""
        self.counts += counts.to(self.counts.device)

    def compute(self) -> dict[str, torch.Tensor]:
        """The counts by reason, as floats (what loggers take)."""
        return {f"{self.key_prefix}{reason}": self.counts[i].float() for i, reason in enumerate(self.reasons)}


class RunningMean(Metric):
    """The mean of a per-batch value (a probe's loss) weighted by batch size, summed over ranks when computed.

    ``update`` takes a device tensor and a weight (a batch size, or a device tensor): no host sync.
    """

    full_state_update = False
    total: torch.Tensor
    count: torch.Tensor

    def __init__(self) -> None:
        super().__init__(sync_on_compute=True)
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, value: torch.Tensor, weight: int | torch.Tensor = 1) -> None:
        """Add one batch's value with its weight (a weight of 0 leaves the mean alone, whatever the value)."""
        weight = torch.as_tensor(weight, dtype=self.total.dtype, device=self.total.device)
        self.total += torch.where(weight > 0, value.detach().to(self.total) * weight, 0.0)
        self.count += weight

    def compute(self) -> torch.Tensor:
        """The weighted mean so far (NaN before any update)."""
        return (self.total / self.count).float()
