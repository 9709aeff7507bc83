"""Accumulation arithmetic of the probe step: where a window closes, how many optimizer steps a run holds.

The per-head gradient and optimizer maths (clipping, non-finite masks, undo) is `distprobe.engine.functional`.
"""

from __future__ import annotations


def is_boundary(micro_step: int, accumulate_grad_batches: int) -> bool:
    """Whether the micro-step with this 0-based index closes an accumulation window."""
    return (micro_step + 1) % accumulate_grad_batches == 0


def optimizer_steps(micro_batches: int | None, accumulate_grad_batches: int) -> int | None:
    """A probe's number of optimizer steps over ``micro_batches`` training steps (None stays None)."""
    if micro_batches is None:
        return None
    return max(1, micro_batches // accumulate_grad_batches)
