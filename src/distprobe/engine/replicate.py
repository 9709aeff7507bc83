"""Replication of a probe over a data-parallel process group, outside the backbone's wrapper."""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

# The collectives live in `distprobe.engine.collectives`; these names stay importable from here.
from distprobe.engine.collectives import (
    agree_on_max,
    broadcast_from_global_rank0,
    default_group,
    gather_over_group,
    is_distributed,
    rank_and_world,
)

#: torch 2.13 splits DDP's ``broadcast_buffers`` into ``init_sync`` and ``forward_sync_buffers``; older releases (the
#: floor, 2.11) only know ``broadcast_buffers`` (README.md, "Supported versions").
_FORWARD_SYNC_BUFFERS = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters

#: The former name of `rank_and_world`.
group_rank_and_size = rank_and_world

__all__ = [
    "agree_on_max",
    "default_group",
    "gather_over_group",
    "group_rank_and_size",
    "is_distributed",
    "rank_and_world",
    "replicate_probe",
    "unshare_storage",
]


def replicate_probe(module: nn.Module, group: dist.ProcessGroup | None) -> nn.Module:
    """Wrap a probe in its own DistributedDataParallel over ``group``; return it unchanged without a group.

    Building the wrapper broadcasts the group's rank-0 weights, so replicas start identical whatever each rank
    initialised. When ``group`` is smaller than the world (a tensor-parallel mesh), global rank 0's weights are first
    broadcast to every rank. Every rank of the world must call this at the same point (it is a collective).
    """
    if group is None:
        return module
    if dist.get_world_size(group) < dist.get_world_size():
        broadcast_from_global_rank0([*module.parameters(), *module.buffers()])
    elif not _FORWARD_SYNC_BUFFERS:  # torch < 2.13: DDP(broadcast_buffers=False) does not broadcast them at build
        broadcast_from_global_rank0(list(module.buffers()))
    if dist.get_world_size(group) == 1:
        return module
    params = list(module.parameters())
    if not params:
        raise ValueError("cannot replicate a probe that has no parameters")
    device = params[0].device
    device_ids = [device] if device.type == "cuda" else None
    return DistributedDataParallel(
        module,
        device_ids=device_ids,
        process_group=group,
        # A probe is tiny: one bucket means one all-reduce per optimizer step.
        bucket_cap_mb=max(1, sum(p.numel() * p.element_size() for p in params) // 2**20 + 1),
        # Parameters and buffers start as rank 0's (one broadcast, here). Afterwards buffers (BatchNorm statistics)
        # are kept identical by `sync_batch_norms`, not overwritten by rank 0's on every forward: that broadcast
        # would be one more collective per step and make the statistics rank 0's. (torch 2.13 deprecates
        # `broadcast_buffers=False`, which also skipped the broadcast at build; buffers equal everywhere lose
        # nothing by it.)
        init_sync=True,
        **_no_buffer_sync(),
    )


def _no_buffer_sync() -> dict[str, Any]:
    """DDP's argument that keeps buffers from being broadcast on every forward, in this torch's spelling."""
    return {"forward_sync_buffers": False} if _FORWARD_SYNC_BUFFERS else {"broadcast_buffers": False}


def unshare_storage(module: nn.Module) -> None:
    """Give every parameter its own storage, keeping the Parameter objects.

    Under ``ddp_spawn`` a callback's tensors reach the workers in memory shared by every rank; an in-place optimizer
    step on one rank would then write into the others' probe. Keeping the Parameter objects keeps a user's optimizer
    instance pointing at them.
    """
    with torch.no_grad():
        for p in module.parameters():
            p.data = p.data.clone()
        for b in module.buffers():
            b.data = b.data.clone()
