"""BatchNorm statistics over a data-parallel group, so that N ranks normalise as one process on their union.

One all-reduce of ``(sum, sum of squares, count)`` per training forward serves both the probe's `GroupBatchNorm`
(through autograd, for a BatchNorm after trainable layers) and a bank's normalization (detached features).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from distprobe.engine.collectives import sum_over_group


def group_moments(
    x: torch.Tensor, group: dist.ProcessGroup | None, *, differentiable: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mean, biased variance, count)`` per channel (dimension 1) of ``x`` over every rank of ``group``.

    ``differentiable``: the reduction runs through autograd, so the gradient also flows to the other ranks' inputs.
    """
    dims = [d for d in range(x.dim()) if d != 1]
    channels = x.shape[1]
    count = torch.full((1,), x.numel() // channels, dtype=x.dtype, device=x.device)
    local = torch.cat([x.sum(dims), (x * x).sum(dims), count])
    total = sum_over_group(local, group, differentiable=differentiable)
    n = total[-1]
    mean = total[:channels] / n
    var = (total[channels : 2 * channels] / n - mean * mean).clamp_min(0)
    return mean, var, n


@torch.no_grad()
def update_running_stats(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    n: torch.Tensor,
    factor: torch.Tensor | float,
) -> None:
    """Move running statistics towards a batch's, as ``nn.BatchNorm`` does (unbiased variance), in place."""
    unbiased = var * n / (n - 1).clamp_min(1)
    running_mean.lerp_(mean.to(running_mean.dtype), factor)
    running_var.lerp_(unbiased.to(running_var.dtype), factor)
