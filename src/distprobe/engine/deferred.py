"""Train-step bookkeeping folded into the metric states a few steps at a time, for a probe and a bank alike.

On a GPU a probe step's kernels are tiny and its cost is host time, about one launch per op. The mean loss, the
bad-data counts and the train metrics each need a few ops per step; kept as the step's device tensors (a list append,
no op) and folded in every few micro-steps, they cost the ops of one step for all of them. Nothing here reads the
device: folding is as sync-free as the step itself.

`DeferredSteps` keeps the values and sums them (a loss per head: 0-d for a probe, ``(K,)`` for a bank); the owner
says where the sums go. `DeferredUpdates` is a probe's, folding into its `ProbeMetrics`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch

from distprobe import keys
from distprobe.metrics.collection import ProbeMetrics
from distprobe.metrics.counters import ReasonCounter, RunningMean, mark_updated
from distprobe.metrics.sync_free import update_collection

#: Fold after this many micro-steps, or once the kept predictions hold this many elements (4M: 16 MB in fp32).
FOLD_EVERY = 16
FOLD_ELEMENTS = 4 * 2**20


@dataclass
class Folded:
    """The sums of the kept steps, ready to add to metric states."""

    loss_total: torch.Tensor
    """float64, a loss per head: the batch-size-weighted sum of the losses of steps not skipped."""
    loss_count: torch.Tensor
    """float64 0-d: the samples of the steps not skipped (the weights' sum)."""
    reasons: torch.Tensor
    """``(len(REASONS),)`` long: bad batches by reason."""
    predictions: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    """``(preds, targets, keep)`` of every kept step, concatenated along the batch; None when none were kept."""


class DeferredSteps:
    """The per-step values not yet folded into metric states (`fold` before reading any metric).

    Args:
        fold_into: Adds a `Folded` to the owner's metric states.
        keeps_predictions: Whether predictions are kept at all (no train metrics: none are).
    """

    def __init__(self, fold_into: Callable[[Folded], None], keeps_predictions: Callable[[], bool]) -> None:
        self._fold_into = fold_into
        self._keeps_predictions = keeps_predictions
        self.losses: list[torch.Tensor] = []
        self.weights: list[torch.Tensor] = []
        self.reasons: list[torch.Tensor] = []
        self.predictions: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.elements = 0

    def add(
        self,
        loss: torch.Tensor,
        bad: torch.Tensor,
        batch_size: int,
        reasons: torch.Tensor,
        preds: torch.Tensor,
        targets: torch.Tensor,
        keep: torch.Tensor,
    ) -> None:
        """Keep one micro-step's values (``bad``: its step is skipped, so its loss does not count); fold when due."""
        self.losses.append(loss)
        self.weights.append(torch.where(bad, 0.0, float(batch_size)))
        self.reasons.append(reasons)
        if self._keeps_predictions():
            self.predictions.append((preds, targets, keep))
            self.elements += preds.numel()
        if len(self.losses) >= FOLD_EVERY or self.elements >= FOLD_ELEMENTS:
            self.fold()

    def fold(self) -> None:
        """Add everything kept to the metric states, with a handful of ops whatever the number of steps."""
        if not self.losses:
            return
        losses = torch.stack(self.losses).double()  # (S, ...) a loss per head
        weights = torch.stack(self.weights).double()  # (S,)
        per_step = weights.view(-1, *([1] * (losses.ndim - 1)))
        predictions = None
        if self.predictions:
            # One step's predictions are folded as they are: a cat would copy them (33 MB for a 64-head bank).
            preds, targets, keep = (
                parts[0] if len(parts) == 1 else torch.cat(parts) for parts in zip(*self.predictions, strict=True)
            )
            predictions = (preds, targets, keep)
        self._fold_into(
            Folded(
                loss_total=torch.where(per_step > 0, losses * per_step, 0.0).sum(dim=0),
                loss_count=weights.sum(),
                reasons=torch.stack(self.reasons).sum(dim=0),
                predictions=predictions,
            )
        )
        self.discard()

    def discard(self) -> None:
        """Forget what was kept without folding it (the epoch's train metrics are being reset anyway)."""
        self.losses.clear()
        self.weights.clear()
        self.reasons.clear()
        self.predictions.clear()
        self.elements = 0


def add_reasons(counter: ReasonCounter, reasons: torch.Tensor) -> None:
    """Add summed bad-batch counts to a run-long counter."""
    counter.counts.add_(reasons)
    mark_updated(counter)


class DeferredUpdates(DeferredSteps):
    """A probe's deferred steps, folded into its `ProbeMetrics` (mean loss, bad batches, train metrics)."""

    def __init__(self, metrics: ProbeMetrics) -> None:
        super().__init__(self._fold_into_metrics, lambda: bool(len(metrics.train)))
        self.metrics = metrics

    def _fold_into_metrics(self, folded: Folded) -> None:
        add_reasons(cast(ReasonCounter, self.metrics.bad_batches[keys.BAD_BATCHES]), folded.reasons)
        mean = cast(RunningMean, self.metrics.loss[keys.LOSS_EPOCH])
        mean.total.add_(folded.loss_total)
        mean.count.add_(folded.loss_count)
        mark_updated(mean)
        if folded.predictions is not None:
            update_collection(self.metrics.train, *folded.predictions)
