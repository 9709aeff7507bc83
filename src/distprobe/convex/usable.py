"""Which rows of an in-memory labeled set the offline convex solvers may use (torch only).

A probe never lets bad data take its numbers down: one NaN feature in a training row made a logistic regression's
standardiser and weights NaN (every prediction then one class, silently), a label outside ``[0, num_classes)`` raised
torch's "Target 7 is out of bounds" after the grid had been fitted, and a NaN row drawn into a few-shot episode broke
its eigendecomposition. As online (`RidgeProbe`), such a training row is left out and counted, and such a validation
row is not counted in the accuracy.
"""

from __future__ import annotations

import torch

#: Rows checked at once: a whole cached training set's ``isfinite`` would be N x D bytes at a time (1.3 GB for
#: 1.28M samples of 1024 features).
_ROWS = 1 << 16


def usable_rows(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(N,)`` bool: the rows with finite features and an integer label in ``[0, num_classes)``."""
    x = features.detach().flatten(1)
    y = labels.detach().reshape(-1).to(x.device)
    finite = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    for start in range(0, x.shape[0], _ROWS):
        finite[start : start + _ROWS] = torch.isfinite(x[start : start + _ROWS]).all(dim=1)
    if y.is_floating_point():
        whole = torch.isfinite(y) & (y == y.round())
        y = torch.where(whole, y, -1.0)
    return finite & (y >= 0) & (y < num_classes)


class CountedResults:
    """What a result with ``val_correct`` and ``val_counted`` fields (a logistic regression's, an episode's) derives.

    ``val_correct`` is ``(N_val,)`` bool, each validation sample classified right (False where not counted);
    ``val_counted`` the samples counted (finite features, a label in range), or None for all of them.
    """

    val_correct: torch.Tensor
    val_counted: torch.Tensor | None

    @property
    def counted_correct(self) -> torch.Tensor:
        """``val_correct`` of the counted samples: what the accuracy averages and what an interval resamples."""
        return self.val_correct if self.val_counted is None else self.val_correct[self.val_counted]

    @property
    def counted_accuracy(self) -> float:
        """Accuracy on the counted validation samples."""
        return float(self.counted_correct.double().mean())
