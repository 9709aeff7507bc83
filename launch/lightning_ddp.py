"""Probes as a Lightning callback (`distprobe.callbacks.OnlineProbe`) on a Trainer with DDP, under torchrun.

Lightning reads torchrun's variables (TorchElasticEnvironment); devices and num_nodes must match them.

    torchrun --standalone --nproc_per_node=2 launch/lightning_ddp.py --steps 100
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch
import torchmetrics
from common import (
    EMBED_DIM,
    NUM_CLASSES,
    Backbone,
    assert_probe_replicas_identical,
    augment,
    digits,
    finish,
    parse_args,
    ssl_loss,
)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from distprobe.callbacks import OnlineProbe


class SSLModule(pl.LightningModule):
    def __init__(self, lr: float, seed: int) -> None:
        super().__init__()
        self.backbone = Backbone()
        self.lr = lr
        self.seed = seed
        self.views: torch.Generator | None = None

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        if self.views is None:
            self.views = torch.Generator().manual_seed(self.seed * 7919 + self.global_rank)
        h1, z1 = self.backbone(augment(batch["x"], self.views))
        _, z2 = self.backbone(augment(batch["x"], self.views))
        # The probe reads "embedding" from these outputs and "label" from the batch; OnlineProbe detaches it.
        return {"loss": ssl_loss(z1, z2), "embedding": h1}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        h, _ = self.backbone(batch["x"])
        return {"embedding": h}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.backbone.parameters(), lr=self.lr)


def _as_dicts(samples: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    x, y = zip(*samples)
    return {"x": torch.stack(x), "label": torch.stack(y)}


def main() -> None:
    args = parse_args(__doc__)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    num_nodes = int(os.environ.get("WORLD_SIZE", "1")) // local_world
    if args.device == "cpu":
        torch.set_num_threads(1)
    pl.seed_everything(args.seed, verbose=False)

    x_train, y_train, x_val, y_val = digits(args.seed)
    train = DataLoader(TensorDataset(x_train, y_train), batch_size=args.batch_size, shuffle=True, collate_fn=_as_dicts)
    val = DataLoader(TensorDataset(x_val, y_val), batch_size=args.batch_size * 4, collate_fn=_as_dicts)

    model = SSLModule(args.lr, args.seed)
    probe = OnlineProbe(
        model,
        name="linear",
        input="embedding",
        target="label",
        probe=nn.Linear(EMBED_DIM, NUM_CLASSES),
        optimizer={"type": "AdamW", "lr": 1e-2},
        scheduler="CosineAnnealingLR",
        metrics={"top1": torchmetrics.classification.MulticlassAccuracy(NUM_CLASSES, average="micro")},
    )
    trainer = pl.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=local_world,
        num_nodes=num_nodes,
        strategy="ddp",
        precision="bf16-mixed" if args.precision == "bf16" else "32-true",
        max_steps=args.steps,
        val_check_interval=args.steps,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        callbacks=[probe],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, train, val)

    assert_probe_replicas_identical([probe.probe])
    if trainer.global_rank == 0:
        values = {k: float(v) for k, v in trainer.callback_metrics.items()}
        print(
            "lightning_ddp: world={} {}".format(
                trainer.world_size, " ".join(f"{k}={v:.4f}" for k, v in sorted(values.items()))
            )
        )
        print("lightning_ddp: OK (probe replicas identical on every rank)")
    finish()


if __name__ == "__main__":
    main()
