"""Skipping a non-finite optimizer step on the device, with no host sync.

Fused Adam, AdamW and SGD skip the update in their kernel when given GradScaler's ``found_inf``; any other optimizer
steps, and what the step wrote is put back where the flag is set (`distprobe.engine.functional.restore_where`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim import Optimizer

from distprobe.engine.functional import grads

Snapshot = dict[tuple[int, str | None], torch.Tensor]


def params_of(optimizer: Optimizer) -> list[nn.Parameter]:
    """The optimizer's parameters, in group order."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def skips_on_device(optimizer: Optimizer) -> bool:
    """Whether the optimizer can skip a step itself, given ``found_inf`` (fused Adam, AdamW and SGD can).

    Not on a step that creates state: fused SGD leaves a first momentum buffer uninitialised when it skips.
    """
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        return False
    return all(optimizer.state.get(p) for p in params_of(optimizer))


def _state_tensors(optimizer: Optimizer, p: nn.Parameter) -> dict[str, torch.Tensor]:
    # Only tensors on the probe's device can be restored without a host sync; a host-side counter (Adam's
    # `step` unless `capturable=True`) still advances on a skipped step.
    return {k: v for k, v in optimizer.state.get(p, {}).items() if isinstance(v, torch.Tensor) and v.device == p.device}


def snapshot(optimizer: Optimizer) -> Snapshot:
    """Copies of the parameters and optimizer-state tensors, to undo a skipped step on the device."""
    saved: Snapshot = {}
    for p in params_of(optimizer):
        saved[(id(p), None)] = p.detach().clone()
        for key, value in _state_tensors(optimizer, p).items():
            saved[(id(p), key)] = value.clone()
    return saved


def undo_where(found_inf: torch.Tensor, optimizer: Optimizer, saved: Snapshot) -> None:
    """Put parameters and optimizer state back to ``saved`` where ``found_inf`` is set.

    State the step created (a first momentum buffer) has no saved copy and is undone to zeros: a fresh state.
    """
    targets: list[torch.Tensor] = []
    before: list[torch.Tensor | None] = []
    for p in params_of(optimizer):
        targets.append(p.detach())
        before.append(saved[(id(p), None)])
        for key, value in _state_tensors(optimizer, p).items():
            targets.append(value)
            before.append(saved.get((id(p), key)))
    grads.restore_where(found_inf.bool(), targets, before)


#: torch's optimizers whose fused kernel (CPU and CUDA) skips a step where GradScaler's ``found_inf`` is 1.
_FUSED_KERNELS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)


def can_step_fused(optimizer: Optimizer) -> bool:
    """Whether a step of this optimizer may run in its fused kernel although it was built without ``fused=True``.

    Only torch's Adam, AdamW and SGD whose user left the implementation unset (``foreach`` and ``fused`` None, not
    differentiable), on floating-point parameters whose state exists (see `skips_on_device`): the kernel computes
    the same update as the per-tensor loop, to rounding.
    """
    if type(optimizer) not in _FUSED_KERNELS:
        return False
    for group in optimizer.param_groups:
        if group.get("foreach") is not None or group.get("fused") is not None or group.get("differentiable"):
            return False
        stateless = isinstance(optimizer, torch.optim.SGD) and not group.get("momentum")
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not p.is_floating_point() or not (state or stateless):
                return False
            # An unfused step keeps Adam's `step` on the host; the fused kernel wants it beside the parameter.
            if state and any(isinstance(v, torch.Tensor) and v.device != p.device for v in state.values()):
                return False
    return True


def step_unless_nonfinite(optimizer: Optimizer, found_inf: torch.Tensor, *, fused_if_unset: bool = False) -> None:
    """``optimizer.step()``, with no effect where ``found_inf`` (a 0-d float tensor, GradScaler's) is 1.

    ``fused_if_unset``: an optimizer that `can_step_fused` steps in its fused kernel, skip included, instead of
    the per-tensor loop plus a snapshot and an undo (about 4 ops per tensor on the host).
    """
    if fused_if_unset and can_step_fused(optimizer):
        for group in optimizer.param_groups:
            group["fused"] = True
        try:
            _step_with_found_inf(optimizer, found_inf)
        finally:
            for group in optimizer.param_groups:
                group["fused"] = None
        return
    if skips_on_device(optimizer):
        _step_with_found_inf(optimizer, found_inf)
        return
    # No need to clean the gradients first: whatever a non-finite step writes is put back just below.
    saved = snapshot(optimizer)
    optimizer.step()
    undo_where(found_inf, optimizer, saved)


def _step_with_found_inf(optimizer: Optimizer, found_inf: torch.Tensor) -> None:
    # Fused optimizers skip the update themselves where `found_inf` is 1 (GradScaler's protocol), state and step
    # counter included: no copies, one kernel.
    optimizer.found_inf = found_inf  # type: ignore[attr-defined]
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf  # type: ignore[attr-defined]
