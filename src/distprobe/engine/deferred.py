"""Train-step bookkeeping folded into the metric states a few steps at a time.

On a GPU a probe step's kernels are tiny and its cost is host time, about one launch per op. The mean loss, the
bad-data counts and the train metrics each need a few ops per step; kept as the step's device tensors (a list append,
no op) and folded in every few micro-steps, they cost the ops of one step for all of them. Nothing here reads the
device: folding is as sync-free as the step itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import torch

from distprobe.metrics.collection import ProbeMetrics
from distprobe.metrics.counters import ReasonCounter, RunningMean, mark_updated
from distprobe.metrics.sync_free import update_collection

#: Fold after this many micro-steps, or once the kept predictions hold this many elements (4M: 16 MB in fp32).
FOLD_EVERY = 16
FOLD_ELEMENTS = 4 * 2**20


@dataclass
class DeferredUpdates:
    """The per-step values of one probe not yet folded into its metrics (`fold` before reading any metric)."""

    metrics: ProbeMetrics
    losses: list[torch.Tensor] = field(default_factory=list)
    skipped: list[torch.Tensor] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    reasons: list[torch.Tensor] = field(default_factory=list)
    predictions: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    elements: int = 0

    def add(
        self,
        loss: torch.Tensor,
        skipped: torch.Tensor,
        batch_size: int,
        reasons: torch.Tensor,
        preds: torch.Tensor,
        targets: torch.Tensor,
        keep: torch.Tensor,
    ) -> None:
        """Keep one micro-step's values; fold when enough have gathered."""
        self.losses.append(loss)
        self.skipped.append(skipped)
        self.batch_sizes.append(batch_size)
        self.reasons.append(reasons)
        if len(self.metrics.train):
            self.predictions.append((preds, targets, keep))
            self.elements += preds.numel()
        if len(self.losses) >= FOLD_EVERY or self.elements >= FOLD_ELEMENTS:
            self.fold()

    def fold(self) -> None:
        """Add everything kept to the metric states, with a handful of ops whatever the number of steps."""
        if not self.losses:
            return
        counter = cast(ReasonCounter, self.metrics.bad_batches["bad_batches"])
        counter.counts.add_(torch.stack(self.reasons).sum(dim=0))
        mark_updated(counter)
        mean = cast(RunningMean, self.metrics.loss["loss_epoch"])
        for size in set(self.batch_sizes):  # one group in the usual case of equal batch sizes
            steps = [i for i, s in enumerate(self.batch_sizes) if s == size]
            skipped = torch.stack([self.skipped[i] for i in steps])
            losses = torch.stack([self.losses[i] for i in steps])
            mean.total.add_(torch.where(skipped, 0.0, losses).sum(), alpha=size)
            mean.count.add_(skipped.logical_not().sum(), alpha=size)
        mark_updated(mean)
        if self.predictions:
            preds, targets, keep = (torch.cat(parts) for parts in zip(*self.predictions, strict=True))
            update_collection(self.metrics.train, preds, targets, keep)
        self.discard()

    def discard(self) -> None:
        """Forget what was kept without folding it (the epoch's train metrics are being reset anyway)."""
        self.losses.clear()
        self.skipped.clear()
        self.batch_sizes.clear()
        self.reasons.clear()
        self.predictions.clear()
        self.elements = 0
