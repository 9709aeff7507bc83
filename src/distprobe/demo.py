"""The main job: SimCLR on scikit-learn's 8x8 digits with live online probes, on CPU in about a minute.

The dataset ships inside scikit-learn, so nothing is downloaded. The backbone never sees a label; the probes read
its detached embedding and report how linearly decodable the digit classes are as training goes.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torchmetrics
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from distprobe.callbacks import OnlineProbe

log = logging.getLogger(__name__)

NUM_CLASSES = 10


@dataclass(kw_only=True)
class DemoConfig:
    """Settings of the demo run."""

    epochs: int = 60
    """Training epochs."""
    batch_size: int = 64
    """Per-process batch size."""
    devices: int = 1
    """CPU processes; more than one trains with DDP over gloo."""
    lr: float = 3e-3
    """Backbone learning rate (AdamW)."""
    temperature: float = 0.2
    """InfoNCE temperature."""
    seed: int = 0
    """Seed of the split, the weights and the augmentations."""
    out_dir: str = "distprobe_runs/demo"
    """Where the CSV logs and the checkpoint go."""
    limit_train_batches: float | int = 1.0
    """Lightning's limit, for short test runs."""
    progress_bar: bool = True
    """Show Lightning's progress bar."""
    ckpt_path: str | None = None
    """Resume from this checkpoint."""
    extra_callbacks: list[Any] = field(default_factory=list)
    """More Lightning callbacks (for example a preemption handler)."""

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "devices"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"demo: argument '{name}' got {value!r}; expected a positive int.")


class Digits(Dataset):
    """scikit-learn's 8x8 digits as ``{"image": (1, 8, 8) float in [0, 1], "label": int, "index": int}``."""

    def __init__(self, split: str, seed: int = 0) -> None:
        try:
            from sklearn.datasets import load_digits
        except ImportError as err:  # the demo extra
            raise ImportError("the demo needs scikit-learn: pip install 'distprobe[demo]'") from err
        data = load_digits()
        images = torch.tensor(data.images, dtype=torch.float32) / 16.0
        labels = torch.tensor(data.target, dtype=torch.long)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        n_val = len(labels) // 5
        keep = order[:n_val] if split == "val" else order[n_val:]
        self.images = images[keep].unsqueeze(1)
        self.labels = labels[keep]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.images[i], "label": self.labels[i], "index": i}


def augment(images: torch.Tensor) -> torch.Tensor:
    """A random view of each image: shift by up to one pixel, rescale contrast, drop pixels, add noise."""
    n = images.shape[0]
    # Every 8x8 crop of the 1-pixel-padded image, then one random crop per sample.
    crops = F.pad(images, (1, 1, 1, 1)).unfold(2, 8, 1).unfold(3, 8, 1)  # (n, 1, 3, 3, 8, 8)
    dy, dx = torch.randint(0, 3, (2, n), device=images.device)
    view = crops[torch.arange(n, device=images.device), :, dy, dx]  # (n, 1, 8, 8)
    contrast = torch.empty(n, 1, 1, 1, device=images.device).uniform_(0.7, 1.3)
    keep = (torch.rand_like(view) > 0.1).float()
    return (view * contrast * keep + 0.05 * torch.randn_like(view)).clamp(0, 1.5)


class SimCLR(pl.LightningModule):
    """A small MLP encoder trained with InfoNCE between two augmented views; labels are never used."""

    def __init__(self, lr: float = 3e-3, temperature: float = 0.2, embed_dim: int = 128) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, embed_dim)
        )
        self.projector = nn.Sequential(nn.Linear(embed_dim, 128), nn.GELU(), nn.Linear(128, 64))

    def info_nce(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """Contrastive loss: each view must pick out its partner among the batch's other views."""
        z = F.normalize(torch.cat([z1, z2]), dim=1)
        sim = z @ z.T / self.hparams["temperature"]
        sim.fill_diagonal_(float("-inf"))
        n = z1.shape[0]
        partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
        return F.cross_entropy(sim, partner)

    @override
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        images = batch["image"]
        loss = self.info_nce(
            self.projector(self.backbone(augment(images))), self.projector(self.backbone(augment(images)))
        )
        self.log("train/ssl_loss", loss, on_step=True, on_epoch=True, prog_bar=True, sync_dist=True)
        # The probes train on the clean image's embedding; OnlineProbe detaches it.
        return {"loss": loss, "embedding": self.backbone(images)}

    @override
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return {"embedding": self.backbone(batch["image"])}

    @override
    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams["lr"], weight_decay=1e-4)


