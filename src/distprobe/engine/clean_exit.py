"""A clean interpreter exit for processes that used a gloo process group.

A gloo group runs its collectives on worker threads. When a collective completes, the waiting Python thread moves
on at once, and the worker drops its reference to the collective's tensors a moment later. If that reference is the
last one to a tensor that has a Python object, the worker must take the GIL to free it. When the process is already
in ``Py_FinalizeEx``, Python ends any thread that asks for the GIL with ``pthread_exit``, and the unwind through
gloo's ``noexcept`` destructor calls ``std::terminate``: the process prints "terminate called without an active
exception" and dies of SIGABRT after a run that succeeded.

The backtrace of such a core, seen on these machines (torch 2.13.0+cpu, Python 3.11): ``take_gil`` ->
``PyThread_exit_thread`` -> ``pthread_exit`` from ``ProcessGroupGloo::runLoop`` -> ``~AsyncAllreduceWork`` ->
``TensorImpl::decref_pyobject``. Plain torch shows it with no distprobe and no Lightning: two spawned ranks that
run a gloo all-reduce and exit abort about 1 time in 8 (tests/engine/test_clean_exit.py). Slurm marks such a job
FAILED, and Lightning's ``ddp_spawn`` raises ``ProcessExitedException`` from ``fit``.

``destroy_process_group`` alone does not prevent it. The group it drops may still be held elsewhere (a DDP reducer
holds one), and the worker may still be waiting for the GIL. The cure is to let go of the GIL while the interpreter
is whole, so that a worker that finished a collective frees its tensors before finalization starts. The atexit
handler here does that with a short sleep, after destroying a gloo default group (Lightning's own atexit handler
destroys NCCL groups only).
"""

from __future__ import annotations

import atexit
import time

import torch.distributed as dist

__all__ = ["settle_gloo_workers_at_exit", "uses_gloo"]

# A worker that finished a collective needs the GIL once, for a few microseconds. A sleep releases the GIL at once
# and leaves the worker a long margin even when the cores are oversubscribed; 0.2 s is paid once per process.
GLOO_WORKER_GRACE_S = 0.2

_registered = False


def uses_gloo(group: dist.ProcessGroup | None = None) -> bool:
    """Whether ``group`` (the default group when None) carries CPU tensors through gloo."""
    backend = str(dist.get_backend(group))
    # "gloo", or a per-device backend string such as "cpu:gloo,cuda:nccl".
    return backend == dist.Backend.GLOO or "cpu:gloo" in backend.split(",")


def _settle_at_exit() -> None:
    if dist.is_available() and dist.is_initialized() and uses_gloo():
        dist.destroy_process_group()
    time.sleep(GLOO_WORKER_GRACE_S)  # releases the GIL: see the module docstring


def settle_gloo_workers_at_exit(group: dist.ProcessGroup | None = None) -> None:
    """Register, once per process, a clean exit for a process that runs collectives over a gloo group.

    Call it from every process that uses ``group`` (the default group when None); it does nothing outside
    torch.distributed or when the group is not gloo. At exit, while the interpreter is whole, a gloo default group
    is destroyed and gloo's worker threads are given the GIL (the module docstring says why).
    """
    global _registered
    if _registered or not (dist.is_available() and dist.is_initialized()):
        return
    if not uses_gloo(group):
        return
    atexit.register(_settle_at_exit)
    _registered = True
