"""Closed-form ridge regression from summed sufficient statistics (torch only).

A ridge probe needs no learning rate and no passes over the data: the count, the feature and target sums, X^T X
and X^T Y, summed over every rank's samples in float64, determine the exact solution of

    min over W, b of (1/n) ||X W + 1 b - Y||_F^2 + lambda ||W||_F^2

for every lambda, with ``Y`` one-hot and the bias ``b`` unpenalised. Centring the statistics removes the bias
(``b = mean(y) - mean(x) W``), and one eigendecomposition of the centred covariance serves every lambda, as
big_vision's few-shot evaluator does with its one decomposition. Memory is O(D^2 + DC) whatever the sample count,
and the statistics of N ranks are summed with one flat all-reduce: nothing is gathered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from distprobe.engine.collectives import sum_over_group


class RidgeStatistics:
    """Float64 sums of one data stream: n, sum x, sum y, X^T X and X^T Y (``y`` one-hot over ``num_classes``).

    Example:
        >>> stats = RidgeStatistics(dim=3, num_classes=2)
        >>> stats.update(torch.randn(8, 3), torch.tensor([0, 1] * 4))
        >>> solution = stats.solve([1e-3, 1.0])
        >>> solution.predict(torch.randn(5, 3)).shape
        torch.Size([2, 5])
    """

    def __init__(self, dim: int, num_classes: int, device: torch.device | str = "cpu") -> None:
        if dim < 1 or num_classes < 2:
            raise ValueError(
                f"RidgeStatistics: dim={dim}, num_classes={num_classes}; expected dim >= 1 and num_classes >= 2"
            )
        self.dim = dim
        self.num_classes = num_classes
        # One flat float64 buffer holds every statistic, so summing over ranks is one all-reduce of one tensor.
        self.flat = torch.zeros(self._numel(dim, num_classes), dtype=torch.float64, device=device)

    @staticmethod
    def _numel(dim: int, num_classes: int) -> int:
        return 1 + dim + num_classes + dim * dim + dim * num_classes

    def _views(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        d, c = self.dim, self.num_classes
        sizes = [1, d, c, d * d, d * c]
        count, sum_x, sum_y, xtx, xty = torch.split(self.flat, sizes)
        return count, sum_x, sum_y, xtx.view(d, d), xty.view(d, c)

    @property
    def count(self) -> torch.Tensor:
        """The number of samples summed (a 0-d float64 tensor on the statistics' device)."""
        return self._views()[0][0]

    def update(self, features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """Add a batch: ``features`` ``(B, D)``, integer ``labels`` ``(B,)``; ``weight`` ``(B,)`` (0 drops a row).

        No host sync: a batch to be skipped (bad data) is dropped by a zero weight decided on the device.
        """
        x = features.detach().flatten(1).to(self.flat.device, torch.float64)
        if x.shape[1] != self.dim:
            raise ValueError(f"RidgeStatistics: features of width {x.shape[1]}, expected {self.dim}")
        y = torch.nn.functional.one_hot(labels.to(self.flat.device).long(), self.num_classes).to(torch.float64)
        count, sum_x, sum_y, xtx, xty = self._views()
        if weight is None:
            weighted = x
            count.add_(x.shape[0])
            sum_y.add_(y.sum(0))
        else:
            # sum_i w_i x_i x_i^T = (w x)^T x: one scaled copy of the batch serves every statistic.
            w = weight.to(self.flat.device, torch.float64).reshape(-1)
            weighted = x * w[:, None]
            count.add_(w.sum())
            sum_y.addmv_(y.T, w)
        sum_x.add_(weighted.sum(0))
        xtx.addmm_(weighted.T, x)
        xty.addmm_(weighted.T, y)

    def all_reduce(self, group: dist.ProcessGroup | None) -> RidgeStatistics:
        """A copy summed over the ranks of ``group`` (one flat all-reduce); this object is left as it was."""
        total = RidgeStatistics(self.dim, self.num_classes, self.flat.device)
        total.flat.copy_(self.flat)
        sum_over_group(total.flat, group)
        return total

    def reset(self) -> None:
        """Forget every sample (a new epoch)."""
        self.flat.zero_()

    def state_dict(self) -> dict[str, torch.Tensor | int]:
        """The statistics, for a checkpoint."""
        return {"dim": self.dim, "num_classes": self.num_classes, "flat": self.flat.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor | int]) -> None:
        """Restore `state_dict`'s output; the shapes must match."""
        if state["dim"] != self.dim or state["num_classes"] != self.num_classes:
            raise ValueError(
                f"RidgeStatistics: checkpoint holds dim={state['dim']}, num_classes={state['num_classes']}; "
                f"this probe has dim={self.dim}, num_classes={self.num_classes}"
            )
        flat = state["flat"]
        assert isinstance(flat, torch.Tensor)
        self.flat.copy_(flat.to(self.flat.device, torch.float64))

    def solve(self, l2: Sequence[float]) -> RidgeSolution:
        """The exact ridge solution for each value of ``l2`` (see the module docstring)."""
        count, sum_x, sum_y, xtx, xty = self._views()
        return solve_centred(count, sum_x, sum_y, xtx, xty, l2)


@dataclass(frozen=True)
class RidgeSolution:
    """One ridge solution per lambda: ``weight`` ``(L, D, C)`` and ``bias`` ``(L, C)``, float64."""

    l2: tuple[float, ...]
    weight: torch.Tensor
    bias: torch.Tensor

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """``(L, B, C)``: each lambda's regression outputs for ``features`` ``(B, D)``."""
        x = features.detach().flatten(1).to(self.weight.device, torch.float64)
        return torch.einsum("bd,ldc->lbc", x, self.weight) + self.bias[:, None, :]

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """``(L, B)``: each lambda's predicted class (the largest output)."""
        return self.scores(features).argmax(-1)


def solve_centred(
    count: torch.Tensor,
    sum_x: torch.Tensor,
    sum_y: torch.Tensor,
    xtx: torch.Tensor,
    xty: torch.Tensor,
    l2: Sequence[float],
) -> RidgeSolution:
    """Ridge weights and unpenalised biases for every ``l2`` from summed statistics, with one eigendecomposition.

    With means ``mx, my`` the centred second moments are ``Sxx = X^T X / n - mx mx^T`` and
    ``Sxy = X^T Y / n - mx my^T``; then ``W = (Sxx + lambda I)^-1 Sxy`` and ``b = my - mx W``. ``Sxx = V diag(e) V^T``
    once, so each lambda costs one ``(D, D) x (D, C)`` product. ``lambda = 0`` gives the minimum-norm solution.
    """
    lambdas = tuple(float(v) for v in l2)
    if not lambdas or any(not v >= 0 for v in lambdas):
        raise ValueError(f"ridge: l2={lambdas}; expected one or more values >= 0 (e.g. l2=(1e-4, 1e-2, 1))")
    n = count.clamp_min(1.0)
    mean_x, mean_y = sum_x / n, sum_y / n
    sxx = xtx / n - torch.outer(mean_x, mean_x)
    sxy = xty / n - torch.outer(mean_x, mean_y)
    eigvals, eigvecs = torch.linalg.eigh((sxx + sxx.T) / 2)
    eigvals = eigvals.clamp_min(0.0)  # rounding can leave tiny negative eigenvalues of a PSD matrix
    projected = eigvecs.T @ sxy
    # Directions with (numerically) zero variance get no weight: the minimum-norm solution at lambda = 0.
    tiny = eigvals.max().clamp_min(1e-300) * eigvals.shape[0] * torch.finfo(torch.float64).eps
    weights = []
    for value in lambdas:
        denom = eigvals + value
        inverse = torch.where(denom > tiny, 1.0 / denom.clamp_min(tiny), torch.zeros_like(denom))
        weights.append(eigvecs @ (inverse[:, None] * projected))
    weight = torch.stack(weights)
    bias = mean_y[None, :] - torch.einsum("d,ldc->lc", mean_x, weight)
    return RidgeSolution(lambdas, weight, bias)


def fit_ridge(features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: Sequence[float]) -> RidgeSolution:
    """Ridge on one in-memory set (a few-shot episode): the statistics of ``features`` and ``labels``, solved."""
    stats = RidgeStatistics(features.flatten(1).shape[1], num_classes, features.device)
    stats.update(features, labels)
    return stats.solve(l2)
