"""Shared pieces of the CUDA tests: a small backbone, data, a recorder, and a float64 reference of the probe step."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader

from helpers.models import RandomPoints

IN_DIM = 16
EMBED_DIM = 32
NUM_CLASSES = 4
BATCH = 8


def loaders(train: int = 32, val: int = 10) -> tuple[DataLoader, DataLoader]:
    return (
        DataLoader(RandomPoints(train, seed=0, in_dim=IN_DIM, num_classes=NUM_CLASSES), batch_size=BATCH),
        DataLoader(RandomPoints(val, seed=1, in_dim=IN_DIM, num_classes=NUM_CLASSES), batch_size=BATCH),
    )


class Backbone(pl.LightningModule):
    """Linear-LayerNorm-GELU-Linear trained by SGD on a regression loss; FSDP2 shards it in ``configure_model``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(
            nn.Linear(IN_DIM, EMBED_DIM), nn.LayerNorm(EMBED_DIM), nn.GELU(), nn.Linear(EMBED_DIM, EMBED_DIM)
        )

    def configure_model(self) -> None:
        mesh = self.device_mesh
        if mesh is not None:
            from torch.distributed.fsdp import fully_shard

            # ModelParallelStrategy's mesh is data-parallel x tensor-parallel: shard over the data-parallel dimension.
            mesh = mesh["data_parallel"]

            fully_shard(self.encoder[0], mesh=mesh)
            fully_shard(self, mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Called through self(...): FSDP2's root hooks gather the parameters around forward.
        return self.encoder(x)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        emb = self(batch["x"])
        loss = (emb.float() - batch["x"].sum(-1, keepdim=True)).pow(2).mean()
        return {"loss": loss, "embedding": emb}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        return {"embedding": self(batch["x"])}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def probe_params(callback: Any) -> list[torch.Tensor]:
    return [p.detach().float().clone() for p in callback.probe.module.parameters()]


class Recorder(Callback):
    """Placed before (``phase="before"``) or after the probe: records the probe's inputs and weights of each step."""

    def __init__(self, probe_callback: Any, phase: str, steps: list[dict[str, Any]] | None = None) -> None:
        self.probe_callback = probe_callback
        self.phase = phase
        self.steps: list[dict[str, Any]] = [] if steps is None else steps
        self.val: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.phase == "before":
            features = outputs["embedding"]
            features = features.full_tensor() if hasattr(features, "full_tensor") else features
            self.steps.append(
                {
                    "features": features.detach().float().clone(),
                    "label": batch["label"].clone(),
                    "before": probe_params(self.probe_callback),
                }
            )
        else:
            self.steps[-1]["after"] = probe_params(self.probe_callback)

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self.phase == "after" and not trainer.sanity_checking:
            self.val.append((outputs["embedding"].detach().float().clone(), batch["label"].clone()))


def reference_sgd_step(
    weight: torch.Tensor,
    bias: torch.Tensor,
    features: torch.Tensor,
    labels: torch.Tensor,
    lr: float,
    clip: float | None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One plain-SGD step of a linear probe in float64, norm-clipped on the true (unscaled) gradients."""
    w = weight.double().requires_grad_(True)
    b = bias.double().requires_grad_(True)
    loss = F.cross_entropy(features.double() @ w.T + b, labels)
    gw, gb = torch.autograd.grad(loss, [w, b])
    norm = torch.sqrt(gw.pow(2).sum() + gb.pow(2).sum()).item()
    factor = 1.0 if clip is None else min(1.0, clip / (norm + 1e-6))
    return (w - lr * factor * gw).detach(), (b - lr * factor * gb).detach(), norm


class SyncGuard(Callback):
    """Placed before and after the probe: the probe's ``on_train_batch_end`` runs under sync-debug ``"error"``.

    The first step is left out: the probe's one-time first-batch check reads the label range on the host.
    """

    def __init__(self, opener: SyncGuard | None = None) -> None:
        self.opener = opener
        self.previous = 0
        self.checked = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            return
        if self.opener is None:
            self.previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
        else:
            torch.cuda.set_sync_debug_mode(self.opener.previous)
            self.opener.checked += 1


def trainer_kwargs(**overrides: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        accelerator="gpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    kwargs.update(overrides)
    return kwargs
