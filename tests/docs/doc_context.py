"""The names the guides' code blocks take as given (``module``, ``train_loader``, ``model``...), built small.

A guide shows the lines a user adds to their own training; what those lines stand in (their LightningModule, their
loaders, their loop's model and optimizer) comes from here, shaped as the guides describe: a ViT-like backbone with
``backbone.blocks`` of 768-wide tokens, batches of ``{"image", "label"}`` with 1000 classes. Trainers built inside a
block run a few CPU steps (`fast_trainer`), whatever the block asks for, so that a guide's ``max_epochs=100`` or
``strategy="distprobe_fsdp2"`` costs seconds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

DIM, TOKENS, CLASSES, IMAGE = 768, 5, 1000, 16


class Backbone(nn.Module):
    """``image -> tokens -> 12 blocks -> CLS``; each block's output is a ``(B, TOKENS, DIM)`` token tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(IMAGE, TOKENS * DIM)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(DIM), nn.Linear(DIM, DIM)) for _ in range(12))
        self.norm = nn.LayerNorm(DIM)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.embed(image).view(image.shape[0], TOKENS, DIM)
        for block in self.blocks:
            x = x + block(x)
        return self.norm(x)[:, 0]


class Module(pl.LightningModule):
    """A user's LightningModule: a stand-in SSL loss; the step returns its ``embedding``."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = Backbone()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        embedding = self.backbone(batch["image"])
        return {"loss": embedding.pow(2).mean(), "embedding": embedding}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return {"embedding": self.backbone(batch["image"])}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)

    def configure_model(self) -> None:
        mesh = getattr(self, "_device_mesh", None)
        if mesh is not None:  # distprobe_fsdp2 (ModelParallelStrategy): shard as a user's FSDP2 module would
            from torch.distributed.fsdp import fully_shard

            fully_shard(self.backbone, mesh=mesh["data_parallel"])


class Images(Dataset):
    """Labeled (or not) random "images"; labels cover few of the 1000 classes, as a small batch would."""

    def __init__(self, n: int, labeled: bool = True, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, IMAGE, generator=g)
        self.labels = torch.randint(0, CLASSES, (n,), generator=g)
        self.labeled = labeled

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {"image": self.images[i]}
        if self.labeled:
            item["label"] = self.labels[i]
        return item


class Wrapped(nn.Module):
    """What a plain-torch loop's ``model`` is: a wrapper (DDP, FSDP) whose ``.module`` holds the backbone."""

    def __init__(self) -> None:
        super().__init__()
        self.module = Module()

    def forward(self, x: Any) -> Any:
        image = x["image"] if isinstance(x, dict) else x
        return self.module.backbone(image)


class TwoOutputs(nn.Module):
    """plain-torch.md's ``model``: ``h, z = model(x)``, the embedding and a projection."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = Backbone()
        self.projector = nn.Linear(DIM, 32)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.backbone(x)
        return h.detach(), self.projector(h)


def namespace(tmp_path: Any) -> dict[str, Any]:
    """Every name a guide's block may use without defining it."""
    torch.manual_seed(0)
    labeled, val = Images(64), Images(32, seed=1)
    big, big_val = Images(512, seed=4), Images(512, seed=5)  # own-data.md's loaders take batches of 256 and 512
    unlabeled = Images(64, labeled=False, seed=2)
    module = Module()
    two = TwoOutputs()
    wrapped = Wrapped()
    loader = [(x["image"], x["label"]) for x in DataLoader(labeled, batch_size=16)]
    return {
        "pl": pl,
        "torch": torch,
        "nn": nn,
        "module": module,
        "ssl_module": module,
        "train_loader": DataLoader(labeled, batch_size=16),
        "val_loader": DataLoader(val, batch_size=16),
        "unlabeled_loader": DataLoader(unlabeled, batch_size=16),
        "unlabeled_val_loader": DataLoader(Images(32, labeled=False, seed=3), batch_size=16),
        "labeled_subset": big,
        "labeled_val_set": big_val,
        "labeled_train": DataLoader(labeled, batch_size=16, shuffle=True, drop_last=True),
        "labeled_val": DataLoader(val, batch_size=16),
        "labeled_loader": DataLoader(labeled, batch_size=16, shuffle=True, drop_last=True),
        "make_mlp": lambda: nn.Sequential(nn.Linear(DIM, 64), nn.ReLU(), nn.Linear(64, CLASSES)),
        "device": torch.device("cpu"),
        "epochs": 1,
        "loader": loader,
        "val_batches": [(x, y, x.shape[0]) for x, y in loader[:2]],
        "ssl_loss": lambda z: z.pow(2).mean(),
        "path": str(tmp_path / "probes.pt"),
        "dp_group": None,
        "features": torch.randn(64, 32),
        "labels": torch.randint(0, 10, (64,)),
        "val_features": torch.randn(16, 32),
        "val_labels": torch.randint(0, 10, (16,)),
        "n": 16,
        "dim": DIM,
        # Plain-torch pages: the model and its optimizer, by the shape each page gives them.
        "model": two,
        "optimizer": torch.optim.SGD(two.parameters(), lr=1e-3),
        "_wrapped": wrapped,
        "_wrapped_optimizer": torch.optim.SGD(wrapped.parameters(), lr=1e-3),
    }


FAST = {
    "accelerator": "cpu",
    "devices": 1,
    "num_nodes": 1,
    "max_steps": 2,
    "max_epochs": 1,
    "limit_train_batches": 2,
    "limit_val_batches": 1,
    "num_sanity_val_steps": 0,
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}


@contextlib.contextmanager
def fast_trainer() -> Iterator[None]:
    """``pl.Trainer`` runs a couple of CPU steps on one process whatever a block passes (its strategy kept)."""
    original = pl.Trainer

    class Trainer(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **{**kwargs, **FAST})

    pl.Trainer = Trainer  # type: ignore[misc]
    try:
        yield
    finally:
        pl.Trainer = original  # type: ignore[misc]
