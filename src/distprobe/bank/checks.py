"""First-batch checks of a bank's inputs (`distprobe.engine.checks`), decided on every rank together by the caller.

What a first batch must hold depends on the bank: linear heads read one feature vector per sample, attentive heads
``(B, N, D)`` tokens (a family says so with ``input_problem``), and multi-label banks ``(B, C)`` multi-hot targets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from distprobe.bank.config import BankConfig
from distprobe.engine.checks import class_index_problem, multi_hot_problem

#: Ends the message about an input that is not one feature vector per sample.
POOL_HINT = " Pool token outputs first (e.g. a tapped module with ':cls')."


def first_batch_problem(
    name: str,
    inputs: Sequence[str],
    features: list[Any],
    targets: Any,
    num_classes: int,
    config: BankConfig | None = None,
    built: Mapping[str, int] | None = None,
) -> str | None:
    """What is wrong with the first batch for this bank, or None (one host sync, on this batch only).

    ``config`` (when given) adds its family's input check and, for a multi-label bank, the multi-hot target check;
    ``built``, the feature sizes of heads built before this batch, adds `size_problem`.
    """
    owner = f"bank '{name}'"
    if config is not None:
        from distprobe.bank.families import FAMILIES

        input_problem = getattr(FAMILIES[config.family], "input_problem", None)
        for source, x in zip(inputs, features, strict=True):
            if input_problem is not None and isinstance(x, torch.Tensor):
                problem = input_problem(source, x)
                if problem is not None:
                    return f"{owner}: {problem}"
        target_problem = getattr(FAMILIES[config.family], "target_problem", None)
        kind_problem = target_kind_problem(owner, targets, num_classes, config.multilabel)
        if kind_problem is not None and target_problem is None:  # dense heads read masks: their own check
            return kind_problem
        if target_problem is not None:  # a family with targets of its own (dense heads: masks)
            problem = target_problem(owner, dict(zip(inputs, features, strict=True)), targets, config)
        elif config.multilabel:
            problem = multi_hot_problem(owner, dict(zip(inputs, features, strict=True)), targets, num_classes)
        else:
            problem = class_index_problem(owner, dict(zip(inputs, features, strict=True)), targets, num_classes)
        if problem is None:
            problem = size_problem(name, config, features, built)
        sizes_problem = getattr(FAMILIES[config.family], "sizes_problem", None)
        if problem is None and sizes_problem is not None:  # heads that can only read some sizes (attentive)
            problem = sizes_problem(config, feature_sizes(config, features))
        return problem
    return class_index_problem(owner, dict(zip(inputs, features, strict=True)), targets, num_classes, hint=POOL_HINT)


def target_kind_problem(owner: str, targets: Any, num_classes: int, multilabel: bool) -> str | None:
    """A target of the other kind's shape, or of another width than ``num_classes``, named with its fix; or None.

    The engine's checks say what shape they expect; a bank knows which of its arguments the user must change.
    """
    if not isinstance(targets, torch.Tensor):
        return None
    shape = tuple(targets.shape)
    # The engine's wording first (what a multi-label target must be), then what to change.
    expected = (
        f"{owner}: with multilabel=True the target must be a (batch, num_classes={num_classes}) multi-hot tensor; "
        f"got Tensor {shape}"
    )
    if multilabel and targets.ndim == 2 and targets.shape[1] != num_classes:
        return (
            f"{expected}: argument 'num_classes' is {num_classes}, but the targets hold {targets.shape[1]} labels "
            f"per sample; set num_classes={targets.shape[1]}, or give {num_classes} labels per sample."
        )
    if multilabel and targets.ndim == 1 and not targets.is_floating_point():
        return (
            f"{expected}, one class index per sample: set multilabel=False for class indices, or pass "
            f"torch.nn.functional.one_hot(target, {num_classes})."
        )
    looks_multi_hot = not multilabel and targets.ndim == 2 and targets.shape[1] == num_classes and targets.numel()
    if looks_multi_hot and bool(((targets == 0) | (targets == 1)).all()):
        return (
            f"{owner}: the target must be a 1-D integer tensor of class indices; got Tensor {shape} of "
            f"{targets.dtype}, (batch, num_classes={num_classes}) 0/1 vectors, but argument 'multilabel' is False: "
            "set multilabel=True for multi-hot targets, or pass target.argmax(dim=1) for one-hot ones."
        )
    return None


def size_problem(
    name: str, config: BankConfig, features: Sequence[torch.Tensor], built: Mapping[str, int] | None
) -> str | None:
    """Features of another size than heads built before them (``in_features``, a checkpoint's), or None.

    Unchecked, they would fail inside the batched matmul with torch's message. ``built`` None: no heads yet.
    """
    if built is None:
        return None
    sizes = feature_sizes(config, features)
    for source, size in sizes.items():
        if size != built[source]:
            return (
                f"bank '{name}': input {source!r} has {size} features per sample, but the bank is sized for "
                f"{built[source]} (argument 'in_features', or a loaded checkpoint); set in_features={sizes!r}, or "
                "feed the features it was built for."
            )
    return None


def feature_sizes(config: BankConfig, features: Sequence[torch.Tensor]) -> dict[str, int]:
    """Each source's feature size as the bank's family reads it from a first batch (linear: a sample's numel)."""
    from distprobe.bank.families import FAMILIES

    size_of = FAMILIES[config.family].feature_size
    # From the shape, not a sample: a first batch may be empty on a rank.
    return {source: size_of(x.shape[1:]) for source, x in zip(config.inputs, features, strict=True)}
