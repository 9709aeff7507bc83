"""The engine's per-head maths, as pure functions on ``(K, ...)`` tensors (torch only).

A bank's K heads stack along the first dimension of every tensor; a single probe is K = 1 where that fits (its
LARS optimizer, its clipping, its non-finite check). Hyper-parameters are ``(K,)`` tensors or plain floats.
Nothing here holds state or reads the device on the host: every decision is a device tensor.

- `distprobe.engine.functional.grads`: non-finite masks, clipping by norm and by value, undoing a step.
- `distprobe.engine.functional.optim`: SGD, AdamW and LARS updates, as torch computes them for one head, each
  given the step's `StepRates` (rates and skip mask).
- `distprobe.engine.functional.batchnorm`: BatchNorm moments over a data-parallel group, running statistics.
"""

from distprobe.engine.functional.batchnorm import group_moments, update_running_stats
from distprobe.engine.functional.grads import (
    clip,
    clip_gradients,
    finite_heads,
    head_norms,
    nonfinite_flag,
    per_head,
    restore_where,
    total_norm,
    zero_skipped,
)
from distprobe.engine.functional.optim import StepRates, adamw_update, lars_update, sgd_update

__all__ = [
    "StepRates",
    "adamw_update",
    "clip",
    "clip_gradients",
    "finite_heads",
    "group_moments",
    "head_norms",
    "lars_update",
    "nonfinite_flag",
    "per_head",
    "restore_where",
    "sgd_update",
    "total_norm",
    "update_running_stats",
    "zero_skipped",
]
