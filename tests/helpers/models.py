"""Small models and data shared by the tests: a frozen-ish backbone emitting an embedding, dict batches."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

IN_DIM = 8
EMBED_DIM = 16
NUM_CLASSES = 3


class SeparableData(Dataset):
    """Gaussian blobs that a linear probe separates almost perfectly; batches are dicts with nested keys."""

    def __init__(self, n: int = 192, seed: int = 0) -> None:
        # The same class centres for every split; the seed draws the samples.
        centers = torch.randn(NUM_CLASSES, IN_DIM, generator=torch.Generator().manual_seed(99)) * 4
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
        self.x = centers[self.y] + 0.5 * torch.randn(n, IN_DIM, generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"x": self.x[i], "label": self.y[i], "meta": {"label": self.y[i]}, "index": i}


class RandomPoints(Dataset):
    """Standard-normal points with uniform random labels; items are ``{"x", "label", "idx"}``."""

    def __init__(self, size: int, seed: int, in_dim: int, num_classes: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(size, in_dim, generator=g)
        self.y = torch.randint(0, num_classes, (size,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"x": self.x[i], "label": self.y[i], "idx": i}


class Backbone(pl.LightningModule):
    """A linear backbone trained on a label-free loss; returns its embedding in a nested outputs dict."""

    def __init__(self, lr: float = 0.01) -> None:
        super().__init__()
        torch.manual_seed(1234)
        self.backbone = nn.Linear(IN_DIM, EMBED_DIM)
        self.lr = lr

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        emb = self.backbone(batch["x"])
        loss = (emb.pow(2).mean() - 1.0).abs()
        return {"loss": loss, "embedding": emb, "nested": {"emb": emb}}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        emb = self.backbone(batch["x"])
        return {"embedding": emb, "nested": {"emb": emb}}

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.backbone.parameters(), lr=self.lr)


def loader(n: int = 192, batch_size: int = 32, seed: int = 0, **kwargs: Any) -> DataLoader:
    return DataLoader(SeparableData(n, seed), batch_size=batch_size, **kwargs)


def trainer(callbacks: list, max_epochs: int = 2, **kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return pl.Trainer(max_epochs=max_epochs, callbacks=callbacks, **defaults)


class ResumableBatches:
    """``data``'s batches in order, from a loader that saves its position and continues from it (``_Stateful``).

    What a resumable loader gives a fit resumed mid-epoch: the batches after the checkpoint, not the epoch again.
    """

    def __init__(self, data: Dataset, batch_size: int) -> None:
        self.data, self.batch_size = data, batch_size
        self.batches = len(data) // batch_size  # type: ignore[arg-type]
        self.start = self.position = 0

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        start, self.start = self.start, 0
        for i in range(start, self.batches):
            self.position = i + 1
            yield default_collate([self.data[j] for j in range(i * self.batch_size, (i + 1) * self.batch_size)])

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.start = state["position"] % self.batches
