"""A clean interpreter exit under Lightning's gloo process groups.

Lightning destroys the default process group at exit for NCCL only (an ``atexit`` handler in
``lightning.fabric.utilities.distributed``); a gloo group is left to C++ static destructors, after the interpreter
has gone. Successful gloo runs were seen to abort at exit (SIGABRT, "terminate called without an active exception"):
one ``ddp_spawn`` worker in 30 fits in CI (tests/distributed/test_ddp_spawn.py, 0 in 60 on a dev machine), and about
1 torchrun run in 10 in `benchmarks/overhead.py` until it destroyed its group before exiting (0 in 30 since). The
abort's exact site was not pinned down; destroying the group from ``atexit``, while the interpreter is whole, is what
both Lightning (for NCCL) and that benchmark's fix do. Slurm marks a job that aborts at exit FAILED.
"""

from __future__ import annotations

import atexit

import torch.distributed as dist

_registered = False


def _destroy_default_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def destroy_gloo_group_at_exit() -> None:
    """Register, once per process, the destruction of a gloo default process group at interpreter exit."""
    global _registered
    if _registered or not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_backend() != "gloo":  # NCCL: Lightning registers its own handler
        return
    atexit.register(_destroy_default_group)
    _registered = True
