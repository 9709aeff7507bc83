"""Per-rank memory and eval time of the sharded kNN against an all-gather kNN, on 2 and 4 gloo ranks.

    python benchmarks/knn_memory.py [--sizes 16384 65536 262144] [--worlds 2 4] [--dim 128] [--queries 128]
        [--k 200] [--rounds 3]

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
    q = search.normalized(queries)
    held = sum(t.numel() * t.element_size() for t in (buffer, buffer_labels))
    rows = min(q.shape[0], max(1, search.SCORE_BLOCK // buffer.shape[0]))
    preds = []
    for start in range(0, q.shape[0], rows):
        scores = q[start : start + rows] @ buffer.T
        values, position = search.ordered_topk(scores, knn.config.max_k)
        neighbour_labels = buffer_labels[position.clamp(min=0)]
        preds.append(search.predict(values, neighbour_labels, tuple(knn.config.k), knn.config.num_classes, 0.07))
    return torch.cat(preds), held + rows * buffer.shape[0] * 4


def _slowest(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _worker(rank: int, world: int, init: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    rows = []
    for size in args.sizes:
        config = KNNConfig(name="knn", num_classes=100, queue_length=size, k=(20, args.k))
        knn = ShardedKNN.build(config, in_features=args.dim)
        g = torch.Generator().manual_seed(rank)
        for _ in range(0, knn.shard.capacity, 8192):
            knn.update(torch.randn(8192, args.dim, generator=g), torch.randint(0, 100, (8192,), generator=g))
        queries = torch.randn(args.queries, args.dim, generator=g)
        targets = torch.randint(0, 100, (args.queries,), generator=g)
        sharded, gathered = [], []
        for _ in range(args.rounds):
            dist.barrier()
            start = time.perf_counter()
            preds = knn.eval_step(queries, targets)
            sharded.append(_slowest(time.perf_counter() - start))
            dist.barrier()
            start = time.perf_counter()
            baseline, held = _all_gather_knn(knn, queries, world)
            gathered.append(_slowest(time.perf_counter() - start))
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
                gathered_recv_mib=world * knn.shard.capacity * (args.dim * 4 + 8) / MIB,
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
    args = parser.parse_args()
    print(
        "| ranks | buffer | shard per rank (MiB) | held at eval, sharded / all-gather (MiB) | received per eval, "
        "sharded / all-gather (MiB) | eval time, sharded / all-gather (ms) |"
    )
    print("|---|---|---|---|---|---|")
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
                    f"{r['sharded_ms']:.0f} / {r['gathered_ms']:.0f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
