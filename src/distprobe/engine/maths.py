"""Pure functions of the probe step: accumulation, clipping, non-finite detection and undo.

They hold no state and never synchronise with the host: every decision is a device tensor.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Literal

import torch

ClipAlgorithm = Literal["norm", "value"]


def is_boundary(micro_step: int, accumulate_grad_batches: int) -> bool:
    """Whether the micro-step with this 0-based index closes an accumulation window."""
    return (micro_step + 1) % accumulate_grad_batches == 0


def optimizer_steps(micro_batches: int | None, accumulate_grad_batches: int) -> int | None:
    """A probe's number of optimizer steps over ``micro_batches`` training steps (None stays None)."""
    if micro_batches is None:
        return None
    return max(1, micro_batches // accumulate_grad_batches)


def nonfinite_flag(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """A 0-d float32 tensor on the gradients' device: 1.0 when any gradient holds a NaN or an infinity, else 0.0.

    The value is GradScaler's ``found_inf``, which fused optimizers accept as is. It comes from GradScaler's own fused
    check, with a unit scale that leaves the gradients unchanged: two kernels, however many tensors.
    """
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    device = grads[0].device
    found = torch.zeros((), dtype=torch.float32, device=device)
    torch._amp_foreach_non_finite_check_and_unscale_(list(grads), found, _unit_scale(device))
    return found


@functools.cache
def _unit_scale(device: torch.device) -> torch.Tensor:
    # Read, never written, by the check above: one tensor per device for the whole process.
    return torch.ones((), dtype=torch.float32, device=device)


def clip_gradients(
    grads: Sequence[torch.Tensor], clip_val: float | None, algorithm: ClipAlgorithm
) -> torch.Tensor | None:
    """Clip gradients in place; return the total norm before clipping (for ``"norm"``), else None."""
    if clip_val is None or not grads:
        return None
    if algorithm == "value":
        torch._foreach_clamp_min_(list(grads), -clip_val)
        torch._foreach_clamp_max_(list(grads), clip_val)
        return None
    total_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(grads))))
    # No `if total_norm > clip_val`: the factor is clamped at 1 on the device, so no host sync.
    factor = torch.clamp(clip_val / (total_norm + 1e-6), max=1.0)
    torch._foreach_mul_(list(grads), factor)
    return total_norm


def restore_where(flag: torch.Tensor, tensors: Sequence[torch.Tensor], saved: Sequence[torch.Tensor | None]) -> None:
    """Where ``flag`` is True, put each tensor back to its saved value (zeros for state created since the save)."""
    for t, old in zip(tensors, saved, strict=True):
        if old is None:
            t.masked_fill_(flag, 0)
        else:
            torch.where(flag, old, t, out=t)  # in place: one kernel per tensor, exact whatever either side holds
