"""What the stable-pretraining compatibility tests share: a real ``spt.Module`` script, and both probe classes.

Each scenario runs with ``IMPLEMENTATIONS["spt"]`` (stable-pretraining 0.1.8's own OnlineProbe) as well as with
``IMPLEMENTATIONS["distprobe"]``: the first run shows that the test asserts what stable-pretraining really does, the
second that distprobe's class is a drop-in for it. Only import this module after
``pytest.importorskip("stable_pretraining")``.
"""

from __future__ import annotations

import csv
import glob
import os
from collections import defaultdict
from typing import Any

from tests.compat.torchvision_cpu_ops import install

install()  # before stable-pretraining imports torchvision; see torchvision_cpu_ops

import lightning.pytorch as pl  # noqa: E402
import stable_pretraining as spt  # noqa: E402
import torch  # noqa: E402
import torchmetrics  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from stable_pretraining.callbacks import OnlineProbe as SptOnlineProbe  # noqa: E402
from tests.helpers.models import EMBED_DIM, IN_DIM, NUM_CLASSES, SeparableData  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import distprobe.strategies  # noqa: E402, F401 - registers "distprobe_ddp" and the other strategy names
from distprobe.callbacks import OnlineProbe as DistprobeOnlineProbe  # noqa: E402

IMPLEMENTATIONS: dict[str, type] = {"spt": SptOnlineProbe, "distprobe": DistprobeOnlineProbe}

BATCH = 16
TRAIN_SIZE = 64  # 4 training batches per epoch
VAL_SIZE = 32  # 2 validation batches
PROBE_LR = 0.1


def forward(self: Any, batch: dict[str, Any], stage: str) -> dict[str, Any]:
    """The ``forward`` of a typical stable-pretraining script: an embedding, and an SSL-style loss when fitting."""
    embedding = self.backbone(batch["x"])
    out = {"embedding": embedding}
    if stage == "fit":
        out["loss"] = (embedding.pow(2).mean() - 1.0).abs()
    return out


def make_module(optim: str | None = "sgd") -> Any:
    """An ``spt.Module`` around a linear backbone; ``optim=None`` freezes it (linear evaluation)."""
    torch.manual_seed(1234)
    config = None
    if optim == "sgd":
        config = {
            "optimizer": {"type": "SGD", "lr": 0.01},
            "scheduler": {"type": "ConstantLR", "factor": 1.0},
            "interval": "step",
        }
    return spt.Module(forward=forward, backbone=nn.Linear(IN_DIM, EMBED_DIM), optim=config, hparams={})


def top1() -> torchmetrics.Metric:
    return torchmetrics.classification.MulticlassAccuracy(NUM_CLASSES, average="micro")


def make_probe(cls: type, module: Any, name: str = "linear", seed: int = 7, **overrides: Any) -> Any:
    """An OnlineProbe configured the way a stable-pretraining user writes it (keyword ``loss``, dict optimizer)."""
    torch.manual_seed(seed)
    kwargs: dict[str, Any] = dict(
        name=name,
        input="embedding",
        target="label",
        probe=nn.Linear(EMBED_DIM, NUM_CLASSES),
        loss=nn.CrossEntropyLoss(),
        optimizer={"type": "SGD", "lr": PROBE_LR},
        metrics={"top1": top1()},
    )
    kwargs.update(overrides)
    return cls(module, **kwargs)


def train_loader() -> DataLoader:
    return DataLoader(SeparableData(TRAIN_SIZE, seed=0), batch_size=BATCH, shuffle=False)


def val_loader() -> DataLoader:
    return DataLoader(SeparableData(VAL_SIZE, seed=1), batch_size=BATCH, shuffle=False)


def make_trainer(log_dir: str | None, callbacks: list, **kwargs: Any) -> pl.Trainer:
    """A CPU Trainer as a user's script builds it; stable-pretraining adds its default callbacks itself."""
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        logger=CSVLogger(log_dir) if log_dir is not None else False,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=log_dir,
    )
    defaults.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **defaults)


