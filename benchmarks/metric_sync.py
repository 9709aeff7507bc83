"""Eval-metric sync cost: torchmetrics' default per-state sync vs distprobe's one flat sync, on CPU gloo ranks.

Every probe holds top-1 accuracy, top-5 accuracy and macro F1 over ``--classes`` classes, updated with the same
random data in both variants. Each rank times ``compute()`` of all probes (median of ``--reps`` rounds, each round
starting from a barrier; rank 0 reports), counts the torch.distributed collectives one round issues, and compares
the values (max abs difference).

    python benchmarks/metric_sync.py            # 1, 8, 32 probes x 1000 classes on 2 and 4 ranks
    python benchmarks/metric_sync.py --smoke    # tiny sizes, for CI
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from distprobe.metrics import ProbeMetrics, compute_synced

COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "barrier",
    "broadcast",
    "gather",
    "reduce",
    "reduce_scatter",
    "all_to_all",
)


@contextlib.contextmanager
def count_collectives() -> Iterator[Counter]:
    """Count the torch.distributed collectives issued inside the block (torchmetrics calls them by module path)."""
    counts: Counter = Counter()
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def counting(name: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    for name, fn in originals.items():
        setattr(dist, name, counting(name, fn))
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def metric_spec(num_classes: int) -> dict[str, Any]:
    return {
        "top1": MulticlassAccuracy(num_classes, average="micro"),
        "top5": MulticlassAccuracy(num_classes, top_k=5, average="micro"),
        "f1": MulticlassF1Score(num_classes, average="macro"),
    }


def build(num_probes: int, num_classes: int, samples: int, rank: int) -> tuple[list[Any], list[Any]]:
    """The same probes twice: plain torchmetrics collections, and distprobe's (sync-free updates), same data."""
    plain, ours = [], []
    for p in range(num_probes):
        tm = MetricCollection(metric_spec(num_classes), prefix=f"eval/p{p}_", compute_groups=False)
        dp = ProbeMetrics(metric_spec(num_classes), f"p{p}").val
        g = torch.Generator().manual_seed(1000 * rank + p)
        preds = torch.randn(samples, num_classes, generator=g)
        targets = torch.randint(0, num_classes, (samples,), generator=g)
        tm.update(preds, targets)
        dp.update(preds, targets)
        plain.append(tm)
        ours.append(dp)
    return plain, ours


def torchmetrics_compute(collections: list[MetricCollection]) -> list[dict[str, torch.Tensor]]:
    for collection in collections:
        for metric in collection.values(copy_state=False):
            metric._computed = None  # compute() caches; every round must sync again
    return [c.compute() for c in collections]


def distprobe_compute(collections: list[MetricCollection]) -> list[dict[str, torch.Tensor]]:
    return compute_synced(collections, dist.group.WORLD)


def timed(fn: Any, collections: list[Any], reps: int) -> tuple[float, Counter, list[dict[str, torch.Tensor]]]:
    with count_collectives() as counts:
        values = fn(collections)
    times = []
    for _ in range(reps):
        dist.barrier()
        start = time.perf_counter()
        fn(collections)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), counts, values


def rank_main(rank: int, world: int, init_file: str, out_dir: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    rows = []
    try:
        for num_probes in args.probes:
            plain, ours = build(num_probes, args.classes, args.samples, rank)
            tm_ms, tm_counts, tm_values = timed(torchmetrics_compute, plain, args.reps)
            dp_ms, dp_counts, dp_values = timed(distprobe_compute, ours, args.reps)
            diff = max(
                (a[k].double() - b[k].double()).abs().max().item() for a, b in zip(tm_values, dp_values) for k in a
            )
            rows.append(
                {
                    "ranks": world,
                    "probes": num_probes,
                    "metrics": 3 * num_probes,
                    "tm_collectives": sum(tm_counts.values()),
                    "dp_collectives": sum(dp_counts.values()),
                    "tm_ms": tm_ms,
                    "dp_ms": dp_ms,
                    "diff": diff,
                }
            )
    finally:
        dist.destroy_process_group()
    if rank == 0:
        with open(os.path.join(out_dir, "rows.pkl"), "wb") as f:
            pickle.dump(rows, f)


def run_world(world: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            rank_main, args=(world, os.path.join(tmp, "store"), tmp, args), nprocs=world, start_method="spawn"
        )
        with open(os.path.join(tmp, "rows.pkl"), "rb") as f:
            return pickle.load(f)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI): 1 and 2 probes, 20 classes, 2 ranks")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--probes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=256, help="validation samples per rank and probe")
    parser.add_argument("--reps", type=int, default=20, help="timed rounds; the median is reported")
    args = parser.parse_args(argv)
    if args.smoke:
        args.ranks, args.probes, args.classes, args.samples, args.reps = [2], [1, 2], 20, 16, 3
    rows = [row for world in args.ranks for row in run_world(world, args)]
    print(
        f"Metric sync on CPU/gloo: top-1 + top-5 + macro F1 per probe, {args.classes} classes, "
        f"{args.samples} samples per rank, median of {args.reps} rounds (torch {torch.__version__})\n"
    )
    print(
        "| ranks | probes | metrics | collectives (torchmetrics) | collectives (distprobe) "
        "| ms (torchmetrics) | ms (distprobe) | speed-up | max abs diff |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['ranks']} | {r['probes']} | {r['metrics']} | {r['tm_collectives']} | {r['dp_collectives']} "
            f"| {r['tm_ms']:.2f} | {r['dp_ms']:.2f} | {r['tm_ms'] / r['dp_ms']:.0f}x | {r['diff']:.1e} |"
        )
    return 0 if all(r["diff"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
