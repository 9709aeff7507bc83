"""The bad-data policy of the probe step: find bad samples on the device, make them harmless, say why.

A probe is a monitor: a NaN feature or a label out of range late in a run must never take down the training it
watches. On a CUDA device ``cross_entropy`` with a label >= the number of classes raises a device-side assert, which
kills the process's CUDA context and so the whole run. Everything here is a device tensor: no host sync, and as few
kernels as the checks allow (on a GPU the probe step's cost is its host time, one launch per op).

The probe step then skips the optimizer step on every rank at once with no extra collective (see
`distprobe.engine.probe`): the bad rank poisons its gradient with NaN, and the all-reduced gradient carries the
verdict to every rank.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from distprobe.engine.batchnorm import GroupBatchNorm

#: Why a micro-batch was bad, in the order of `Verdict.counts`; these names appear in logs and warnings.
REASONS = ("nonfinite_features", "targets_out_of_range", "nonfinite_targets")


@dataclass
class Verdict:
    """What is wrong with one micro-batch; every field is a device tensor."""

    keep: torch.Tensor
    """``(B,)`` bool: the samples metrics may count."""
    counts: torch.Tensor
    """``(len(REASONS),)`` bool: where the batch holds bad data for that reason (added to the long counters)."""
    bad: torch.Tensor
    """0-d bool: the batch holds bad data of some kind (its step must be skipped)."""


@functools.cache
def _true(device: torch.device) -> torch.Tensor:
    # Read, never written: one constant per device for the whole process.
    return torch.ones((), dtype=torch.bool, device=device)


def ignore_index_of(loss_fn: Callable[..., Any]) -> int | None:
    """The label that ``loss_fn`` ignores (CrossEntropyLoss and NLLLoss), else None."""
    if isinstance(loss_fn, nn.CrossEntropyLoss | nn.NLLLoss):
        return int(loss_fn.ignore_index)
    return None


def finite_features(x: torch.Tensor) -> torch.Tensor:
    """0-d bool: every feature of the batch is finite.

    A probe without BatchNorm needs no pass over the features: a non-finite feature makes its loss non-finite, so
    ``torch.isfinite(loss)`` on valid targets says the same in one kernel on a scalar (and also catches a probe whose
    outputs overflow). A probe with BatchNorm sees features with NaNs zeroed (`zero_nonfinite`), so it asks here.
    """
    return torch.isfinite(x).all()


def zero_nonfinite(x: torch.Tensor) -> torch.Tensor:
    """``x`` with NaN and infinities set to 0.

    What goes through a probe with BatchNorm, whose statistics would keep a NaN for good (they are restored after a
    skipped batch, but the group's statistics include this rank's).
    """
    return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


def check_targets(
    targets: torch.Tensor, preds: torch.Tensor, ignore_index: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(safe targets, (B,) samples metrics may count, 0-d in range, 0-d finite)``.

    Class-index targets (integers, one dimension fewer than ``preds``) must lie in ``[0, C)`` with ``C =
    preds.shape[-1]``, or equal the loss's ``ignore_index``; an out-of-range label becomes class 0 so that the loss
    cannot fault; they come back as int64, whatever integer type they came in. Floating-point targets (soft labels,
    regression) must be finite. Other targets are taken as they are.
    """
    true = _true(targets.device)
    if targets.is_floating_point():
        finite = torch.isfinite(targets)
        rows = finite.flatten(1).all(dim=1) if finite.ndim > 1 else finite
        return torch.nan_to_num(targets, nan=0.0, posinf=0.0, neginf=0.0), rows, true, finite.all()
    if preds.ndim != targets.ndim + 1:
        return targets, true.expand(targets.shape[:1]), true, true
    if targets.dtype != torch.long:  # int32 or uint8 labels (numpy's, a dataset's): torch's losses take int64
        targets = targets.long()
    # Clamping puts every label in range; where it changed a label, that label was out of range. Three kernels, or
    # five with the loss's ignore_index, which must reach the loss unchanged.
    clamped = targets.clamp(0, preds.shape[-1] - 1)
    valid = clamped == targets
    rows = valid.flatten(1).all(dim=1) if valid.ndim > 1 else valid
    if ignore_index is None:
        return clamped, rows, valid.all(), true
    ignored = targets == ignore_index
    return torch.where(ignored, targets, clamped), rows, (valid | ignored).all(), true


def verdict(
    features_ok: torch.Tensor, countable: torch.Tensor, in_range: torch.Tensor, finite: torch.Tensor
) -> Verdict:
    """The batch's verdict from its checks (reasons in the order of `REASONS`).

    ``features_ok`` is 0-d (training: the whole batch) or ``(B,)`` (evaluation: sample by sample).
    """
    whole_batch = features_ok.all() if features_ok.ndim else features_ok
    counts = torch.stack([whole_batch, in_range, finite]).logical_not()
    return Verdict(keep=countable & features_ok, counts=counts, bad=counts.any())


def untrainable_verdict(batch_size: int, device: torch.device) -> Verdict:
    """The verdict of a micro-batch too small to train on: no sample or reason counted, the step skipped."""
    return Verdict(
        keep=torch.zeros(batch_size, dtype=torch.bool, device=device),
        counts=torch.zeros(len(REASONS), dtype=torch.bool, device=device),
        bad=_true(device),
    )


def batchnorm_kinds(module: nn.Module) -> tuple[bool, bool]:
    """Whether ``module`` holds a BatchNorm over this rank's batch alone, and a `GroupBatchNorm` over the group's.

    torch refuses a local BatchNorm one sample in training; a group's (a probe's BatchNorm on two or more ranks,
    `distprobe.engine.batchnorm`) normalises with the whole group's batch, so one sample on a rank is enough for it.
    """
    layers = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return any(not isinstance(m, GroupBatchNorm) for m in layers), any(isinstance(m, GroupBatchNorm) for m in layers)


def row_checks(x: torch.Tensor) -> torch.Tensor:
    """``(B,)`` bool: the samples whose features are all finite (for evaluation, where samples count one by one)."""
    finite = torch.isfinite(x)
    return finite.flatten(1).all(dim=1) if finite.ndim > 1 else finite


def poison(loss: torch.Tensor, bad: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``loss * scale`` (the accumulation scale), or ``loss`` times NaN where ``bad``.

    A NaN gradient is what the all-reduce spreads to every rank, so that every rank skips the step. Multiplying
    (not `torch.where` on the loss) is what makes the gradient, not only the value, non-finite; one factor serves
    both, so the poison costs no kernel over the accumulation scaling.
    """
    return loss * torch.where(bad, float("nan"), scale)
