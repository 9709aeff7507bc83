"""Workloads of the overhead benchmark: backbones defined here (no download), synthetic data, LightningModules.

- ``vit``: a ViT-B/16-shaped transformer (12 blocks, width 768, 12 heads, MLP 3072, 224x224 input), batch 128;
- ``resnet``: a ResNet-18-shaped CNN for 32x32 input (3x3 stem, no max-pool, BasicBlocks [2, 2, 2, 2]), batch 512;
- ``mlp``: a small MLP for the CPU; ``tiny``: the CI smoke form.

Every LightningModule trains its backbone with AdamW on a stand-in self-supervised loss (the squared output of a
projector), returns the backbone's embedding under ``"embedding"`` and reads labels from ``batch["label"]``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import IterableDataset


class Block(nn.Module):
    """A pre-norm transformer block using PyTorch's fused attention."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(attn)
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """A ViT-B/16-shaped encoder; returns the class token (``dim`` features)."""

    def __init__(self, image: int = 224, patch: int = 16, dim: int = 768, depth: int = 12, heads: int = 12) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x[:, 0])


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """A ResNet-18-shaped CNN for 32x32 images (CIFAR stem); returns 512 pooled features."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        widths = [64, 128, 256, 512]
        stages = []
        cin = 64
        for i, w in enumerate(widths):
            stages.append(nn.Sequential(BasicBlock(cin, w, 1 if i == 0 else 2), BasicBlock(w, w, 1)))
            cin = w
        self.blocks = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.blocks:
            x = stage(x)
        return x.mean(dim=(2, 3))


class MLP(nn.Module):
    def __init__(self, in_dim: int, hidden: int, out_dim: int, depth: int = 3) -> None:
        super().__init__()
        dims = [in_dim] + [hidden] * (depth - 1)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(a, b), nn.GELU()) for a, b in zip(dims[:-1], dims[1:]))
        self.out = nn.Linear(dims[-1], out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.out(x)


@dataclass(kw_only=True)
class Workload:
    """One benchmark workload."""

    name: str
    make_backbone: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    """Shape of one sample."""
    batch_size: int
    embed_dim: int
    num_classes: int
    precision: str
    warmup: int
    steps: int
    """Timed steps per run."""
    rounds: int
    """Interleaved rounds: every variant runs once per round, in a rotated order."""


WORKLOADS: dict[str, Workload] = {
    "vit": Workload(
        name="ViT-B/16 224px, batch 128",
        make_backbone=ViT,
        input_shape=(3, 224, 224),
        batch_size=128,
        embed_dim=768,
        num_classes=1000,
        precision="bf16-mixed",
        warmup=8,
        steps=25,
        rounds=5,
    ),
    "resnet": Workload(
        name="ResNet-18 32px, batch 512",
        make_backbone=ResNet18,
        input_shape=(3, 32, 32),
        batch_size=512,
        embed_dim=512,
        num_classes=100,
        precision="bf16-mixed",
        warmup=10,
        steps=60,
        rounds=15,
    ),
    "mlp": Workload(
        name="MLP 256-1024-1024-256, batch 256 (CPU)",
        make_backbone=lambda: MLP(256, 1024, 256),
        input_shape=(256,),
        batch_size=256,
        embed_dim=256,
        num_classes=100,
        precision="32-true",
        warmup=3,
        steps=20,
        rounds=3,
    ),
    "tiny": Workload(
        name="tiny MLP (smoke)",
        make_backbone=lambda: MLP(16, 32, 16, depth=2),
        input_shape=(16,),
        batch_size=8,
        embed_dim=16,
        num_classes=5,
        precision="32-true",
        warmup=1,
        steps=2,
        rounds=1,
    ),
}


class SyntheticBatches(IterableDataset):
    """An endless stream of ready batches, already on the device (the benchmark times the model, not a loader).

    A few distinct batches are cycled so that no result is reused from a cache.
    """

    def __init__(self, workload: Workload, device: torch.device, distinct: int = 4, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.batches = [
            (
                torch.randn(workload.batch_size, *workload.input_shape, generator=g).to(device),
                torch.randint(0, workload.num_classes, (workload.batch_size,), generator=g).to(device),
            )
            for _ in range(distinct)
        ]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        i = 0
        while True:
            x, y = self.batches[i % len(self.batches)]
            i += 1
            # A fresh dict per step: probes write their predictions into the batch.
            yield {"image": x, "label": y}


def shard_blocks(module: nn.Module, mesh: Any) -> None:
    """FSDP2: shard each block of the backbone, then the rest of the module (probes are hidden by the strategy)."""
    from torch.distributed.fsdp import fully_shard

    backbone = module.backbone  # type: ignore[union-attr]
    for block in getattr(backbone, "blocks", []):
        fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh)


class SSLModule(pl.LightningModule):
    """The probed model: a backbone trained by AdamW on a stand-in SSL loss; no probe of its own."""

    def __init__(self, backbone: nn.Module, embed_dim: int, lr: float = 1e-4) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = nn.Linear(embed_dim, 256)
        self.lr = lr

    def configure_model(self) -> None:
        mesh = self.device_mesh
        if mesh is not None:
            # ModelParallelStrategy's mesh is data-parallel x tensor-parallel: shard over the data-parallel dimension.
            shard_blocks(self, mesh["data_parallel"])

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        # Called through self(...): FSDP2's root hooks gather the parameters around forward.
        return self.backbone(image)

    def ssl_loss(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.projector(embedding).float().pow(2).mean()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        embedding = self(batch["image"])
        return {"loss": self.ssl_loss(embedding), "embedding": embedding}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return {"embedding": self(batch["image"])}

    def main_param_groups(self) -> list[dict[str, Any]]:
        return [{"params": [p for n, p in self.named_parameters() if not n.startswith("classifier")]}]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.main_param_groups(), lr=self.lr, weight_decay=0.05)


class ParamGroupProbeModule(SSLModule):
    """The lightly / solo-learn pattern: the probe is a submodule whose parameters are a group of the main optimizer.

    Its loss is added to the main loss (one backward, one optimizer step), its accuracy is computed on the device
    and logged as a tensor, as lightly's ``OnlineLinearClassifier`` and solo-learn's ``BaseMethod`` do.
    """

    def __init__(self, backbone: nn.Module, embed_dim: int, num_classes: int, lr: float = 1e-4) -> None:
        super().__init__(backbone, embed_dim, lr)
        self.classifier = nn.Linear(embed_dim, num_classes)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        out = super().training_step(batch, batch_idx)
        logits = self.classifier(out["embedding"].detach())
        probe_loss = F.cross_entropy(logits, batch["label"])
        acc = (logits.argmax(dim=1) == batch["label"]).float().mean()
        self.log_dict({"train/online_cls_loss": probe_loss.detach(), "train/online_cls_top1": acc}, on_step=True)
        out["loss"] = out["loss"] + probe_loss
        return out

    def main_param_groups(self) -> list[dict[str, Any]]:
        groups = super().main_param_groups()
        groups.append({"params": list(self.classifier.parameters()), "lr": 1e-3, "weight_decay": 0.0})
        return groups
