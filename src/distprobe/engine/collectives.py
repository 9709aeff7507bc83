"""Every collective the engine issues, in one place, each declared with how it reduces.

Probes and banks never call ``torch.distributed`` themselves: they call these functions, so the order and kind of
collectives a step issues can be read here. Each function says how it combines the ranks' values
(`REDUCTIONS` lists them), and each is a no-op (returning the local value) outside a group of two or more ranks.
Any decision that can differ between ranks goes through one of them; otherwise one rank hangs the job.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

Reduction = Literal["sum", "mean", "max", "gather", "broadcast", "any"]

#: Each collective of this module and how it combines the ranks' values.
REDUCTIONS: dict[str, Reduction] = {}

_F = TypeVar("_F", bound=Callable[..., Any])


def _reduces(how: Reduction) -> Callable[[_F], _F]:
    def declare(fn: _F) -> _F:
        REDUCTIONS[fn.__name__] = how
        return fn

    return declare


def default_group() -> dist.ProcessGroup | None:
    """The world group when torch.distributed is initialised, else None (a single process)."""
    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return None


def is_distributed(group: dist.ProcessGroup | None) -> bool:
    """Whether ``group`` spans two or more ranks of an initialised torch.distributed (else there is nothing to sync)."""
    return group is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank_and_world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """This process's rank in ``group`` and the group's size; ``(0, 1)`` without a group of two or more ranks.

    Pass `default_group()` for the world.
    """
    if not is_distributed(group):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def world_rank_and_size() -> tuple[int, int]:
    """This process's rank in the world and the world's size; ``(0, 1)`` outside torch.distributed."""
    return rank_and_world(default_group())


@_reduces("sum")
def sum_over_group(
    tensor: torch.Tensor, group: dist.ProcessGroup | None, *, differentiable: bool = False
) -> torch.Tensor:
    """The sum of ``tensor`` over the ranks of ``group``.

    ``differentiable``: through autograd (a new tensor whose gradient is summed back); else in place.
    """
    if not is_distributed(group):
        return tensor
    if differentiable:
        return dist_fn.all_reduce(tensor, group=group)
    dist.all_reduce(tensor, group=group)
    return tensor


class PendingMean:
    """An all-reduce in flight; `wait` returns the mean over the group (the tensor itself, reduced in place)."""

    def __init__(self, tensor: torch.Tensor, work: Any) -> None:
        self.tensor = tensor
        self._work = work

    def wait(self) -> torch.Tensor:
        """Block until the mean has arrived; return it."""
        if self._work is not None:
            self._work.wait()
            self._work = None
        return self.tensor


@_reduces("mean")
def start_mean(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> PendingMean:
    """Start the mean of ``tensor`` over ``group``, in place and without waiting (DDP's gradient average).

    Each rank's share is divided before the sum, as DDP does, so that every rank applies the same bits.
    """
    _, world = rank_and_world(group)
    if world == 1:
        return PendingMean(tensor, None)
    tensor.div_(world)
    return PendingMean(tensor, dist.all_reduce(tensor, group=group, async_op=True))


@_reduces("max")
def agree_on_max(value: int | None, group: dist.ProcessGroup | None, device: torch.device | str = "cpu") -> int | None:
    """The largest ``value`` over the ranks of ``group`` (None where every rank has None).

    For facts each rank reads from its own data (a loader's length) that every replica must share: a schedule's
    length computed from uneven loaders would otherwise differ between ranks, and the replicas would diverge.
    ``device`` is where the collective's tensor lives (a CUDA device under NCCL).
    """
    if not is_distributed(group):
        return value
    encoded = torch.tensor([-1 if value is None else int(value)], dtype=torch.long, device=device)
    dist.all_reduce(encoded, op=dist.ReduceOp.MAX, group=group)
    return None if int(encoded) < 0 else int(encoded)


@_reduces("gather")
def gather_over_group(tensors: list[torch.Tensor], group: dist.ProcessGroup | None) -> list[list[torch.Tensor]]:
    """Every rank's ``tensors`` (same shapes on every rank), in group-rank order, with one flat all-gather.

    Without a group of two or more ranks: ``[copies of tensors]``.
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


@_reduces("broadcast")
def broadcast_from_global_rank0(tensors: Sequence[torch.Tensor]) -> None:
    """Copy global rank 0's ``tensors`` to every rank of the world, in place (no-op outside torch.distributed).

    Replicas must start identical: within a data-parallel group, and also across tensor-parallel groups, whose ranks
    sit in different data-parallel groups and see the same batches. Every rank of the world must call it.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for tensor in tensors:
            dist.broadcast(tensor.data, src=0)


@_reduces("any")
def raise_if_any_rank_failed(problem: str | None, group: dist.ProcessGroup | None) -> None:
    """Raise the same ValueError on every rank of ``group`` when any of them found a problem.

    Raising on one rank alone would leave the others waiting forever in the probe's next all-reduce.
    """
    if group is None:
        if problem is not None:
            raise ValueError(problem)
        return
    problems: list[str | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(problems, problem, group=group)
    if problem is not None:
        raise ValueError(problem)
    for rank, other in enumerate(problems):
        if other is not None:
            raise ValueError(f"rank {rank} of the probe's group reported: {other}")
