"""`KNNAccuracy`: exact top-1 accuracy for every k, as sum-states (one flat all-reduce at compute)."""

from __future__ import annotations

import torch
from torchmetrics import Metric


class KNNAccuracy(Metric):
    """Correct predictions per k and the number of samples counted; both reduce by sum over the group."""

    full_state_update = False
    correct: torch.Tensor
    total: torch.Tensor

    def __init__(self, num_ks: int) -> None:
        super().__init__()
        self.add_state("correct", torch.zeros(num_ks, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Count ``(B, num_ks)`` predictions against ``(B,)`` labels, only the samples ``keep`` marks (no host sync)."""
        hits = preds == target.to(preds.device)[:, None]
        if keep is None:
            self.correct += hits.sum(dim=0)
            self.total += preds.shape[0]
        else:
            self.correct += (hits & keep[:, None]).sum(dim=0)
            self.total += keep.sum()

    def compute(self) -> torch.Tensor:
        """``(num_ks,)`` accuracies (0 when no sample was counted)."""
        return self.correct.float() / self.total.clamp(min=1).float()
