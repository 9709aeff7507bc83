"""First-batch checks of a bank's inputs: a one-time host sync, decided on every rank together by the caller."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def first_batch_problem(
    name: str, inputs: Sequence[str], features: list[Any], targets: Any, num_classes: int
) -> str | None:
    """What is wrong with the first batch for this bank, or None (one host sync, on this batch only)."""
    if not isinstance(targets, torch.Tensor) or targets.ndim != 1 or targets.is_floating_point():
        return (
            f"bank '{name}': the target must be a 1-D tensor of class indices; got "
            f"{type(targets).__name__} {tuple(getattr(targets, 'shape', ()))}."
        )
    for source, f in zip(inputs, features, strict=True):
        if not isinstance(f, torch.Tensor) or f.ndim < 2 or f.shape[0] != targets.shape[0]:
            return (
                f"bank '{name}': input {source!r} must be a (batch, features...) tensor with the target's batch "
                f"size {targets.shape[0]}; got {type(f).__name__} {tuple(getattr(f, 'shape', ()))}. Pool token "
                "outputs first (e.g. a tapped module with ':cls')."
            )
    if targets.numel():
        low, high = int(targets.min()), int(targets.max())
        if low < 0 or high >= num_classes:
            return (
                f"bank '{name}': target labels range over [{low}, {high}] but num_classes={num_classes} (valid "
                f"labels 0..{num_classes - 1}); set num_classes to the number of classes."
            )
    return None
