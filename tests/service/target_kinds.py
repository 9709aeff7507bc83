"""Datasets and a backbone for the service's multi-label and dense tests (configs name them by import path).

- `multilabel`: the points of `tests.service.models` with multi-hot labels (the point's class, plus the next class
  when its first coordinate is positive), and ``bad`` samples whose vector holds a 2 (bad data).
- `shapes` and `patch_encoder`: `distprobe.demo.shapes.ShapesSegmentation` at 32 px, and a 4x4-patch convolution
  whose output ``patch_tokens`` turns into ``(B, 64, D)`` tokens on an 8x8 grid.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tests.service.models import CLASSES, labeled
from torch import nn
from torch.utils.data import Dataset

from distprobe.demo.shapes import ShapesSegmentation

PATCH, SIZE, SEG_CLASSES, TOKEN_DIM = 4, 32, 4, 8


class MultiHotPoints(Dataset):
    """`tests.service.models.Points` with ``(CLASSES,)`` float multi-hot labels; the first ``bad`` hold a 2."""

    def __init__(self, split: str, bad: int) -> None:
        self.points = labeled(split)
        first = self.points.points[:, 0] > 0
        classes = self.points.labels
        self.labels = torch.zeros(len(classes), CLASSES)
        self.labels[torch.arange(len(classes)), classes] = 1.0
        self.labels[first, (classes[first] + 1) % CLASSES] = 1.0
        self.labels[:bad, 0] = 2.0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Any:
        return self.points.points[i], self.labels[i]


def multilabel(split: str, bad: int = 0) -> MultiHotPoints:
    """The multi-label train or val split."""
    return MultiHotPoints(split, bad)


class CroppedMasks(ShapesSegmentation):
    """ShapesSegmentation whose masks from sample ``crop_from`` on are cropped to 28 x 28 (images unchanged)."""

    def __init__(self, n: int, seed: int, crop_from: int) -> None:
        super().__init__(n, size=SIZE, num_classes=SEG_CLASSES, seed=seed)
        self.crop_from = crop_from

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = super().__getitem__(index)
        return image, mask[:28, :28] if index >= self.crop_from else mask


def shapes(split: str, n: int, crop_from: int | None = None) -> ShapesSegmentation:
    """A ShapesSegmentation split (train and val differ by seed); `CroppedMasks` when ``crop_from`` is given."""
    seed = {"train": 0, "val": 1}[split]
    if crop_from is not None:
        return CroppedMasks(n, seed, crop_from)
    return ShapesSegmentation(n, size=SIZE, num_classes=SEG_CLASSES, seed=seed)


def patch_encoder() -> nn.Module:
    """A patch embedding: ``(B, 3, 32, 32)`` images to a ``(B, TOKEN_DIM, 8, 8)`` map."""
    return nn.Conv2d(3, TOKEN_DIM, kernel_size=PATCH, stride=PATCH)


def patch_tokens(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``features.forward``: the map as ``(B, 64, TOKEN_DIM)`` patch tokens, row-major over the grid."""
    return backbone(images).flatten(2).transpose(1, 2)


def pooled(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``features.forward`` of one pooled vector per image (what a dense bank cannot read)."""
    return backbone(images).mean(dim=(2, 3))


def patch_checkpoint(folder: Path) -> Path:
    """A Lightning-layout ``.ckpt`` holding a seeded `patch_encoder` under ``backbone.`` (no training needed)."""
    torch.manual_seed(0)
    state = {f"backbone.{k}": v for k, v in patch_encoder().state_dict().items()}
    path = folder / "checkpoints" / "epoch=0-step=5.ckpt"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": state, "global_step": 5}, path)
    return path
