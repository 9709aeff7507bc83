"""Host time per probe step: a real Trainer whose backbone costs almost nothing, so the step time is host time.

On a GPU a probe's kernels are tiny; what a short, launch-bound training step notices is the Python and dispatcher
time of the probe's callback (docs/benchmarks.md). This measures that time on CPU, where it can be tracked from
change to change without a GPU: a 16-wide linear backbone, batch 8, ``--steps`` timed steps after 100 warm-up, with
0, 1 and 8 OnlineProbes, alternated over ``--rounds``.

    python benchmarks/host_time.py                          # fused AdamW probes
    python benchmarks/host_time.py --optimizer LARS         # the default optimizer
    python benchmarks/host_time.py --profile 8              # cProfile of the probe hooks with 8 probes
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import pstats
import statistics
import time
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, IterableDataset
from torchmetrics.classification import MulticlassAccuracy

from distprobe.callbacks import OnlineProbe

WARMUP = 100
WIDTH = 16
CLASSES = 4


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(WIDTH, WIDTH)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        embedding = self.net(batch["x"])
        return {"loss": embedding.pow(2).mean(), "embedding": embedding}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.net.parameters(), lr=0.01)


class SameBatch(IterableDataset):
    def __iter__(self):  # type: ignore[no-untyped-def]
        x, y = torch.randn(8, WIDTH), torch.randint(0, CLASSES, (8,))
        while True:
            yield {"x": x, "label": y}


class Timer(Callback):
    """Seconds per step over the timed window; optionally profiles that window."""

    def __init__(self, steps: int, profiler: cProfile.Profile | None) -> None:
        self.steps, self.profiler = steps, profiler
        self.seconds_per_step = float("nan")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == WARMUP:
            self.start = time.perf_counter()
            if self.profiler:
                self.profiler.enable()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == WARMUP + self.steps - 1:
            if self.profiler:
                self.profiler.disable()
            self.seconds_per_step = (time.perf_counter() - self.start) / self.steps


def optimizer_spec(name: str) -> Any:
    if name == "fusedAdamW":  # what named AdamW becomes on CUDA
        return {"type": "AdamW", "lr": 1e-3, "fused": True}
    return name


def run(probes: int, args: argparse.Namespace, profiler: cProfile.Profile | None = None) -> float:
    callbacks: list[Callback] = [
        OnlineProbe(
            None,
            name=f"p{i}",
            input="embedding",
            target="label",
            probe=nn.Linear(WIDTH, CLASSES),
            optimizer=optimizer_spec(args.optimizer),
            metrics={"train": {"top1": MulticlassAccuracy(CLASSES)}, "val": {"top1": MulticlassAccuracy(CLASSES)}},
        )
        for i in range(probes)
    ]
    timer = Timer(args.steps, profiler)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=WARMUP + args.steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*callbacks, timer],
    )
    trainer.fit(Tiny(), DataLoader(SameBatch(), batch_size=None))
    return timer.seconds_per_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optimizer", default="fusedAdamW", help="fusedAdamW, or any optimizer name distprobe accepts")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--profile", type=int, metavar="PROBES", help="cProfile the timed steps with this many probes")
    args = p.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    if args.profile is not None:
        profiler = cProfile.Profile()
        run(args.profile, args, profiler)
        pstats.Stats(profiler).sort_stats("cumulative").print_callees("train_step|_optimizer_step")
        return
    counts = (0, 1, 8)
    times: dict[int, list[float]] = {n: [] for n in counts}
    for _ in range(args.rounds):
        for n in counts:
            times[n].append(run(n, args))
    base = statistics.median(times[0])
    print(f"optimizer {args.optimizer}, {args.rounds} rounds x {args.steps} steps, median ms per training step:")
    print("| probes | ms/step | host ms per probe-step |")
    print("|---|---|---|")
    for n in counts:
        med = statistics.median(times[n])
        per_probe = f"{(med - base) / n * 1e3:.3f}" if n else "-"
        print(f"| {n} | {med * 1e3:.3f} | {per_probe} |")


if __name__ == "__main__":
    main()
