"""BatchNorm layers of a probe whose batch statistics span the data-parallel group, so N ranks equal one process.

A probe with a BatchNorm (the MAE protocol puts one without affine before the linear head) normalises each rank's
batch with that rank's statistics: N ranks then train a different probe than one process on the union of their
batches, and each rank's running statistics drift apart. torch's ``SyncBatchNorm`` fixes that on GPUs only; this
layer does the same on any device and backend, with one all-reduce of ``(sum, sum of squares, count)`` per training
forward (`distprobe.engine.functional.group_moments`; autograd flows through it, so a BatchNorm after trainable
layers also gets exact gradients).
"""

from __future__ import annotations

from typing import cast

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from distprobe.engine.functional.batchnorm import group_moments, update_running_stats


class GroupBatchNorm(_BatchNorm):
    """A BatchNorm whose training statistics are those of the whole data-parallel group's batch.

    In eval mode (or outside torch.distributed) it is a plain BatchNorm of the same configuration.
    """

    process_group: dist.ProcessGroup | None = None

    def _check_input_dim(self, input: torch.Tensor) -> None:  # noqa: A002 - torch's signature
        if input.dim() < 2:
            raise ValueError(f"GroupBatchNorm expects at least 2-D input (N, C, ...), got {input.dim()}-D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - torch's signature
        """Normalise with the group's batch statistics in training, with the running ones in eval."""
        self._check_input_dim(input)
        if not self.training or self.process_group is None:
            return super().forward(input)
        mean, var, n = group_moments(input, self.process_group, differentiable=True)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            self._update_running_stats(mean.detach(), var.detach(), n.detach())
        channels = input.shape[1]
        shape = [1, channels] + [1] * (input.dim() - 2)
        out = (input - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + self.eps)
        if self.affine:
            out = out * self.weight.reshape(shape) + self.bias.reshape(shape)
        return out

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, n: torch.Tensor) -> None:
        assert self.running_mean is not None and self.running_var is not None
        assert self.num_batches_tracked is not None
        self.num_batches_tracked.add_(1)
        # momentum=None is a cumulative average; a tensor factor keeps it on the device.
        factor = (1.0 / self.num_batches_tracked).to(mean.dtype) if self.momentum is None else self.momentum
        update_running_stats(self.running_mean, self.running_var, mean, var, n, factor)


def sync_batch_norms(module: nn.Module, group: dist.ProcessGroup | None) -> nn.Module:
    """Turn every BatchNorm of ``module`` into a `GroupBatchNorm` over ``group``, in place; return ``module``.

    Parameters and buffers are the same tensor objects, so an optimizer built on the probe still points at them.
    Nothing changes without a group of two or more ranks. A root BatchNorm is converted by swapping its class.
    """
    if group is None or dist.get_world_size(group) < 2:
        return module
    for layer in module.modules():
        if isinstance(layer, _BatchNorm) and not isinstance(layer, GroupBatchNorm):
            if type(layer) not in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm):
                continue  # a user's own BatchNorm subclass: its forward is theirs
            layer.__class__ = GroupBatchNorm
            cast(GroupBatchNorm, layer).process_group = group
    return module
