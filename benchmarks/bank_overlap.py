"""How long a bank's gradient all-reduce keeps the host waiting, overlapped with the next forward or not (2 gloo ranks).

    python benchmarks/bank_overlap.py [--heads 8] [--dim 768] [--classes 1000] [--work-ms 20] [--steps 20]

Each rank runs a loop of "backbone work" (a matmul of about ``--work-ms``) followed by a bank step. The bank issues
its all-reduce without waiting and applies the step at its next use; this script times the host's wait on it
(``Work.wait``), and, for comparison, the same all-reduce issued and waited at once (what a synchronous probe pays on
the critical path). Both runs end with bitwise identical replicas, checked here.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distprobe.bank import BankConfig, ProbeBank


class _TimedWork:
    def __init__(self, work: dist.Work, waits: list[float]) -> None:
        self.work, self.waits = work, waits

    def wait(self) -> bool:
        start = time.perf_counter()
        done = self.work.wait()
        self.waits.append(time.perf_counter() - start)
        return done


def _worker(rank: int, world: int, init: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    lrs = [10 ** (-3 + i * 0.5) for i in range(args.heads)]
    config = BankConfig(name="bank", inputs=["x"], num_classes=args.classes, lr=lrs, in_features=args.dim)
    bank = ProbeBank.build(config, dp_group=dist.group.WORLD)
    waits: list[float] = []
    original = dist.all_reduce

    def timed(tensor: torch.Tensor, *a: object, **kw: object) -> object:
        work = original(tensor, *a, **kw)
        return _TimedWork(work, waits) if kw.get("async_op") else work

    dist.all_reduce = timed  # type: ignore[assignment]
    g = torch.Generator().manual_seed(rank)
    a = torch.randn(512, 512)
    reps = max(1, int(args.work_ms / 1.5))
    for _ in range(args.steps):
        for _ in range(reps):  # the backbone's forward and backward, which the all-reduce runs under
            a = torch.tanh(a @ a) * 0.5
        bank.train_step([torch.randn(64, args.dim, generator=g)], torch.randint(0, args.classes, (64,), generator=g))
    bank.settle()
    dist.all_reduce = original
    sync = []
    grad = torch.randn(bank.heads.flat.numel())
    for _ in range(args.steps):
        start = time.perf_counter()
        dist.all_reduce(grad)
        sync.append(time.perf_counter() - start)
    flat = bank.heads.flat.detach()
    everyone = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(everyone, flat)
    identical = all(torch.equal(everyone[0], f) for f in everyone)
    if rank == 0:
        with open(out, "w") as f:
            f.write(
                f"bank: {len(bank.head_ids)} heads, {flat.numel() * 4 / 2**20:.1f} MiB of gradient per step; "
                f"replicas identical: {identical}\n"
                f"host wait per step, overlapped with the next forward: median {statistics.median(waits) * 1e3:.2f} ms "
                f"(max {max(waits) * 1e3:.2f})\n"
                f"the same all-reduce, synchronous: median {statistics.median(sync) * 1e3:.2f} ms\n"
            )
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--work-ms", type=float, default=20.0)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.txt")
        mp.start_processes(_worker, args=(2, os.path.join(tmp, "init"), args, out), nprocs=2, start_method="spawn")
        with open(out) as f:
            print(f.read(), end="")


if __name__ == "__main__":
    main()
