"""What the probing-service tests train and evaluate: an encoder, a labeled dataset, and a training that checkpoints.

Evaluation configs name these by import path (``tests.service.models.encoder``), as a user's config names theirs.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

IN_DIM, DIM, CLASSES = 8, 16, 4


def encoder(dim: int = DIM) -> nn.Module:
    """The backbone the configs build; its weights come from the checkpoint."""
    return nn.Sequential(nn.Linear(IN_DIM, 32), nn.ReLU(), nn.Linear(32, dim))


class Points(Dataset):
    """Labeled points: class means plus noise, fixed by ``seed``; ``delay_s`` per item slows extraction down."""

    def __init__(self, n: int, seed: int, delay_s: float = 0.0, as_dict: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        means = torch.randn(CLASSES, IN_DIM, generator=torch.Generator().manual_seed(99)) * 0.6
        self.labels = torch.randint(0, CLASSES, (n,), generator=g)
        self.points = means[self.labels] + torch.randn(n, IN_DIM, generator=g)
        self.delay_s = delay_s
        self.as_dict = as_dict

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Any:
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.as_dict:
            return {"x": self.points[i], "y": int(self.labels[i])}
        return self.points[i], int(self.labels[i])


def labeled(split: str, n: int | None = None, delay_s: float = 0.0, as_dict: bool = False) -> Points:
    """The labeled train or val split."""
    seeds = {"train": 1, "val": 2}
    sizes = {"train": 200, "val": 75}
    return Points(n or sizes[split], seeds[split], delay_s, as_dict)


class Pretraining(pl.LightningModule):
    """A backbone trained with a loss of its own (denoising the points), so each checkpoint's features differ."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = encoder()
        self.decoder = nn.Linear(DIM, IN_DIM)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, _ = batch
        loss = nn.functional.mse_loss(self.decoder(self.backbone(x + 0.5 * torch.randn_like(x))), x)
        self.log("train_loss", loss)  # so the run has a log of its own (metrics.csv or TensorBoard events)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def pretrain(out_dir: str, steps: int = 30, every_n_steps: int = 10, pause_s: float = 0.0) -> list[str]:
    """A real Lightning fit that writes a checkpoint every ``every_n_steps`` steps; returns their paths.

    ``pause_s`` sleeps after each checkpoint, so a watcher sees them appear over time.
    """
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    class Pause(Callback):
        def on_save_checkpoint(self, *args: Any) -> None:
            time.sleep(pause_s)

    folder = Path(out_dir) / "checkpoints"
    checkpoint = ModelCheckpoint(
        dirpath=folder, filename="{epoch}-{step}", every_n_train_steps=every_n_steps, save_top_k=-1
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        default_root_dir=out_dir,
        callbacks=[checkpoint, Pause()],
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=5,
    )
    trainer.fit(Pretraining(), DataLoader(labeled("train", 400), batch_size=32, shuffle=True))
    return sorted(str(p) for p in folder.glob("*.ckpt"))


def eval_config(path: Path, **overrides: Any) -> Path:
    """Write an evaluation config for these models to ``path``; ``overrides`` replace whole top-level sections."""
    import yaml

    config: dict[str, Any] = {
        "num_classes": CLASSES,
        "backbone": {"_target_": "tests.service.models.encoder"},
        "weights": {"prefix": "backbone."},
        "data": {
            "train": {"_target_": "tests.service.models.labeled", "split": "train"},
            "val": {"_target_": "tests.service.models.labeled", "split": "val"},
            "batch_size": 32,
        },
        "probes": {
            "epochs": 3,
            "batch_size": 20,
            "bank": {"lr": [0.01, 0.1, 1.0], "weight_decay": [0.0, 0.001], "optimizer": "SGD"},
            "knn": {"k": [5, 20], "temperature": 0.1},
        },
        "results": {"logger": "auto"},
    }
    config.update(overrides)
    path.write_text(yaml.safe_dump(config))
    return path


if __name__ == "__main__":  # python -m tests.service.models OUT_DIR STEPS EVERY PAUSE: the tests' background training
    import sys

    print("\n".join(pretrain(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))), flush=True)


def run_dir_with(tmp_path: Path, checkpoints: list[str]) -> Path:
    """A run directory under `tmp_path` holding copies of `checkpoints` in its ``checkpoints/`` folder."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for path in checkpoints:
        shutil.copy(path, run / "checkpoints" / Path(path).name)
    return run


def local_watcher(run: Path, config: Path, **options: Any) -> Any:
    """A `Watcher` of `run` submitting local (submitit) jobs; `options` are `WatchConfig` fields."""
    from distprobe.cluster import ClusterConfig
    from distprobe.service.watch import WatchConfig, Watcher

    return Watcher(WatchConfig(run_dir=run, config_path=config, cluster=ClusterConfig(cluster="local"), **options))