def logged_rows(trainer: pl.Trainer) -> list[dict[str, str]]:
    """The rows the CSVLogger wrote, after ``fit``."""
    assert trainer.logger is not None
    paths = glob.glob(os.path.join(trainer.logger.log_dir, "metrics.csv"))
    assert paths, f"no metrics.csv under {trainer.logger.log_dir}"
    with open(paths[0]) as f:
        return list(csv.DictReader(f))


def logged_values(rows: list[dict[str, str]], key: str) -> list[tuple[int, float]]:
    """``(epoch, value)`` of every row where ``key`` was written."""
    return [(int(float(r["epoch"])), float(r[key])) for r in rows if r.get(key, "") != ""]


def logged_keys(rows: list[dict[str, str]]) -> set[str]:
    return {k for r in rows for k, v in r.items() if v != ""}


def parameter_ids(module: nn.Module) -> set[int]:
    return {id(p) for p in module.parameters()}


def optimizers_holding(trainer: pl.Trainer, ids: set[int]) -> list[int]:
    """Indices of the Trainer's optimizers that update any of the tensors ``ids``."""
    return [
        i
        for i, opt in enumerate(trainer.optimizers)
        if ids & {id(p) for group in opt.param_groups for p in group["params"]}
    ]


def assert_probe_outside_main_optimizer(trainer: pl.Trainer, module: Any, probe_module: nn.Module) -> None:
    """The optimizer(s) training the backbone hold none of the probe's parameters."""
    main = optimizers_holding(trainer, parameter_ids(module.backbone))
    assert main, "no optimizer of the Trainer trains the backbone: the script's main optimizer is missing"
    probe_ids = parameter_ids(probe_module)
    shared = [i for i in main if i in optimizers_holding(trainer, probe_ids)]
    assert not shared, f"the main optimizer(s) {shared} also update the probe's parameters"


class OutputsSpy(pl.Callback):
    """Records what later callbacks see in ``outputs`` (place it after the probe, as OnlineWriter must be)."""

    def __init__(self, preds_key: str = "linear_preds", extra_keys: tuple[str, ...] = ()) -> None:
        self.preds_key = preds_key
        self.extra_keys = extra_keys
        self.train: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
        self.val: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
        self.val_embeddings: dict[int, list[torch.Tensor]] = defaultdict(list)
        self.missing: list[str] = []
        self.extra_seen: dict[str, int] = defaultdict(int)
        self.train_batches = 0

    def _record(self, stage: str, trainer: pl.Trainer, outputs: Any, batch: Any) -> tuple | None:
        for key in self.extra_keys:
            if isinstance(outputs, dict) and key in outputs:
                self.extra_seen[f"{stage}:{key}"] += 1
        if not isinstance(outputs, dict) or self.preds_key not in outputs:
            self.missing.append(f"{stage} outputs keys {sorted(outputs) if isinstance(outputs, dict) else outputs}")
            return None
        return outputs[self.preds_key].detach().clone(), batch["label"].clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.train_batches += 1
        got = self._record("train", trainer, outputs, batch)
        if got is not None:
            self.train[trainer.current_epoch].append(got)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if trainer.sanity_checking:
            return
        got = self._record("val", trainer, outputs, batch)
        if got is not None:
            self.val[trainer.current_epoch].append(got)
            self.val_embeddings[trainer.current_epoch].append(outputs["embedding"].detach().clone())


def epoch_loss(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean over the epoch's batches of the cross-entropy of the predictions the probe made (equal batch sizes)."""
    losses = [nn.functional.cross_entropy(preds, labels) for preds, labels in pairs]
    return float(torch.stack(losses).mean())


def epoch_accuracy(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    correct = sum(int((preds.argmax(-1) == labels).sum()) for preds, labels in pairs)
    return correct / sum(len(labels) for _, labels in pairs)
