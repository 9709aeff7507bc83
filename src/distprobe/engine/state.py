"""A probe's rank-local state in checkpoints that only rank 0 writes: partial gradients and metric states.

Lightning writes rank 0's callback state only, so what differs between ranks must be gathered or reduced first:

- the gradients of an open accumulation window are gathered, every rank's; on resume each rank takes its own back
  (bitwise), or, at another world size, every rank starts from their mean;
- saving rank 0's own metric states would drop the other ranks' counts, and loading them on every rank would count
  rank 0's samples N times. So the saved states are the group's reduction (one flat collective), and on resume rank 0
  of the group loads them while the other ranks start empty: the group's reduction is then again what was saved.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from distprobe.engine.collectives import gather_over_group, is_distributed, rank_and_world
from distprobe.metrics.collection import ProbeMetrics
from distprobe.metrics.flat_sync import can_flat_sync, flat_sync


def synced_metric_states(metrics: ProbeMetrics, group: dist.ProcessGroup | None) -> dict[str, Any]:
    """Every metric's state reduced over ``group``, keyed as `ProbeMetrics.metric_states` (a collective).

    Metrics whose states the flat sync cannot reduce (a custom reduction) keep this rank's own state.
    """
    states = metrics.metric_states()
    if not is_distributed(group):
        return states
    named = metrics.named_metrics()
    synced = flat_sync([m for _, m in named if can_flat_sync(m)], group)
    for key, metric in named:
        for attr in metric._defaults:
            value = synced.get((id(metric), attr))
            if value is not None:
                states[key]["state"][attr] = value.detach().clone() if isinstance(value, torch.Tensor) else value
    return states


def load_metric_states(metrics: ProbeMetrics, states: Mapping[str, Any], group: dist.ProcessGroup | None) -> None:
    """Load what `synced_metric_states` saved on rank 0 of ``group``; the other ranks start from empty states."""
    if is_distributed(group) and dist.get_rank(group) != 0:
        metrics.reset()
        return
    metrics.load_metric_states(states)


def gathered_window_grads(params: Sequence[torch.Tensor], group: dist.ProcessGroup | None) -> list[list[torch.Tensor]]:
    """Every rank's partial gradients of ``params``, in group-rank order (a collective).

    A parameter without a gradient yet gives zeros, so that every rank gathers the same shapes.
    """
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    return gather_over_group(grads, group)


def resume_window(per_rank: Sequence[Sequence[torch.Tensor]], group: dist.ProcessGroup | None) -> list[torch.Tensor]:
    """The partial gradients this rank resumes an open window from, given every saved rank's (a probe's, a bank's).

    At the saved world size each rank takes its own back, bitwise. At another, every rank starts from the saved
    ranks' mean: the window's all-reduce (a mean) of ``mean + each rank's remaining micro-steps`` then equals the
    saved ranks' mean plus the mean of what follows, as if the window had run on without the change.
    """
    rank, size = rank_and_world(group)
    if len(per_rank) == size:
        return list(per_rank[rank])
    return [torch.stack(list(parts)).mean(dim=0) for parts in zip(*per_rank, strict=True)]


def own_window_grads(state: Mapping[str, Any], group: dist.ProcessGroup | None) -> list[torch.Tensor | None] | None:
    """The partial gradients this rank resumes its window from (None outside a window), from a probe's state."""
    per_rank = state.get("window_grads_per_rank")
    if per_rank is None:  # format 1: one rank's own gradients
        return state.get("window_grads")
    return list(resume_window(per_rank, group))
