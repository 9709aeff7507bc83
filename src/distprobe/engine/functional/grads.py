"""Gradient maths per head: non-finite masks, clipping by norm and by value, undoing a skipped step.

Tensors hold K heads along their first dimension; a single probe's gradients (any shapes) are one head, K = 1, for
`nonfinite_flag`, `total_norm` and `clip_gradients`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Literal, overload

import torch

ClipAlgorithm = Literal["norm", "value"]
"""``"norm"`` scales a head's gradients to a total L2 norm, ``"value"`` clamps each element."""

#: Added to a norm before dividing by it, as ``torch.nn.utils.clip_grad_norm_`` does.
CLIP_EPS = 1e-6


@overload
def per_head(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor: ...
@overload
def per_head(values: float, like: torch.Tensor) -> float: ...
def per_head(values: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor | float:
    """``(K,)`` values shaped to broadcast over a ``(K, ...)`` tensor; a float (every head's value) as it is."""
    if not isinstance(values, torch.Tensor):
        return values
    return values.view(-1, *([1] * (like.ndim - 1)))


def head_sums(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(K,)``: the sum of each head's elements over its tensors (non-finite iff one of them is, bar overflow)."""
    total = tensors[0].flatten(1).sum(dim=1)
    for t in tensors[1:]:  # one tensor in the usual case: no stack, no second reduction
        total = total + t.flatten(1).sum(dim=1)
    return total


def finite_heads(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(K,)`` bool: the heads whose every element is finite."""
    return torch.isfinite(head_sums(tensors))


def nonfinite_flag(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """One head (K = 1): a 0-d float32 tensor on the gradients' device, 1.0 where any holds a NaN or an infinity.

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


def zero_skipped(grads: Sequence[torch.Tensor], keep: torch.Tensor) -> None:
    """Zero, in place, the gradients of the heads not in ``keep`` (NaN times 0 is NaN, so a fill, not a product)."""
    for g in grads:
        g.masked_fill_(per_head(keep.logical_not(), g), 0.0)


def head_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(K,)``: each head's L2 norm over its tensors (what `clip_grad_norm_` computes for one separate probe)."""
    squares = torch.stack([torch.linalg.vector_norm(t.flatten(1), dim=1) ** 2 for t in tensors]).sum(dim=0)
    return squares.sqrt()


def total_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(1,)``: one head's L2 norm over tensors of any shapes (K = 1), with torch's fused per-tensor norms."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(tensors)))).reshape(1)


def clip(
    grads: Sequence[torch.Tensor],
    clip_val: float | None,
    algorithm: ClipAlgorithm,
    norms: torch.Tensor | None = None,
) -> None:
    """Clip each head's gradients in place, as ``clip_grad_norm_`` / ``clip_grad_value_`` clip a separate probe's.

    ``norms``: the ``(K,)`` norms before clipping, if known (else `head_norms` of ``grads``).
    """
    if clip_val is None or not grads:
        return
    if algorithm == "value":
        torch._foreach_clamp_min_(list(grads), -clip_val)
        torch._foreach_clamp_max_(list(grads), clip_val)
        return
    if norms is None:
        norms = head_norms(grads)
    # No `if norm > clip_val`: the factor is clamped at 1 on the device, so no host sync.
    factor = torch.clamp(clip_val / (norms + CLIP_EPS), max=1.0)
    if factor.numel() == 1:  # one head: one fused kernel for every tensor, whatever their shapes
        torch._foreach_mul_(list(grads), factor.reshape(()))
        return
    for g in grads:
        g.mul_(per_head(factor, g))


def clip_gradients(
    grads: Sequence[torch.Tensor], clip_val: float | None, algorithm: ClipAlgorithm
) -> torch.Tensor | None:
    """One head (K = 1): clip in place; return the total norm before clipping (for ``"norm"``), else None."""
    if clip_val is None or not grads:
        return None
    norms = total_norm(grads) if algorithm == "norm" else None
    clip(grads, clip_val, algorithm, norms)
    return None if norms is None else norms.reshape(())


def restore_where(flag: torch.Tensor, tensors: Sequence[torch.Tensor], saved: Sequence[torch.Tensor | None]) -> None:
    """Where ``flag`` is True, put each tensor back to its saved value (zeros for state created since the save)."""
    for t, old in zip(tensors, saved, strict=True):
        if old is None:
            t.masked_fill_(flag, 0)
        else:
            torch.where(flag, old, t, out=t)  # in place: one kernel per tensor, exact whatever either side holds