def make_probes(module: SimCLR | None = None) -> list[OnlineProbe]:
    """The demo's two probes: linear (LARS, the SSL default) and a small MLP (AdamW, cosine schedule)."""

    def metrics() -> dict[str, torchmetrics.Metric]:
        return {
            "top1": torchmetrics.classification.MulticlassAccuracy(NUM_CLASSES, average="micro"),
            "f1": torchmetrics.classification.MulticlassF1Score(NUM_CLASSES, average="macro"),
        }

    return [
        OnlineProbe(
            module,
            name="linear",
            input="embedding",
            target="label",
            probe=nn.Linear(128, NUM_CLASSES),
            optimizer=None,
            metrics=metrics(),
        ),
        OnlineProbe(
            module,
            name="mlp",
            input="embedding",
            target="label",
            probe=lambda: nn.Sequential(nn.Linear(128, 128), nn.GELU(), nn.Linear(128, NUM_CLASSES)),
            optimizer={"type": "AdamW", "lr": 1e-3},
            scheduler="CosineAnnealingLR",
            metrics=metrics(),
        ),
    ]


class EpochTable(pl.Callback):
    """Writes one line per epoch to stdout on global rank 0: the demo's own terminal output."""

    COLUMNS = ("epoch", "ssl_loss", "linear_loss", "linear_top1", "mlp_top1", "seconds")

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self._start = time.monotonic()

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        m = trainer.callback_metrics

        def value(key: str) -> float:
            return float(m[key]) if key in m else math.nan

        row = {
            "epoch": trainer.current_epoch,
            "ssl_loss": value("train/ssl_loss_epoch"),
            "linear_loss": value("train/linear_loss"),
            "linear_top1": value("eval/linear_top1"),
            "mlp_top1": value("eval/mlp_top1"),
            "seconds": time.monotonic() - self._start,
        }
        self.rows.append(row)
        if trainer.is_global_zero:
            if len(self.rows) == 1:
                _write(" | ".join(f"{c:>11}" for c in self.COLUMNS))
            _write(" | ".join(f"{row[c]:>11.4f}" if c != "epoch" else f"{row[c]:>11d}" for c in self.COLUMNS))


def _write(line: str) -> None:
    # The demo's table is its output, not a log message: it goes to stdout, above the progress bar.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Train, and return the final eval metrics and the per-epoch table (rank 0's view)."""
    pl.seed_everything(config.seed, workers=True, verbose=False)
    module = SimCLR(lr=config.lr, temperature=config.temperature)
    table = EpochTable()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=config.devices,
        strategy="ddp" if config.devices > 1 else "auto",
        max_epochs=config.epochs,
        callbacks=[*make_probes(module), table, *config.extra_callbacks],
        logger=CSVLogger(config.out_dir, name="logs"),
        default_root_dir=config.out_dir,
        limit_train_batches=config.limit_train_batches,
        enable_progress_bar=config.progress_bar,
        enable_model_summary=False,
        log_every_n_steps=5,
        num_sanity_val_steps=0,
    )
    train = DataLoader(Digits("train", config.seed), batch_size=config.batch_size, shuffle=True, drop_last=True)
    val = DataLoader(Digits("val", config.seed), batch_size=256)
    trainer.fit(module, train, val, ckpt_path=config.ckpt_path)
    final = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("eval/")}
    return {
        "final": final,
        "rows": table.rows,
        "log_dir": trainer.logger.log_dir if trainer.logger else None,
        "is_global_zero": trainer.is_global_zero,
    }


def default_out_dir() -> Path:
    """Where `distprobe demo` writes unless told otherwise."""
    return Path(DemoConfig().out_dir)
