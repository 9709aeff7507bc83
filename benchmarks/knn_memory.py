"""Per-rank memory and eval time of the sharded kNN against an all-gather kNN, on 2 and 4 gloo ranks or one GPU.

    python benchmarks/knn_memory.py [--sizes 16384 65536 262144] [--worlds 2 4] [--dim 128] [--queries 128]
        [--k 200] [--rounds 3] [--device cpu|cuda] [--storage-dtype float32|bfloat16|float16]

On the H200 (one GPU, NCCL, world 1): ``--device cuda --worlds 1 --sizes 1048576 --dim 768 --storage-dtype
bfloat16``; the table then also gives each method's measured CUDA peak above the buffer.

Each rank fills its shard of a ``size``-sample buffer with random unit features (fp32), then classifies
``--queries`` validation samples per rank, ``--rounds`` times:

- **sharded** (`distprobe.knn.ShardedKNN.eval_step`): queries all-gathered, per-rank top-k, candidates all-gathered,
  merged; the buffer stays sharded (``size / world`` rows per rank);
- **all-gather**: what solo-learn's ``WeightedKNNClassifier.compute`` and most online kNN callbacks do, gather the
  whole buffer to every rank, then search it locally (``size`` rows held per rank while it evaluates).

Both give the same predictions, checked here. Memory is counted from the tensors each method holds (the buffer, the
gathered copies, the largest score block), not from the process's RSS: on a shared CPU host the allocator's RSS
says little. Times are medians over rounds of the slowest rank.
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

from distprobe.knn import KNNConfig, ShardedKNN, search

MIB = 2**20


def _all_gather_knn(knn: ShardedKNN, queries: torch.Tensor, world: int) -> tuple[torch.Tensor, int]:
    """Gather every shard (logical order, rank-major), then one local search: predictions and bytes held."""
    feats = knn.shard.logical_features().contiguous()
    labels = knn.shard.logical_labels().contiguous()
    # Gathered straight into one buffer (no concatenated copy): the cheapest all-gather kNN.
    buffer = feats.new_empty(world * feats.shape[0], feats.shape[1])
    buffer_labels = labels.new_empty(world * labels.shape[0])
    dist.all_gather(list(buffer.chunk(world)), feats)
    dist.all_gather(list(buffer_labels.chunk(world)), labels)
    q = search.normalized(queries.to(buffer.device))
    held = sum(t.numel() * t.element_size() for t in (buffer, buffer_labels))
    rows = min(q.shape[0], max(1, search.SCORE_BLOCK // buffer.shape[0]))
    # A bf16/fp16 buffer is scored in float32, cast a block of rows at a time, as the sharded kNN does.
    cast = buffer.shape[0] if buffer.dtype == torch.float32 else search.CAST_BLOCK
    preds = []
    for start in range(0, q.shape[0], rows):
        block = q[start : start + rows]
        scores = torch.cat([block @ buffer[c : c + cast].float().T for c in range(0, buffer.shape[0], cast)], dim=1)
        values, position = search.ordered_topk(scores, knn.config.max_k)
        neighbour_labels = buffer_labels[position.clamp(min=0)]
        preds.append(search.predict(values, neighbour_labels, tuple(knn.config.k), knn.config.num_classes, 0.07))
    return torch.cat(preds), held + rows * buffer.shape[0] * 4


def _slowest(seconds: float, device: torch.device) -> float:
    t = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _timed(fn, device: torch.device, *args):  # type: ignore[no-untyped-def]
    """``fn(*args)``'s result, its slowest rank's seconds, and its CUDA peak above what was allocated before (bytes)."""
    dist.barrier()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    start = time.perf_counter()
    result = fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = _slowest(time.perf_counter() - start, device)
    peak = torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else 0
    return result, seconds, peak


def _worker(rank: int, world: int, init: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    device = torch.device(args.device, rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{init}", rank=rank, world_size=world)
    rows = []
    for size in args.sizes:
        config = KNNConfig(
            name="knn", num_classes=100, queue_length=size, k=(20, args.k), storage_dtype=args.storage_dtype
        )
        knn = ShardedKNN.build(config, in_features=args.dim, device=device)
        g = torch.Generator(device=device).manual_seed(rank)
        for _ in range(0, knn.shard.capacity, 8192):
            knn.update(
                torch.randn(8192, args.dim, generator=g, device=device),
                torch.randint(0, 100, (8192,), generator=g, device=device),
            )
        queries = torch.randn(args.queries, args.dim, generator=g, device=device)
        targets = torch.randint(0, 100, (args.queries,), generator=g, device=device)
        sharded, gathered, sharded_peak, gathered_peak = [], [], 0, 0
        for _ in range(args.rounds):
            preds, seconds, peak = _timed(knn.eval_step, device, queries, targets)
            sharded.append(seconds)
            sharded_peak = max(sharded_peak, peak)
            (baseline, held), seconds, peak = _timed(_all_gather_knn, device, knn, queries, world)
            gathered.append(seconds)
            gathered_peak = max(gathered_peak, peak)
            assert torch.equal(preds, baseline), "the all-gather kNN disagrees with the sharded one"
        score_block = min(search.SCORE_BLOCK, args.queries * world * knn.shard.capacity) * 4
        traffic = world * args.queries * args.dim * 4 + world * world * args.queries * args.k * (4 + 16)
        rows.append(
            dict(
                size=size,
                shard_mib=knn.buffer_nbytes / MIB,
                sharded_held_mib=(knn.buffer_nbytes + score_block) / MIB,
                gathered_held_mib=(knn.buffer_nbytes + held) / MIB,
                sharded_ms=1000 * statistics.median(sharded),
                gathered_ms=1000 * statistics.median(gathered),
                sharded_recv_mib=traffic / MIB,
                gathered_recv_mib=world * knn.shard.capacity * (args.dim * knn.shard.features.element_size() + 8) / MIB,
                sharded_peak_mib=sharded_peak / MIB,
                gathered_peak_mib=gathered_peak / MIB,
            )
        )
        del knn
    if rank == 0:
        torch.save(rows, out)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16384, 65536, 262144])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=128, help="validation samples per rank and batch")
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: one GPU per rank, NCCL")
    parser.add_argument("--storage-dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    print(f"device={args.device} dim={args.dim} storage={args.storage_dtype} queries/rank={args.queries} k={args.k}")
    print(
        "| ranks | buffer | shard per rank (MiB) | held at eval, sharded / all-gather (MiB) | received per eval, "
        "sharded / all-gather (MiB) | eval time, sharded / all-gather (ms) |"
        + (" CUDA peak at eval above the buffer, sharded / all-gather (MiB) |" if cuda else "")
    )
    print("|---|---|---|---|---|---|" + ("---|" if cuda else ""))
    for world in args.worlds:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "rows.pt")
            mp.start_processes(
                _worker, args=(world, os.path.join(tmp, "store"), args, out), nprocs=world, start_method="spawn"
            )
            for r in torch.load(out):
                print(
                    f"| {world} | {r['size']:,} | {r['shard_mib']:.1f} | {r['sharded_held_mib']:.1f} / "
                    f"{r['gathered_held_mib']:.1f} | {r['sharded_recv_mib']:.2f} / {r['gathered_recv_mib']:.1f} | "
                    f"{r['sharded_ms']:.0f} / {r['gathered_ms']:.0f} |"
                    + (f" {r['sharded_peak_mib']:.0f} / {r['gathered_peak_mib']:.0f} |" if cuda else ""),
                    flush=True,
                )


if __name__ == "__main__":
    main()
