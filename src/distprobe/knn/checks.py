"""First-batch checks of a kNN's input and target (one host sync, decided on every rank together by the caller)."""

from __future__ import annotations

from typing import Any

import torch


def first_batch_problem(name: str, input_key: str, features: Any, targets: Any, num_classes: int) -> str | None:
    """What is wrong with the first batch for the kNN ``name``, or None."""
    if not isinstance(targets, torch.Tensor) or targets.ndim != 1 or targets.is_floating_point():
        return (
            f"kNN '{name}': the target must be a 1-D tensor of class indices; got "
            f"{type(targets).__name__} {tuple(getattr(targets, 'shape', ()))}."
        )
    if not isinstance(features, torch.Tensor) or features.ndim < 2 or features.shape[0] != targets.shape[0]:
        return (
            f"kNN '{name}': input {input_key!r} must be a (batch, features...) tensor with the target's batch size "
            f"{targets.shape[0]}; got {type(features).__name__} {tuple(getattr(features, 'shape', ()))}."
        )
    if targets.numel():
        low, high = int(targets.min()), int(targets.max())
        if low < 0 or high >= num_classes:
            return (
                f"kNN '{name}': target labels range over [{low}, {high}] but num_classes={num_classes} (valid labels "
                f"0..{num_classes - 1}); set num_classes to the number of classes."
            )
    return None
