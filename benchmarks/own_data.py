"""Cost of a probe on its own labeled data: the extra forward per probe step, apart from the probe's own step.

A real Lightning fit on CPU of an MLP backbone (BatchNorm, dropout) pretrained on unlabeled points, with one
`OnlineProbe` on a labeled loader of its own (``every_n_steps=1``). Inside each probe step two parts are timed with
``time.perf_counter`` after the warm-up steps:

- *extra forward*: drawing the probe's batch and computing its features with the LightningModule under no_grad, eval
  mode, the precision plugin's autocast and the RNG save/restore (`distprobe.callbacks.own_data.draw_features`);
- *probe step*: the probe's own train step (forward, backward, optimizer) on those features (`Probe.train_step`).

The main step time without any probe is measured in the same run, interleaved round by round.

    python benchmarks/own_data.py --rounds 5 --steps 40
    python benchmarks/own_data.py --accelerator gpu --precision bf16-mixed --batch 1024 --width 2048

On a GPU every timed part starts and ends with ``torch.cuda.synchronize()``, so the parts are wall times of the
GPU work, and the synchronizations themselves add a little to the probed step.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import distprobe.callbacks.online_probe as online_probe
from distprobe.callbacks import OnlineProbe
from distprobe.engine import Probe


class Backbone(pl.LightningModule):
    def __init__(self, in_dim: int, width: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(in_dim, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Dropout(0.1), nn.Linear(width, width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (x,) = batch
        return (self(x) - x.mean(-1, keepdim=True)).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class StepTimer(Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        _sync()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        _sync()
        if trainer.global_step > self.warmup:
            self.times.append(time.perf_counter() - self._start)


def _sync() -> None:
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def fit(args: argparse.Namespace, with_probe: bool) -> list[float]:
    g = torch.Generator().manual_seed(0)
    main = DataLoader(TensorDataset(torch.randn(args.steps * args.batch, args.in_dim, generator=g)), args.batch)
    x = torch.randn(4 * args.batch, args.in_dim, generator=g)
    own = DataLoader([{"x": x[i], "label": int(i % 10)} for i in range(len(x))], batch_size=args.batch, shuffle=True)
    timer = StepTimer(args.warmup)
    callbacks: list[Callback] = [timer]
    if with_probe:
        probe = OnlineProbe(
            None,
            name="own",
            input="emb",
            target="label",
            probe=nn.Linear(args.width, 10),
            optimizer="AdamW",
            data=own,
            every_n_steps=1,
            features=lambda m, b: m(b["x"]),
        )
        callbacks.insert(0, probe)
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=1,
        precision=args.precision,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(Backbone(args.in_dim, args.width), main)
    return timer.times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--in-dim", type=int, default=64)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--accelerator", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--precision", default="32-true", help="Lightning's precision, e.g. bf16-mixed or 16-mixed")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    parts: dict[str, list[float]] = {"extra forward": [], "probe step": []}
    original_draw, original_step = online_probe.draw_features, Probe.train_step

    def timed(part: str, fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            _sync()
            start = time.perf_counter()
            out = fn(*a, **k)
            _sync()
            parts[part].append(time.perf_counter() - start)
            return out

        return wrapper

    online_probe.draw_features = timed("extra forward", original_draw)  # type: ignore[assignment]
    Probe.train_step = timed("probe step", original_step)  # type: ignore[method-assign]
    plain: list[float] = []
    probed: list[float] = []
    for _ in range(args.rounds):
        plain += fit(args, with_probe=False)
        before = {k: len(v) for k, v in parts.items()}
        probed += fit(args, with_probe=True)
        for k, v in parts.items():  # drop the warm-up steps' parts
            del v[before[k] : before[k] + args.warmup]

    def ms(values: list[float]) -> str:
        q = statistics.quantiles(values, n=4)
        return f"{1e3 * statistics.median(values):7.2f} ms  [{1e3 * q[0]:.2f}, {1e3 * q[2]:.2f}]"

    where = "CPU" if args.accelerator == "cpu" else torch.cuda.get_device_name()
    print(
        f"MLP {args.in_dim}->{args.width}->{args.width}, batch {args.batch}, {args.threads} threads, {where}, "
        f"{args.precision}"
    )
    print(f"{args.rounds} interleaved rounds x {args.steps - args.warmup} timed steps; median [quartiles]")
    print(f"main step, no probe          {ms(plain)}")
    print(f"main step, probe on own data {ms(probed)}")
    print(f"  of which extra forward     {ms(parts['extra forward'])}")
    print(f"  of which probe step        {ms(parts['probe step'])}")


if __name__ == "__main__":
    main()
