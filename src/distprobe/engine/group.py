"""Grouped execution of separate probes: one backward, one bucketed all-reduce, fused optimizer steps.

Every probe of a `ProbeGroup` keeps its own semantics (module, optimizer, scheduler, accumulation window, clipping,
bad-data policy, metrics, checkpoint state): a grouped step gives each probe what its own `Probe.train_step` gives,
to rounding. What the group shares is host work, which is what a probe step costs on a GPU:

- one autograd backward for all probes (their graphs are disjoint, so the backward of the sum of their scaled, possibly
  poisoned, losses gives each probe its own gradient);
- one all-reduce per data-parallel group for the probes whose windows close on this micro-step, over one flat bucket
  of their gradients, averaging as DDP does; the probes' DDP wrappers are bypassed (their bare modules run the
  forward, so their reducers never fire), and micro-steps inside a window communicate nothing, as under ``no_sync``;
- torch's Adam, AdamW and SGD left with the default implementation step in their fused kernel, which skips a
  non-finite step itself: no snapshot and undo of the parameters and optimizer state.

The group never reads the device: the step is as sync-free as `Probe.train_step`.

Example:
    >>> from torch import nn
    >>> from distprobe.engine import ProbeConfig
    >>> probes = [Probe.build(ProbeConfig(name=f"p{i}", probe=nn.Linear(8, 3), optimizer="SGD")) for i in range(2)]
    >>> outs = ProbeGroup(probes).train_step([(torch.randn(4, 8), torch.tensor([0, 1, 2, 0]))] * 2)
    >>> [o.stepped for o in outs]
    [True, True]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from distprobe.engine import skip
from distprobe.engine.probe import Probe, StepOutput
from distprobe.engine.replicate import is_distributed


class ProbeGroup:
    """Probes trained together, one micro-batch each per `train_step`.

    Every rank of every probe's data-parallel group must call `train_step` with the same probes in the same order
    (the all-reduces are issued in that order). A probe may also be trained alone with `Probe.train_step` between
    grouped steps: its state is its own.
    """

    def __init__(self, probes: Sequence[Probe]) -> None:
        if len({id(p) for p in probes}) != len(probes):
            raise ValueError(f"ProbeGroup: a probe appears twice in {[p.name for p in probes]}; list each probe once.")
        self.probes = list(probes)

    def train_step(
        self,
        inputs: Sequence[tuple[torch.Tensor, torch.Tensor]],
        before_optimizer_step: Callable[[Probe], None] | None = None,
    ) -> list[StepOutput]:
        """Train every probe on its ``(features, targets)`` micro-batch, in order; return each probe's `StepOutput`.

        Args:
            inputs: One ``(features, targets)`` pair per probe, in the group's order.
            before_optimizer_step: Called with each probe whose window closes on this micro-step, once its
                gradients are the window's reduced mean and before they are clipped and the optimizer steps (where
                Lightning calls ``on_before_optimizer_step``). It may read the gradients; it must not change them
                on one rank only.
        """
        if len(inputs) != len(self.probes):
            raise ValueError(
                f"ProbeGroup.train_step: got {len(inputs)} (features, targets) pairs for {len(self.probes)} probes "
                f"{[p.name for p in self.probes]}; pass one pair per probe, in the group's order."
            )
        pending = [
            probe.forward_step(features, targets, probe.module)
            for probe, (features, targets) in zip(self.probes, inputs, strict=True)
        ]
        torch.autograd.backward([p.scaled_loss for p in pending])
        closing = [probe for probe, p in zip(self.probes, pending, strict=True) if p.boundary]
        reduce_window_grads(closing)
        if before_optimizer_step is not None:
            for probe in closing:
                before_optimizer_step(probe)
        return [probe.finish_step(p, fused_if_unset=True) for probe, p in zip(self.probes, pending, strict=True)]


def reduce_window_grads(probes: Sequence[Probe]) -> None:
    """Average the gradients of ``probes`` (their windows close now) over their data-parallel groups, in place.

    One flat all-reduce per (group, device, dtype), in the order of first appearance: the same on every rank, since
    every rank closes the same windows (accumulation counts are the same everywhere). Probes without a group of two
    or more ranks are left alone. A parameter without a gradient contributes zeros and keeps its None.
    """
    buckets: dict[tuple[int, torch.device, torch.dtype], tuple[dist.ProcessGroup, list[torch.nn.Parameter]]] = {}
    for probe in probes:
        if not is_distributed(probe.dp_group):
            continue
        for p in skip.params_of(probe.optimizer):
            key = (id(probe.dp_group), p.device, p.dtype)
            buckets.setdefault(key, (probe.dp_group, []))[1].append(p)  # type: ignore[arg-type]
    for group, params in buckets.values():
        allreduce_mean(params, group)


def allreduce_mean(params: Sequence[torch.nn.Parameter], group: dist.ProcessGroup) -> None:
    """Replace each parameter's gradient with its mean over ``group``: one all-reduce of one flat buffer.

    Divided before the sum, as DDP's reducer does, so that the result equals the probes' own DDP all-reduce.
    """
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    flat.div_(dist.get_world_size(group))
    dist.all_reduce(flat, group=group)
    reduced = [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads]), grads, strict=True)]
    torch._foreach_copy_(grads, reduced)
