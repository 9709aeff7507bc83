"""Rank functions for the metric tests (importable by spawned ranks) and a collective counter."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from benchmarks.metric_sync import count_collectives  # the benchmark and the tests count the same way
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from torchmetrics import MeanMetric, Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassAUROC, MulticlassF1Score

from distprobe.metrics import ProbeMetrics, compute_synced, valid_in_loader_batch

NUM_CLASSES = 10


def metric_spec(auroc: bool = True) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "top1": MulticlassAccuracy(NUM_CLASSES),
        "top5": MulticlassAccuracy(NUM_CLASSES, top_k=5, average="micro"),
        "f1": MulticlassF1Score(NUM_CLASSES, average="macro"),
    }
    if auroc:
        spec["auroc"] = MulticlassAUROC(NUM_CLASSES)
    return spec


def make_case(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    preds = torch.randn(n, NUM_CLASSES, generator=g)
    targets = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return preds, targets


def single_process_values(preds: torch.Tensor, targets: torch.Tensor, num_probes: int) -> list[dict[str, torch.Tensor]]:
    """The reference: plain torchmetrics (not converted) on every sample once, in one process."""
    values = []
    for p in range(num_probes):
        ref = MetricCollection(metric_spec())
        ref.update(preds.roll(p, dims=1), targets)
        values.append(ref.compute())
    return values


def evaluate_like_lightning(
    rank: int, world: int, preds: torch.Tensor, targets: torch.Tensor, batch_size: int, num_probes: int
) -> list[Any]:
    """Feed this rank's share through a real DataLoader with Lightning's validation sampler, keep the real samples."""
    sampler = DistributedSampler(range(len(targets)), num_replicas=world, rank=rank, shuffle=False)
    loader = DataLoader(TensorDataset(preds, targets), batch_size=batch_size, sampler=sampler)
    probes = [ProbeMetrics(metric_spec(), f"p{p}") for p in range(num_probes)]
    for batch_idx, (x, y) in enumerate(loader):
        num_valid = valid_in_loader_batch(loader, batch_idx, len(y))
        keep = slice(None) if num_valid is None else slice(0, num_valid)
        for p, probe in enumerate(probes):
            probe.val.update(x.roll(p, dims=1)[keep], y[keep])
    return [probe.val for probe in probes]


def exact_eval_rank(rank: int, world: int, cases: list[tuple[int, int, int, int]]) -> list[dict[str, Any]]:
    """For each (seed, n, batch_size, num_probes): the flat-synced values, torchmetrics' own, and collective counts."""
    out = []
    for seed, n, batch_size, num_probes in cases:
        preds, targets = make_case(seed, n)
        collections = evaluate_like_lightning(rank, world, preds, targets, batch_size, num_probes)
        with count_collectives() as counts:
            flat = compute_synced(collections, dist.group.WORLD)
        with count_collectives() as tm_counts:
            # torchmetrics' own sync of the same states, metric by metric.
            own = [c.compute() for c in collections]
        out.append(
            {
                "flat": [{k.split("_", 1)[1]: v for k, v in d.items()} for d in flat],
                "torchmetrics": [{k.split("_", 1)[1]: v for k, v in d.items()} for d in own],
                "counts": dict(counts),
                "torchmetrics_counts": dict(tm_counts),
            }
        )
    return out


def five_samples_rank(rank: int, world: int) -> dict[str, float]:
    """5 samples, 2 ranks, batch 2, every prediction is class 0: the true accuracy is 0.2."""
    preds = torch.nn.functional.one_hot(torch.zeros(5, dtype=torch.long), 5).float()
    targets = torch.arange(5)
    sampler = DistributedSampler(range(5), num_replicas=world, rank=rank, shuffle=False)
    loader = DataLoader(TensorDataset(preds, targets), batch_size=2, sampler=sampler)
    exact = ProbeMetrics({"acc": MulticlassAccuracy(5, average="micro")}, "lin")
    naive = MulticlassAccuracy(5, average="micro")
    for batch_idx, (x, y) in enumerate(loader):
        num_valid = valid_in_loader_batch(loader, batch_idx, len(y))
        exact.val.update(x[:num_valid], y[:num_valid])
        naive.update(x, y)
    values = compute_synced([exact.val], dist.group.WORLD)[0]
    return {"exact": values["eval/lin_acc"].item(), "naive": naive.compute().item()}


def all_checks_rank(
    rank: int, world: int, cases: list[tuple[int, int, int, int]], idle_case: tuple[int, int]
) -> dict[str, Any]:
    """Every check of one world size in one spawn: starting ranks costs more than the checks."""
    return {
        "cases": exact_eval_rank(rank, world, cases),
        "idle": idle_rank_eval(rank, world, *idle_case),
        "five": five_samples_rank(rank, world) if world == 2 else None,
        "fallback": fallback_rank_eval(rank, world) if world == 2 else None,
    }


class StackedMax(Metric):
    """A state without a standard reduction (``dist_reduce_fx=None``): left to torchmetrics' own sync."""

    def __init__(self) -> None:
        super().__init__()
        self.add_state("best", torch.tensor(0.0), dist_reduce_fx=None)

    def update(self, value: torch.Tensor) -> None:
        self.best = torch.maximum(self.best, value.max())

    def compute(self) -> torch.Tensor:
        return self.best.max()


def fallback_rank_eval(rank: int, world: int) -> dict[str, Any]:
    """int64 and float32 sums in one all-reduce each; a None-reduction metric synced by torchmetrics after them."""
    values = torch.arange(5.0) + 10 * rank
    collection = MetricCollection({"mean": MeanMetric(), "best": StackedMax()})
    collection["mean"].update(values)
    collection["best"].update(values)
    accuracy = ProbeMetrics(metric_spec(auroc=False), "p0").val
    preds, targets = make_case(rank, 9)
    accuracy.update(preds, targets)
    with count_collectives() as counts:
        flat = compute_synced([collection, accuracy], dist.group.WORLD)
    return {"values": {**flat[0]}, "counts": dict(counts)}


def idle_rank_eval(rank: int, world: int, seed: int, n: int) -> dict[str, Any]:
    """The last rank gets no batch at all (a custom split); the others share every sample exactly once."""
    preds, targets = make_case(seed, n)
    probe = ProbeMetrics(metric_spec(), "p0")
    if rank < world - 1:
        mine = torch.arange(rank, n, world - 1)
        for chunk in mine.split(3):
            probe.val.update(preds[chunk], targets[chunk])
    with count_collectives() as counts:
        values = compute_synced([probe.val], dist.group.WORLD)[0]
    return {"values": {k.split("_", 1)[1]: v for k, v in values.items()}, "counts": dict(counts)}
