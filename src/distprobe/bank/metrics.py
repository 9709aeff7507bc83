"""Per-head metrics of a bank: one fused update for all K heads, states declared for torchmetrics' reductions.

A head's top-k accuracy is its count of correct samples over the samples counted; K heads are a ``(K,)`` count and
one shared total, updated by a single top-k over the ``(B, K, C)`` logits. Every state reduces by sum, so all the
bank's metrics sync in one flat all-reduce (`distprobe.metrics.flat_sync`).
"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric

from distprobe.engine.compiled import CudaCompiled
from distprobe.metrics.counters import mark_updated


def correct_per_head(
    logits: torch.Tensor, targets: torch.Tensor, top_k: int, keep: torch.Tensor, *, compiled: bool = True
) -> torch.Tensor:
    """``(K,)`` long: how many kept samples each head classifies correctly within its top ``top_k``.

    On CUDA the count is one compiled kernel (`distprobe.engine.compiled`): eager, the comparisons, masks and sums
    are seven passes over ``(B, K, C)`` tensors, a tenth of a 64-head bank's step. ``compiled=False`` runs the eager
    maths, which CPUs run and the GPU tests compare against (an integer count: equal, not close).
    """
    return COUNT_KERNEL(logits, targets, keep, top_k, on_cuda=logits.is_cuda, compiled=compiled)


def _count_correct(logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor, top_k: int) -> torch.Tensor:
    hits = logits.argmax(dim=-1) == targets[:, None] if top_k == 1 else target_rank(logits, targets) < top_k
    return (hits & keep[:, None]).sum(dim=0)


#: The count, compiled on CUDA; batch sizes vary (an epoch's last batch, validation), so sizes become symbolic.
COUNT_KERNEL = CudaCompiled(_count_correct, dynamic=None)


def target_rank(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``(B, K)``: how many classes each head ranks above the target (ties: the lower class index first).

    A top-k hit is a rank below k. Counting beats a top-k search over ``(B, K, C)`` logits: two comparisons and a
    sum instead of a partial sort (about a tenth of the time for 64 heads and 1000 classes on a GPU). Ties are
    broken as a stable descending sort breaks them, the order ``argmax`` follows for k = 1.
    """
    index = targets.view(-1, 1, 1).expand(logits.shape[0], logits.shape[1], 1)
    target_logit = logits.gather(-1, index)
    classes = torch.arange(logits.shape[-1], device=logits.device)
    above = (logits > target_logit) | ((logits == target_logit) & (classes < index))
    return above.sum(dim=-1)


class HeadTopK(Metric):
    """Top-k accuracy of every head of a bank.

    Example:
        >>> metric = HeadTopK(num_heads=2, top_k=1)
        >>> logits = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])  # one sample, two heads, two classes
        >>> metric.update(logits, torch.tensor([1]), torch.tensor([True]))
        >>> metric.compute()
        tensor([1., 0.])
    """

    full_state_update = False
    correct: torch.Tensor
    total: torch.Tensor

    def __init__(self, num_heads: int, top_k: int) -> None:
        super().__init__(sync_on_compute=True)
        self.top_k = top_k
        self.add_state("correct", torch.zeros(num_heads, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor) -> None:
        """Count a batch: ``logits`` ``(B, K, C)``, class-index ``targets`` ``(B,)``, ``keep`` ``(B,)`` bool."""
        self.correct += correct_per_head(logits, targets, self.top_k, keep)
        self.total += keep.sum()

    def fast_update(self, logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor) -> None:
        """`update` without torchmetrics' per-call wrapper (host time the train step pays on every step)."""
        self.correct.add_(correct_per_head(logits, targets, self.top_k, keep))
        self.total.add_(keep.sum())
        mark_updated(self)

    def compute(self) -> torch.Tensor:
        """``(K,)`` float accuracies (NaN before any sample)."""
        return self.correct.double().div(self.total).float()


class HeadLoss(Metric):
    """Every head's mean training loss, weighted by batch size, over the steps that were not skipped."""

    full_state_update = False
    total: torch.Tensor
    count: torch.Tensor

    def __init__(self, num_heads: int) -> None:
        super().__init__(sync_on_compute=True)
        self.add_state("total", torch.zeros(num_heads, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, losses: torch.Tensor, weight: torch.Tensor) -> None:
        """Add ``(S, K)`` per-step losses with ``(S,)`` weights (0 for a skipped batch, whatever its loss)."""
        self.total.add_(torch.where(weight[:, None] > 0, losses.double() * weight[:, None], 0.0).sum(dim=0))
        self.count.add_(weight.sum())
        mark_updated(self)

    def add_sums(self, total: torch.Tensor, count: torch.Tensor) -> None:
        """Add ``(K,)`` weighted loss sums and their 0-d weight (`distprobe.engine.deferred.Folded`)."""
        self.total.add_(total)
        self.count.add_(count)
        mark_updated(self)

    def compute(self) -> torch.Tensor:
        """``(K,)`` mean losses."""
        return (self.total / self.count).float()


def parse_named_metrics(spec: Any, bank_name: str, metrics: tuple[str, ...], kind: str) -> dict[str, int]:
    """The metrics a bank of a named-metric kind reports, in the order given: the first chooses the best head.

    As for a class-index bank's top-k metrics, the first metric listed is the one the best head is chosen by on the
    selection split; only the metrics listed are reported. The class-index default ``("top1",)`` (or None) means all
    of them, the kind's own selection metric (``metrics[0]``: mAP, mIoU) first.

    Args:
        spec: The bank's ``metrics`` argument: None, a name or a sequence of names.
        bank_name: The bank's name, for the error.
        metrics: The kind's metric names, its default selection metric first.
        kind: What makes the bank this kind, for the error (``multilabel=True``, ``head 'dense'``).

    Raises:
        ValueError: for an unknown name or an empty list, listing the valid ones.
    """
    if spec is None or spec == ("top1",) or spec == ["top1"]:
        return dict.fromkeys(metrics, 0)
    names = [spec] if isinstance(spec, str) else list(spec)
    unknown = [n for n in names if n not in metrics]
    if unknown or not names:
        raise ValueError(
            f"bank '{bank_name}': argument 'metrics' got {spec!r} with {kind}; expected names among "
            f"{list(metrics)} (the first one listed chooses the best head), such as {[metrics[0]]}."
        )
    return dict.fromkeys(names, 0)
