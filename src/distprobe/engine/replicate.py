"""Replication of a probe over a data-parallel process group, outside the backbone's wrapper."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def default_group() -> dist.ProcessGroup | None:
    """The world group when torch.distributed is initialised, else None (a single process)."""
    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return None


def replicate_probe(module: nn.Module, group: dist.ProcessGroup | None) -> nn.Module:
    """Wrap a probe in its own DistributedDataParallel over ``group``; return it unchanged without a group.

    Building the wrapper broadcasts the group's rank-0 weights, so replicas start identical whatever each rank
    initialised. When ``group`` is smaller than the world (a tensor-parallel mesh), global rank 0's weights are first
    broadcast to every rank. Every rank of the world must call this at the same point (it is a collective).
    """
    if group is None:
        return module
    if dist.get_world_size(group) < dist.get_world_size():
        broadcast_from_global_rank0(module)
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
        init_sync=True,
        # Buffers (BatchNorm statistics) are kept identical by `sync_batch_norms`, not overwritten by rank 0's on
        # every forward: that broadcast would be one more collective per step and make the statistics rank 0's.
        broadcast_buffers=False,
    )


def broadcast_from_global_rank0(module: nn.Module) -> None:
    """Copy global rank 0's parameters and buffers to every rank of the world (no-op outside torch.distributed).

    `replicate_probe` makes the replicas of one data-parallel group equal. Under tensor parallelism the ranks of one
    tensor-parallel group sit in different data-parallel groups and see the same batches, so they must also start
    from the same probe: this broadcast, issued before replication, gives every group rank 0's probe.
    Every rank of the world must call it at the same point (it is a collective).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


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


def is_distributed(group: dist.ProcessGroup | None) -> bool:
    """Whether ``group`` spans two or more ranks of an initialised torch.distributed (else there is nothing to sync)."""
    return group is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def gather_over_group(tensors: list[torch.Tensor], group: dist.ProcessGroup | None) -> list[list[torch.Tensor]]:
    """Every rank's ``tensors`` (same shapes on every rank), in group-rank order, with one flat all-gather.

    A collective. Without a group of two or more ranks: ``[copies of tensors]``.
    """
    if not is_distributed(group):
        return [[t.detach().clone() for t in tensors]]
    if not tensors:
        return [[] for _ in range(dist.get_world_size(group))]
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, flat, group=group)
    out = []
    for buffer in gathered:
        pieces, offset = [], 0
        for t in tensors:
            pieces.append(buffer[offset : offset + t.numel()].reshape(t.shape).clone())
            offset += t.numel()
        out.append(pieces)
    return out


def group_rank_and_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """This process's rank in ``group`` and the group's size; ``(0, 1)`` outside torch.distributed."""
    if not is_distributed(group):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def agree_on_max(value: int | None, group: dist.ProcessGroup | None, device: torch.device | str = "cpu") -> int | None:
    """The largest ``value`` over the ranks of ``group`` (None where every rank has None); a collective.

    For facts each rank reads from its own data (a loader's length) that every replica must share: a schedule's
    length computed from uneven loaders would otherwise differ between ranks, and the replicas would diverge.
    ``device`` is where the collective's tensor lives (a CUDA device under NCCL).
    """
    if not is_distributed(group):
        return value
    encoded = torch.tensor([-1 if value is None else int(value)], dtype=torch.long, device=device)
    dist.all_reduce(encoded, op=dist.ReduceOp.MAX, group=group)
    return None if int(encoded) < 0 else int(encoded)
