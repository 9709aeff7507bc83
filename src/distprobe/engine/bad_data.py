"""The bad-data policy of the probe step: find bad samples on the device, make them harmless, say why.

A probe is a monitor: a NaN feature or a label out of range late in a run must never take down the training it
watches. On a CUDA device ``cross_entropy`` with a label >= the number of classes raises a device-side assert, which
kills the process's CUDA context and so the whole run. Everything here is a device tensor: no host sync.

The probe step then skips the optimizer step on every rank at once with no extra collective (see
`distprobe.engine.probe`): the bad rank poisons its gradient with NaN, and the all-reduced gradient carries the
verdict to every rank.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

#: Why a micro-batch was bad, in the order of `BadData.counts`; these names appear in logs and warnings.
REASONS = ("nonfinite_features", "targets_out_of_range", "nonfinite_targets")


@dataclass
class BadData:
    """What is wrong with one micro-batch; every field is a device tensor."""

    keep: torch.Tensor
    """``(B,)`` bool: the samples that are fine (what metrics count)."""
    counts: torch.Tensor
    """``(len(REASONS),)`` int64: 1 where the batch has at least one sample bad for that reason."""

    @property
    def any(self) -> torch.Tensor:
        """0-d bool: the batch holds bad data of some kind (its step must be skipped)."""
        return self.counts.any()


def clean_features(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x with non-finite values set to 0, (B,) bool of rows that were finite)``.

    Zeros, not NaN, go through the probe: a NaN in a BatchNorm's running statistics would stay there for good.
    """
    finite_rows = _rows(torch.isfinite(x))
    return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0), finite_rows


def _rows(mask: torch.Tensor) -> torch.Tensor:
    """``(B,)``: whether every element of each sample holds (a 0-d or 1-d mask is already per sample)."""
    return mask.flatten(1).all(dim=1) if mask.ndim > 1 else mask.reshape(-1)


def ignore_index_of(loss_fn: Callable[..., Any]) -> int | None:
    """The label that ``loss_fn`` ignores (CrossEntropyLoss and NLLLoss), else None."""
    if isinstance(loss_fn, nn.CrossEntropyLoss | nn.NLLLoss):
        return int(loss_fn.ignore_index)
    return None


def clean_targets(
    targets: torch.Tensor, preds: torch.Tensor, ignore_index: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(safe targets, (B,) in-range rows, (B,) finite rows, (B,) rows metrics may count)``.

    Class-index targets (integers, one dimension fewer than ``preds``) must lie in ``[0, C)`` with ``C =
    preds.shape[-1]``, or equal the loss's ``ignore_index``; an out-of-range label becomes class 0 so the loss
    cannot fault. Floating-point targets (soft labels, regression) must be finite.
    """
    batch = targets.shape[0] if targets.ndim else 1
    everything = torch.ones(batch, dtype=torch.bool, device=targets.device)
    if targets.is_floating_point():
        finite = _rows(torch.isfinite(targets))
        return torch.nan_to_num(targets, nan=0.0, posinf=0.0, neginf=0.0), everything, finite, finite
    if preds.ndim != targets.ndim + 1:
        return targets, everything, everything, everything
    valid = (targets >= 0) & (targets < preds.shape[-1])
    ignored = targets == ignore_index if ignore_index is not None else torch.zeros_like(valid)
    safe = torch.where(valid | ignored, targets, torch.zeros_like(targets))
    return safe, _rows(valid | ignored), everything, _rows(valid)


def bad_data(
    finite_features: torch.Tensor, in_range: torch.Tensor, finite_targets: torch.Tensor, countable: torch.Tensor
) -> BadData:
    """Combine the per-row checks into the batch's verdict and its reasons (order of `REASONS`)."""
    bad_rows = torch.stack([~finite_features, ~in_range, ~finite_targets])
    return BadData(keep=finite_features & countable & finite_targets, counts=bad_rows.any(dim=1).long())


def poison(loss: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """``loss`` times NaN where ``bad``: its gradient becomes NaN, which the all-reduce spreads to every rank.

    Multiplying (not `torch.where`) is what makes the gradient, not only the value, non-finite.
    """
    return loss * torch.where(bad, float("nan"), 1.0).to(loss.dtype)
