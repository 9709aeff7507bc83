"""Worker for the OnlineRidge Lightning tests: real fits on the strategies scenario's backbone and data.

Each run records, on every rank, the features and labels of every training batch (as the step returned them) and
of every validation batch, and what the ridge logged; the parent recomputes every value in NumPy from the union of
the ranks' records. Training per rank: 32 samples an epoch over the ranks, batches of 4; validation: 11 samples, so
one rank's last batch is padded with a repeat that must not count.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from tests.strategies.scenario import NUM_CLASSES, Backbone, DataModule, FSDP2Backbone, Spec, TPBackbone, _trainer

from distprobe.callbacks import OnlineRidge
from distprobe.features.dtensor import whole

L2 = (1e-4, 1e-2, 1.0, 30.0)


@dataclass
class RidgeRun:
    spec: Spec
    input: str = "embedding"
    lr: float = 0.05
    """The backbone's learning rate; 0 freezes it, so that any world size sees the same features."""
    nan_at: tuple[int, int, int] | None = None
    """(epoch, batch_idx, rank) whose returned embedding gets a NaN: that batch must be skipped and counted."""
    resume: bool = False
    """Also resume from the epoch-0 checkpoint and record that fit."""


def _module_class(kind: str) -> type[Backbone]:
    base = {"plain": Backbone, "fsdp2": FSDP2Backbone, "tp": TPBackbone}[kind]

    class RidgeBackbone(base):  # type: ignore[misc, valid-type]
        def __init__(self, seed: int, lr: float, nan_at: tuple[int, int, int] | None) -> None:
            super().__init__(seed, probes_in_module_dict=False)
            self.lr, self.nan_at = lr, nan_at

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
            out = super().training_step(batch, batch_idx)
            if self.nan_at == (self.current_epoch, batch_idx, self.global_rank):
                poisoned = out["embedding"].detach().clone()
                poisoned[0, 0] = float("nan")
                out["embedding"] = poisoned
            return out

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    return RidgeBackbone


class Recorder(Callback):
    """Placed after the ridge: what it saw in each batch, and what it logged at each validation."""

    def __init__(self) -> None:
        self.train: list[tuple[int, list[list[float]], list[int]]] = []
        self.val: list[tuple[int, list[list[float]], list[int], list[int]]] = []
        self.logged: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, *_: Any) -> None:
        emb = whole(outputs["embedding"]).detach().double()
        self.train.append((trainer.current_epoch, emb.tolist(), batch["label"].tolist()))

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, *_: Any) -> None:
        emb = whole(outputs["embedding"]).detach().double()
        self.val.append((trainer.current_epoch, emb.tolist(), batch["label"].tolist(), batch["idx"].tolist()))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.logged.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("eval/ridge")})


def _ridge(run: RidgeRun) -> OnlineRidge:
    return OnlineRidge(None, "ridge", input=run.input, target="label", num_classes=NUM_CLASSES, l2=L2)


def _fit(run: RidgeRun, world_size: int, seed: int, callbacks: list[Callback], ckpt: str | None = None, **kw: Any):
    recorder = Recorder()
    trainer = _trainer(run.spec, world_size, [_ridge(run), recorder, *callbacks], **kw)
    module = _module_class(run.spec.kind)(seed, run.lr, run.nan_at)
    trainer.fit(module, datamodule=DataModule(), ckpt_path=ckpt)
    final = {k: float(v) for k, v in trainer.callback_metrics.items() if "ridge" in k}
    return {"train": recorder.train, "val": recorder.val, "logged": recorder.logged, "final": final}


def run(rank: int, world_size: int, ridge_run: RidgeRun, tmp: str) -> dict[str, Any]:
    """An uninterrupted fit (checkpoint every epoch) and, if asked, one resumed from its epoch-0 checkpoint."""
    import distprobe.strategies  # noqa: F401 - registers the strategy names

    ckpt_dir = os.path.join(tmp, "ckpt")
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    out = {"whole": _fit(ridge_run, world_size, 0, [checkpoint])}
    if ridge_run.resume:
        state = torch.load(os.path.join(ckpt_dir, "epoch=0.ckpt"), weights_only=False)["callbacks"]
        out["saved"] = {k: v for k, v in state.items() if k.startswith("OnlineRidge")}
        out["resumed"] = _fit(
            ridge_run, world_size, 123, [], ckpt=os.path.join(ckpt_dir, "epoch=0.ckpt"), enable_checkpointing=False
        )
    return out


def run_all(rank: int, world_size: int, runs: dict[str, RidgeRun], tmp: str) -> dict[str, Any]:
    """`run` for every named run in turn, in one set of processes (a spawn costs seconds)."""
    return {name: run(rank, world_size, r, os.path.join(tmp, name)) for name, r in runs.items()}
