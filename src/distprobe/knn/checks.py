"""First-batch checks of a kNN's input and target (`distprobe.engine.checks`), decided on every rank by the caller."""

from __future__ import annotations

from typing import Any

from distprobe.engine.checks import class_index_problem


def first_batch_problem(
    name: str, input_key: str, features: Any, targets: Any, num_classes: int, *, multilabel: bool = False
) -> str | None:
    """What is wrong with the first batch for the kNN ``name``, or None (one host sync, on this batch only)."""
    if multilabel:
        from distprobe.bank.multilabel import multi_hot_problem

        return multi_hot_problem(f"kNN '{name}'", {input_key: features}, targets, num_classes)
    return class_index_problem(f"kNN '{name}'", {input_key: features}, targets, num_classes)
