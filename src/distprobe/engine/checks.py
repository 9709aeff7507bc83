"""First-batch checks of a probe's input, decided collectively so that bad input never hangs the other ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist

from distprobe.engine.probe import Probe
from distprobe.engine.replicate import default_group


def first_batch_problem(probe: Probe, features: torch.Tensor, targets: torch.Tensor, *, input_key: str) -> str | None:
    """Describe what is wrong with the first batch for this probe, or return None.

    It runs the probe once on two samples and reads the target range: a one-time host sync, never on later steps.
    """
    name = probe.name
    if not isinstance(features, torch.Tensor):
        return f"probe '{name}': input {input_key!r} is a {type(features).__name__}, expected a tensor of features."
    if not isinstance(targets, torch.Tensor):
        return f"probe '{name}': the target is a {type(targets).__name__}, expected a tensor of labels."
    if features.ndim == 0 or targets.ndim == 0 or features.shape[0] != targets.shape[0]:
        return (
            f"probe '{name}': input {input_key!r} has shape {tuple(features.shape)} but the target has shape "
            f"{tuple(targets.shape)}; both need the same batch size in their first dimension."
        )
    try:
        preds = probe.predict(features[:2])
    except Exception as err:  # noqa: BLE001 - whatever the probe raises must reach every rank, not hang them
        return (
            f"probe '{name}': input {input_key!r} of shape {tuple(features.shape)} does not fit the probe "
            f"({type(err).__name__}: {err}); make the probe's input size match the features' last dimension."
        )
    is_class_index = not targets.is_floating_point() and preds.ndim == targets.ndim + 1
    if is_class_index and targets.numel():
        low, high = int(targets.min()), int(targets.max())
        num_classes = preds.shape[-1]
        if low < 0 or high >= num_classes:
            return (
                f"probe '{name}': target labels range over [{low}, {high}] but the probe outputs {num_classes} "
                f"classes (valid labels 0..{num_classes - 1}); give the probe as many outputs as there are classes."
            )
    return None


def world_check_group() -> dist.ProcessGroup | None:
    """The group first-batch checks agree over: the whole world, not a probe's data-parallel group.

    Under a tensor-parallel mesh a rank that raises leaves waiting not only its data-parallel group but every
    rank it meets in a collective, so all of them must raise together.
    """
    return default_group()


def raise_if_any_rank_failed(problem: str | None, group: dist.ProcessGroup | None) -> None:
    """Raise the same ValueError on every rank of ``group`` when any of them found a problem.

    Raising on one rank alone would leave the others waiting forever in the probe's next all-reduce.
    """
    if group is None:
        if problem is not None:
            raise ValueError(problem)
        return
    problems: list[str | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(problems, problem, group=group)
    if problem is not None:
        raise ValueError(problem)
    for rank, other in enumerate(problems):
        if other is not None:
            raise ValueError(f"rank {rank} of the probe's group reported: {other}")
