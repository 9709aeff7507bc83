"""A flag that every rank agrees on without syncing the host with the GPU: a CPU all-reduce over gloo, read late.

Why not `trainer.strategy.reduce_boolean_decision` at every step: under NCCL that is an all-reduce of a device tensor
followed by ``.item()``, so the host waits for the GPU stream to drain once per step (about +5% step time on a GPU),
for a flag that is almost always False. Here the flag is a CPU tensor all-reduced (MAX) over a gloo group, which
moves it from CPU to CPU and never touches the GPU stream. It is issued with ``async_op=True`` at one check and
read at the next, when it has normally long completed; every rank reads the same reduced value at the same check,
so every rank decides on the same step. The price is a decision one check late.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from distprobe.engine.clean_exit import settle_gloo_workers_at_exit, uses_gloo

__all__ = ["AsyncFlag"]


class AsyncFlag:
    """A boolean raised on any rank and seen by every rank at the same check, one check later.

    `poll(local)` is called by every rank at the same points (e.g. every n-th optimizer step): it returns the value
    reduced from every rank's ``local`` at the previous poll, True if any rank raised it, and posts this poll's
    ``local`` for the next one. Outside torch.distributed (or in a world of one) it returns ``local`` at once.

    Args:
        group: a process group that carries CPU tensors (gloo), or None to read the local flag only. `build`
            picks it.

    Example:
        >>> flag = AsyncFlag.build()  # outside torch.distributed: no collective
        >>> flag.poll(False), flag.poll(True)
        (False, True)
        >>> flag.close()
    """

    def __init__(self, group: dist.ProcessGroup | None = None, *, owns_group: bool = False) -> None:
        self.group = group
        self._owns_group = owns_group
        self._pending: tuple[dist.Work, torch.Tensor] | None = None

    @classmethod
    def build(cls) -> AsyncFlag:
        """The flag for the current torch.distributed world: its group when it is gloo, else a new gloo group.

        Under NCCL this calls ``dist.new_group(backend="gloo")``, a collective: every rank must call `build`
        at the same point (a callback's ``setup``).
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return cls(None)
        settle_gloo_workers_at_exit()  # a gloo group's workers need the GIL at exit (engine/clean_exit.py)
        if uses_gloo():
            return cls(dist.group.WORLD)
        return cls(dist.new_group(backend="gloo"), owns_group=True)

    def poll(self, local: bool) -> bool:
        """Every rank's flag as of the previous poll (True if any rank raised it); posts ``local`` for the next.

        Once it returns True nothing is left in flight, so the ranks may save and exit at once.
        """
        if self.group is None:
            return local
        if self._pending is not None:
            work, value = self._pending
            self._pending = None
            work.wait()  # posted one check ago: normally complete already
            if bool(value.item()):  # a CPU tensor: no device sync
                return True
        value = torch.tensor([int(local)], dtype=torch.int32)
        work = dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        assert work is not None, "all_reduce(async_op=True) returns a Work"
        self._pending = (work, value)
        return False

    def close(self) -> None:
        """Complete the last posted all-reduce and release the gloo group if `build` created it.

        Every rank must call it after the same number of polls (the end of the training), or it waits for the
        ranks that have not posted theirs.
        """
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None
        if self._owns_group and self.group is not None:
            dist.destroy_process_group(self.group)
        self.group = None
        self._owns_group = False
