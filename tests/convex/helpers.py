"""Small labeled problems for the convex solvers' tests: Gaussian classes around fixed centres, float64."""

from __future__ import annotations

import torch


def gaussian_classes(
    n_train: int, n_val: int, *, dim: int = 6, num_classes: int = 3, spread: float = 1.5, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(train_x, train_y, val_x, val_y)``: both splits drawn around the same class centres, not separable."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=g, dtype=torch.float64) * spread
    scale = torch.rand(dim, generator=g, dtype=torch.float64) * 3 + 0.2  # unequal scales: standardising matters

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, num_classes, (n,), generator=g)
        return (centres[y] + torch.randn(n, dim, generator=g, dtype=torch.float64)) * scale + 3.0, y

    return (*draw(n_train), *draw(n_val))
