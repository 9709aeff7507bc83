"""A small segmentation set made by code: shapes of several classes on textured backgrounds, with their masks.

No download: sample ``i`` is drawn from a generator seeded by ``(seed, i)``, so a set is the same on every machine and
every rank, and any subset can be built alone. Each image holds one to three shapes (later ones occlude earlier
ones); a shape's class sets its geometry (disk, square, triangle, ring, cross...) and its colour and stripe texture,
each with noise, so that a linear head on patch features can tell the classes apart but not perfectly. The
background (class 0) has random stripes of a random colour. With ``ignore_border`` the pixels on a boundary between
two labels get ``ignore_index`` (255), as in Pascal VOC.

Example:
    >>> data = ShapesSegmentation(8, size=32)
    >>> image, mask = data[0]
    >>> tuple(image.shape), tuple(mask.shape), mask.dtype
    ((3, 32, 32), (32, 32), torch.int64)
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset

from distprobe.arguments import require_count

#: The shapes by class (class 0 is the background); a set with C classes uses the first C - 1.
SHAPES = ("disk", "square", "triangle", "ring", "cross", "diamond")
IGNORE_INDEX = 255


def _shape_mask(kind: str, dx: torch.Tensor, dy: torch.Tensor, r: float) -> torch.Tensor:
    """Where a shape of ``kind`` and radius ``r`` covers pixels at offsets ``(dx, dy)`` from its centre."""
    dist = torch.sqrt(dx * dx + dy * dy)
    if kind == "disk":
        return dist < r
    if kind == "square":
        return torch.maximum(dx.abs(), dy.abs()) < r * 0.85
    if kind == "triangle":
        return (dy < r * 0.8) & (dx.abs() < (dy + r) * 0.55)
    if kind == "ring":
        return (dist < r) & (dist > r * 0.55)
    if kind == "cross":
        return ((dx.abs() < r * 0.3) | (dy.abs() < r * 0.3)) & (torch.maximum(dx.abs(), dy.abs()) < r)
    return dx.abs() + dy.abs() < r  # diamond


class ShapesSegmentation(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """``(image, mask)`` pairs: a ``(3, size, size)`` float image in about [0, 1] and a ``(size, size)`` int64 mask.

    Args:
        length: Number of samples.
        size: Image side in pixels.
        num_classes: Classes including the background (2 to ``len(SHAPES) + 1``).
        seed: Chooses the set (sample ``i`` is the same for any ``length``).
        ignore_border: Pixels on a boundary between two labels get `IGNORE_INDEX`.
    """

    def __init__(
        self, length: int, *, size: int = 64, num_classes: int = 5, seed: int = 0, ignore_border: bool = True
    ) -> None:
        # A count first (2.5 or True is no number of classes), then the range the shapes can fill.
        require_count("ShapesSegmentation", "num_classes", num_classes, minimum=2)
        if num_classes > len(SHAPES) + 1:
            raise ValueError(
                f"ShapesSegmentation: argument 'num_classes' got {num_classes!r}; expected 2 to {len(SHAPES) + 1} "
                "(the background and one class per shape)."
            )
        require_count("ShapesSegmentation", "length", length)
        require_count("ShapesSegmentation", "size", size, minimum=8)
        self.length, self.size, self.num_classes = length, size, num_classes
        self.seed, self.ignore_border = seed, ignore_border
        palette = torch.Generator().manual_seed(12345)
        # A fixed colour and stripe frequency per class: the signal a head learns (noise is added per image).
        self.colors = torch.rand(num_classes, 3, generator=palette) * 0.8 + 0.1
        self.frequencies = torch.linspace(0.3, 1.4, num_classes)

    def __len__(self) -> int:
        """Number of samples."""
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample ``index``: its image and mask."""
        if not 0 <= index < self.length:
            raise IndexError(f"ShapesSegmentation: index {index} out of range for {self.length} samples.")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        s = self.size
        yy, xx = torch.meshgrid(
            torch.arange(s, dtype=torch.float32), torch.arange(s, dtype=torch.float32), indexing="ij"
        )
        angle = float(torch.rand((), generator=g)) * math.pi
        stripes = torch.sin((xx * math.cos(angle) + yy * math.sin(angle)) * float(0.2 + torch.rand((), generator=g)))
        background = torch.rand(3, 1, 1, generator=g) * 0.6 + 0.2
        image = background * (0.8 + 0.2 * stripes)
        mask = torch.zeros(s, s, dtype=torch.long)
        for _ in range(int(torch.randint(1, 4, (), generator=g))):
            cls = int(torch.randint(1, self.num_classes, (), generator=g))
            r = float(s * (0.18 + 0.14 * torch.rand((), generator=g)))
            cx, cy = (float(r + (s - 2 * r) * torch.rand((), generator=g)) for _ in range(2))
            inside = _shape_mask(SHAPES[cls - 1], xx - cx, yy - cy, r)
            texture = 0.75 + 0.25 * torch.sin((xx + yy) * self.frequencies[cls])
            color = (self.colors[cls] + 0.1 * torch.randn(3, generator=g)).view(3, 1, 1)
            image = torch.where(inside, color * texture, image)
            mask[inside] = cls
        image = (image + 0.05 * torch.randn(3, s, s, generator=g)).clamp(0, 1)
        if self.ignore_border:
            mask = self._ignore_borders(mask)
        return image, mask

    @staticmethod
    def _ignore_borders(mask: torch.Tensor) -> torch.Tensor:
        """``mask`` with `IGNORE_INDEX` on every pixel whose right or lower neighbour has another label."""
        edge = torch.zeros_like(mask, dtype=torch.bool)
        edge[:, :-1] |= mask[:, :-1] != mask[:, 1:]
        edge[:-1, :] |= mask[:-1, :] != mask[1:, :]
        return torch.where(edge, IGNORE_INDEX, mask)
