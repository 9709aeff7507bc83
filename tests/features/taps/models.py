"""A tiny token model for the tap tests: token embedding, residual blocks in a ModuleList, a projection.

``training_step`` returns, besides the loss, the same activations the tap specs name, pooled by hand (plain torch,
not distprobe's pooling): a probe reading a tap must equal a probe reading these keys.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

IN_DIM = 8
TOKENS = 5
DIM = 6
NUM_CLASSES = 3
PROBE_SEED = 1000

#: (tap spec, explicit outputs key, probe input size); the bare spec reads the whole (B, N, D) output.
PAIRS = [
    ("backbone.blocks.1:cls+mean", "b1_cls_mean", 2 * DIM),
    ("backbone.blocks:last2+mean", "last2_mean", 3 * DIM),
    ("backbone.blocks.1", "b1", TOKENS * DIM),
    ("backbone.proj:cls+mean", "proj_cls_mean", 2 * DIM),
]


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(x))


class Encoder(nn.Module):
    def __init__(self, checkpointing: str | None = None) -> None:
        super().__init__()
        self.embed = nn.Linear(IN_DIM, TOKENS * DIM)
        self.blocks = nn.ModuleList([Block() for _ in range(3)])
        self.proj = nn.Linear(DIM, DIM)
        self.checkpointing = checkpointing

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h = self.embed(x).reshape(x.shape[0], TOKENS, DIM)
        hidden = []
        for block in self.blocks:
            if self.checkpointing is None:
                h = block(h)
            else:
                h = checkpoint(block, h, use_reentrant=self.checkpointing == "reentrant")
            hidden.append(h)
        return self.proj(h), hidden


def cls_mean(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x[:, 0], x[:, 1:].mean(1)], dim=-1)


def full(x: torch.Tensor) -> torch.Tensor:
    return x.full_tensor() if hasattr(x, "full_tensor") else x


class TokenModel(pl.LightningModule):
    """``kind``: ``plain`` (built in ``__init__``), ``fsdp2`` (built and sharded in ``configure_model``), ``tp``
    (``proj`` column-parallel with a DTensor output, then sharded over the data-parallel dimension)."""

    def __init__(self, seed: int = 0, kind: str = "plain", checkpointing: str | None = None) -> None:
        super().__init__()
        self.seed = seed
        self.kind = kind
        self.checkpointing = checkpointing
        self.backbone: Encoder | None = None
        if kind == "plain":
            self._build()

    def _build(self) -> None:
        torch.manual_seed(self.seed)
        self.backbone = Encoder(self.checkpointing)

    def configure_model(self) -> None:
        if self.kind == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            self._build()  # created here: the modules do not exist yet at the callbacks' setup
            mesh = self.device_mesh["data_parallel"]
            for block in self.backbone.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(self.backbone, mesh=mesh)
        elif self.kind == "tp":
            from torch.distributed.fsdp import fully_shard
            from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

            self._build()
            parallelize_module(
                self.backbone, self.device_mesh["tensor_parallel"], {"proj": ColwiseParallel(use_local_output=False)}
            )
            fully_shard(self.backbone, mesh=self.device_mesh["data_parallel"])

    def _step(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        out, hidden = self.backbone(batch["x"])
        out = full(out)
        target = batch["x"].sum(-1)
        loss = (out.mean(dim=(1, 2)) - target).pow(2).mean()
        return {
            "loss": loss,
            "b1_cls_mean": cls_mean(hidden[1]),
            "last2_mean": torch.cat([hidden[-2][:, 0], hidden[-1][:, 0], hidden[-1][:, 1:].mean(1)], dim=-1),
            "b1": hidden[1],
            "proj_cls_mean": cls_mean(out),
        }

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        return self._step(batch)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        outputs = self._step(batch)
        del outputs["loss"]
        return outputs

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def probe_pairs(pairs: list[tuple[str, str, int]] = PAIRS) -> list[Any]:
    """For each pair a tapped and an explicit OnlineProbe with the same initial weights and optimizer."""
    from torchmetrics.classification import MulticlassAccuracy

    from distprobe.callbacks import OnlineProbe

    probes = []
    for i, (spec, key, in_dim) in enumerate(pairs):
        for name, source in ((f"tap{i}", spec), (f"explicit{i}", key)):
            torch.manual_seed(PROBE_SEED + i)
            head = nn.Sequential(nn.Flatten(), nn.Linear(in_dim, NUM_CLASSES))
            probes.append(
                OnlineProbe(
                    None,
                    name=name,
                    input=source,
                    target="label",
                    probe=head,
                    optimizer={"type": "SGD", "lr": 0.1, "momentum": 0.9},
                    metrics={"top1": MulticlassAccuracy(NUM_CLASSES, average="micro")},
                )
            )
    return probes


def flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float().clone() for p in module.parameters()])


def our_hooks(module: nn.Module) -> int:
    """How many FeatureTap hooks are left on ``module`` and its submodules."""
    return sum(
        type(getattr(hook, "__self__", None)).__name__ == "FeatureTap"
        for m in module.modules()
        for hook in m._forward_hooks.values()
    )
