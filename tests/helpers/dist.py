"""A small distributed harness: real processes, a real gloo process group, no fixed ports.

`run_distributed(fn, world_size=2, *args)` starts `world_size` processes, joins them through a `file://` store in a
fresh temporary folder, calls `fn(rank, world_size, *args)` in each, and returns the per-rank return values in rank
order. An exception on any rank is re-raised here with that rank's traceback; a rank that hangs is killed after
`timeout` seconds, so a bug never hangs the suite.

The ranks are forked from a forkserver that imported torch, Lightning, torchmetrics and DeepSpeed once per
pytest session. A spawned rank paid those imports itself: 5-8 s of CPU per rank, for about 150 spawned ranks in the
suite, on 2 cores. Each rank still starts from that clean server, never from the pytest process, so no test's state
leaks into another's ranks; it gets the test's environment variables, working directory and `sys.path` as a spawned
rank did. `DISTPROBE_TEST_START_METHOD=spawn` goes back to plain spawn (to rule the harness out when a test fails).
"""

from __future__ import annotations

import os
import pickle
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

START_METHOD = os.environ.get("DISTPROBE_TEST_START_METHOD", "forkserver")
"""How the ranks start: "forkserver" (default) or "spawn"."""

PRELOAD = ["torch", "torch.distributed", "torchmetrics", "lightning.pytorch", "deepspeed"]
"""What the forkserver imports once. A module that is not installed is skipped (multiprocessing ignores it).

distprobe itself is left out (0.5 s a rank): each rank imports the current sources, and a broken module fails in the
rank with its own traceback. Any error but ImportError in a preload kills the forkserver, and then every rank of the
session fails with a bare EOFError (seen with a distprobe module left half-edited)."""


class DistributedTestError(RuntimeError):
    """A rank failed or timed out."""


def _worker(
    rank: int, world_size: int, init_file: str, out_dir: str, fn: Callable, args: tuple, environ: dict[str, str]
) -> None:
    # A forked rank holds the forkserver's environment, not the test's: give it the test's, as spawn would.
    os.environ.clear()
    os.environ.update(environ)
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    result: Any
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
        result = ("ok", fn(rank, world_size, *args))
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the parent with its traceback
        result = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def _context() -> Any:
    ctx = mp.get_context(START_METHOD)
    if START_METHOD == "forkserver":
        ctx.set_forkserver_preload(PRELOAD)
    return ctx


def run_distributed(fn: Callable, world_size: int = 2, *args: Any, timeout: float = 240.0) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` gloo ranks and return their results."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "store")
        ctx = _context()
        environ = dict(os.environ)
        procs = [
            ctx.Process(target=_worker, args=(rank, world_size, init_file, tmp, fn, args, environ), daemon=False)
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results = []
        errors = []
        for rank in range(world_size):
            path = os.path.join(tmp, f"rank{rank}.pkl")
            if not os.path.exists(path):
                errors.append(f"rank {rank}: no result (exit code {procs[rank].exitcode}, hung={rank in hung})")
                results.append(None)
                continue
            with open(path, "rb") as f:
                status, value = pickle.load(f)
            if status == "error":
                errors.append(f"rank {rank}: {value}")
            results.append(value)
        if errors:
            raise DistributedTestError("\n".join(errors))
        return results
