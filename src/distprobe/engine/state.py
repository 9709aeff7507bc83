"""A probe's metric state in checkpoints, reduced over the data-parallel group.

Lightning writes rank 0's callback state only. Saving rank 0's own metric states would drop the other ranks'
counts, and loading them on every rank would count rank 0's samples N times. So the saved states are the group's
reduction (one flat collective), and on resume rank 0 of the group loads them while the other ranks start empty:
the group's reduction is then again what was saved.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from distprobe.metrics.collection import ProbeMetrics
from distprobe.metrics.flat_sync import can_flat_sync, flat_sync


def _distributed(group: dist.ProcessGroup | None) -> bool:
    return group is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def synced_metric_states(metrics: ProbeMetrics, group: dist.ProcessGroup | None) -> dict[str, Any]:
    """Every metric's state reduced over ``group``, keyed as `ProbeMetrics.metric_states` (a collective).

    Metrics whose states the flat sync cannot reduce (a custom reduction) keep this rank's own state.
    """
    states = metrics.metric_states()
    if not _distributed(group):
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
    if _distributed(group) and dist.get_rank(group) != 0:
        metrics.reset()
        return
    metrics.load_metric_states(states)
