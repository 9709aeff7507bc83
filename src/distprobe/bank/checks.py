"""First-batch checks of a bank's inputs (`distprobe.engine.checks`), decided on every rank together by the caller."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from distprobe.engine.checks import class_index_problem

#: Ends the message about an input that is not one feature vector per sample.
POOL_HINT = " Pool token outputs first (e.g. a tapped module with ':cls')."


def first_batch_problem(
    name: str, inputs: Sequence[str], features: list[Any], targets: Any, num_classes: int
) -> str | None:
    """What is wrong with the first batch for this bank, or None (one host sync, on this batch only)."""
    return class_index_problem(
        f"bank '{name}'", dict(zip(inputs, features, strict=True)), targets, num_classes, hint=POOL_HINT
    )
