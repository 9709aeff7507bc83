"""First-batch checks of every trainable kind's input, decided collectively so that bad input never hangs a rank.

Each check reads the first batch once (a one-time host sync, never on later steps) and returns a message or None;
`raise_if_any_rank_failed` then raises the same error on every rank. A probe checks its features against its own
outputs; a bank, a kNN and a ridge probe (`class_index_problem`, `multi_hot_problem`) check their targets against
``num_classes``, and a kNN and a ridge probe whose engine is built check the features' width
(`flat_input_problem`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from distprobe.engine.collectives import default_group, raise_if_any_rank_failed
from distprobe.engine.probe import Probe

__all__ = [
    "class_index_problem",
    "first_batch_problem",
    "flat_input_problem",
    "multi_hot_problem",
    "raise_if_any_rank_failed",
    "world_check_group",
]


def _described(value: Any) -> str:
    dtype = getattr(value, "dtype", None)  # a float tensor of the right shape is refused for its dtype: say it
    return f"{type(value).__name__} {tuple(getattr(value, 'shape', ()))}" + (
        f" of {dtype}" if dtype is not None else ""
    )


def _is_float_vector(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.ndim == 1 and value.is_floating_point()


def label_range_problem(owner: str, targets: torch.Tensor, num_classes: int, outputs: str, fix: str) -> str | None:
    """A message when class-index ``targets`` leave ``[0, num_classes)``; ``outputs`` and ``fix`` end it."""
    if not targets.numel():
        return None
    low, high = int(targets.min()), int(targets.max())
    if low >= 0 and high < num_classes:
        return None
    return (
        f"{owner}: target labels range over [{low}, {high}] but {outputs} (valid labels 0..{num_classes - 1}); {fix}."
    )


def _batch_inputs_problem(owner: str, inputs: Mapping[str, Any], batch: int, hint: str = "") -> str | None:
    """A message for the first input that is not a ``(batch, features...)`` tensor of the targets' batch size."""
    for key, features in inputs.items():
        if not isinstance(features, torch.Tensor) or features.ndim < 2 or features.shape[0] != batch:
            return (
                f"{owner}: input {key!r} must be a (batch, features...) tensor with the target's batch size "
                f"{batch}; got {_described(features)}.{hint}"
            )
    return None


def class_index_problem(
    owner: str, inputs: Mapping[str, Any], targets: Any, num_classes: int, *, hint: str = ""
) -> str | None:
    """What is wrong with a first batch of ``(batch, features...)`` inputs and 1-D class-index targets, or None.

    ``owner`` names the kind and its name (``"bank 'grid'"``); ``hint`` ends the message about a badly shaped input.
    """
    if not isinstance(targets, torch.Tensor) or targets.ndim != 1 or targets.is_floating_point():
        return (
            f"{owner}: the target must be a 1-D integer tensor of class indices; got {_described(targets)}"
            f"{' (cast it with .long())' if _is_float_vector(targets) else ''}."
        )
    problem = _batch_inputs_problem(owner, inputs, int(targets.shape[0]), hint)
    if problem is not None:
        return problem
    return label_range_problem(
        owner, targets, num_classes, f"num_classes={num_classes}", "set num_classes to the number of classes"
    )


def multi_hot_problem(owner: str, inputs: Mapping[str, Any], targets: Any, num_classes: int) -> str | None:
    """What is wrong with a first batch of multi-label targets, or None."""
    shape = tuple(getattr(targets, "shape", ()))
    if not isinstance(targets, torch.Tensor) or targets.ndim != 2 or targets.shape[1] != num_classes:
        return (
            f"{owner}: with multilabel=True the target must be a (batch, num_classes={num_classes}) multi-hot "
            f"tensor; got {type(targets).__name__} {shape}."
        )
    problem = _batch_inputs_problem(owner, inputs, int(targets.shape[0]))
    if problem is not None:
        return problem
    if targets.numel() and not bool(((targets == 0) | (targets == 1)).all()):
        return f"{owner}: multi-label targets must be 0 or 1; got values {targets.unique()[:8].tolist()}."
    return None


def flat_input_problem(
    owner: str,
    input_key: str,
    features: Any,
    targets: Any,
    num_classes: int,
    *,
    in_features: int | None = None,
    multilabel: bool = False,
) -> str | None:
    """What is wrong with a first batch of an engine sized by one input's feature count (kNN, ridge), or None.

    ``in_features`` is the engine's size once it exists (configured, or loaded from a checkpoint): a batch of another
    width is refused here, on every rank together, instead of failing inside the engine's buffer or statistics.
    """
    inputs = {input_key: features}
    if multilabel:
        problem = multi_hot_problem(owner, inputs, targets, num_classes)
    else:
        problem = class_index_problem(owner, inputs, targets, num_classes)
    if problem is not None or in_features is None:
        return problem
    width = int(features.shape[1:].numel())  # an empty batch has a width too
    if width == in_features:
        return None
    return (
        f"{owner}: input {input_key!r} has {width} features per sample, but the probe is sized for {in_features} "
        f"(argument 'in_features', or a loaded checkpoint); set 'in_features' to {width}, or feed the features it "
        "was built for."
    )


def first_batch_problem(probe: Probe, features: torch.Tensor, targets: torch.Tensor, *, input_key: str) -> str | None:
    """Describe what is wrong with the first batch for this probe, or return None.

    It runs the probe once on two samples and reads the target range against the probe's outputs.
    """
    owner = f"probe '{probe.name}'"
    if not isinstance(features, torch.Tensor):
        return f"{owner}: input {input_key!r} is a {type(features).__name__}, expected a tensor of features."
    if not isinstance(targets, torch.Tensor):
        return f"{owner}: the target is a {type(targets).__name__}, expected a tensor of labels."
    if features.ndim == 0 or targets.ndim == 0 or features.shape[0] != targets.shape[0]:
        return (
            f"{owner}: input {input_key!r} has shape {tuple(features.shape)} but the target has shape "
            f"{tuple(targets.shape)}; both need the same batch size in their first dimension."
        )
    try:
        preds = probe.predict(features[:2])
    except Exception as err:  # noqa: BLE001 - whatever the probe raises must reach every rank, not hang them
        return (
            f"{owner}: input {input_key!r} of shape {tuple(features.shape)} does not fit the probe "
            f"({type(err).__name__}: {err}); make the probe's input size match the features' last dimension."
        )
    if targets.is_floating_point() or preds.ndim != targets.ndim + 1:
        return None  # soft labels or regression: no class range to check
    num_classes = preds.shape[-1]
    return label_range_problem(
        owner,
        targets,
        num_classes,
        f"the probe outputs {num_classes} classes",
        "give the probe as many outputs as there are classes",
    )


def world_check_group() -> dist.ProcessGroup | None:
    """The group first-batch checks agree over: the whole world, not a probe's data-parallel group.

    Under a tensor-parallel mesh a rank that raises leaves waiting not only its data-parallel group but every
    rank it meets in a collective, so all of them must raise together.
    """
    return default_group()
