"""First-batch checks of a kNN's input and target (`distprobe.engine.checks`), decided on every rank by the caller."""

from __future__ import annotations

from typing import Any

from distprobe.engine.checks import class_index_problem


def first_batch_problem(name: str, input_key: str, features: Any, targets: Any, num_classes: int) -> str | None:
    """What is wrong with the first batch for the kNN ``name``, or None (one host sync, on this batch only)."""
    return class_index_problem(f"kNN '{name}'", {input_key: features}, targets, num_classes)
