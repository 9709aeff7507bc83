"""Sync-free updates for torchmetrics' multiclass stat-score metrics.

torchmetrics' multiclass ``update()`` synchronises the host with the GPU twice per call (argument checks, a
``bincount`` sized from the data), which stalls the CPU from queueing the next training step. The classes here keep
torchmetrics' states (``tp``, ``fp``, ``tn``, ``fn``), ``compute()``, names and hyper-parameters; only ``update`` is
replaced by a few ``scatter_add_`` calls into fixed-size device tensors, so their values are identical.

Converted (exact classes only, not user subclasses), when ``multidim_average="global"``, ``ignore_index=None`` and
``num_classes`` is given; any ``top_k`` and any ``average``:

- ``MulticlassAccuracy``, ``MulticlassPrecision``, ``MulticlassRecall``, ``MulticlassF1Score``,
  ``MulticlassFBetaScore``, ``MulticlassSpecificity``, ``MulticlassStatScores``
  (also when built through ``Accuracy(task="multiclass", ...)`` and the other task wrappers).

Inputs outside the fast path (labels with ``top_k > 1``, extra dimensions) fall back to torchmetrics' own update.
The fast path does not validate its inputs: labels out of range raise an indexing error instead of torchmetrics'
message (the probe's first-batch check already names them).
"""

from __future__ import annotations

import copy
from typing import Any, cast

import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassFBetaScore,
    MulticlassPrecision,
    MulticlassRecall,
    MulticlassSpecificity,
    MulticlassStatScores,
)

from distprobe.metrics.counters import mark_updated


def predicted_labels(preds: torch.Tensor, target: torch.Tensor, top_k: int) -> torch.Tensor:
    """One predicted label per sample, as torchmetrics' stat scores count it.

    With ``top_k > 1`` a sample counts as predicting its target when the target is among its ``top_k`` scores, and
    as predicting its top-1 class otherwise (torchmetrics >= 1.6 semantics).

    Args:
        preds: Scores ``(N, C)`` or labels ``(N,)``.
        target: Labels ``(N,)``.
        top_k: How many of the highest scores count as a hit.
    """
    if preds.ndim == target.ndim:
        return preds.long()
    if top_k == 1:
        return preds.argmax(dim=1)
    top = torch.topk(preds, k=top_k, dim=1).indices
    hit = (top == target.unsqueeze(1)).any(dim=1)
    return torch.where(hit, target.long(), top[:, 0])


def stat_scores(
    labels: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    per_class: bool,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``tp, fp, tn, fn`` of one batch without reading anything back to the host.

    Args:
        labels: Predicted labels ``(N,)`` (see `predicted_labels`).
        target: True labels ``(N,)``.
        num_classes: Number of classes ``C``.
        per_class: Counts per class (shape ``(C,)``); else micro totals (scalars), as torchmetrics keeps them for
            ``average="micro"`` with ``top_k=1``.
        keep: ``(N,)`` bool, the samples to count (all by default); a mask, not an index, so no host sync. The
            labels of samples left out must still lie in ``[0, C)``.
    """
    target = target.long()
    correct = labels == target
    n: torch.Tensor | int = target.shape[0] if keep is None else keep.sum()
    if keep is not None:
        correct = correct & keep
    if not per_class:
        tp = correct.sum()
        wrong = n - tp
        return tp, wrong, num_classes * n - (2 * wrong + tp), wrong
    hits = correct.long()
    misses = (~correct).long() if keep is None else (keep & ~correct).long()
    zeros = torch.zeros(num_classes, dtype=torch.long, device=target.device)
    tp = zeros.scatter_add(0, target, hits)
    fn = zeros.scatter_add(0, target, misses)
    fp = zeros.scatter_add(0, labels, misses)
    return tp, fp, n - (tp + fp + fn), fn


class _SyncFreeStatScores(MulticlassStatScores):
    """Replaces `MulticlassStatScores.update` with `stat_scores`; everything else is torchmetrics' own."""

    def _fast_path(self, preds: torch.Tensor, target: torch.Tensor) -> bool:
        # Shapes and dtypes are host metadata: deciding here costs no sync.
        if target.ndim != 1 or preds.shape[0] != target.shape[0] or target.is_floating_point():
            return False
        if preds.ndim == 2:
            return preds.is_floating_point() and preds.shape[1] == self.num_classes
        return preds.ndim == 1 and self.top_k == 1 and not preds.is_floating_point()

    def update(self, preds: torch.Tensor, target: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Add one batch (only the samples where ``keep``); scatter-adds on the device, no host synchronisation."""
        if not self._fast_path(preds, target):
            # torchmetrics' own update syncs anyway; the boolean index is one sync more on this slow path only.
            super().update(preds if keep is None else preds[keep], target if keep is None else target[keep])
            return
        assert self.num_classes is not None  # checked by `to_sync_free`
        labels = predicted_labels(preds, target, self.top_k)
        per_class = not (self.average == "micro" and self.top_k == 1)
        self._update_state(*stat_scores(labels, target, self.num_classes, per_class, keep))


def update_collection(
    collection: MetricCollection, preds: torch.Tensor, target: torch.Tensor, keep: torch.Tensor | None = None
) -> None:
    """Update every metric of ``collection`` with one batch, in as little host time as possible.

    On a training step the probe's own kernels are tiny and its host time is what shows: torchmetrics' update
    wrapper and ``MetricCollection``'s dispatch cost more than the maths. Sync-free stat scores on their fast path
    therefore share one predicted-label computation per ``top_k`` and add to their states directly (what the
    wrapper does besides: count the update, drop the cached value); any other metric gets its own ``update``.
    """
    scores: dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for metric in collection.values(copy_state=False):
        if isinstance(metric, _SyncFreeStatScores) and metric._fast_path(preds, target):
            assert metric.num_classes is not None  # checked by `to_sync_free`
            per_class = not (metric.average == "micro" and metric.top_k == 1)
            key = (metric.top_k, per_class)
            if key not in scores:
                labels = predicted_labels(preds, target, metric.top_k)
                scores[key] = stat_scores(labels, target, metric.num_classes, per_class, keep)
            # In place: assigning states goes through Metric.__setattr__, dearer than the additions themselves.
            for state, value in zip((metric.tp, metric.fp, metric.tn, metric.fn), scores[key], strict=True):
                cast(torch.Tensor, state).add_(value)
            mark_updated(metric)
        else:
            metric.update(preds, target, **metric._filter_kwargs(keep=keep))


class SyncFreeMulticlassStatScores(_SyncFreeStatScores):
    """`torchmetrics.classification.MulticlassStatScores` with a sync-free update."""


class SyncFreeMulticlassAccuracy(_SyncFreeStatScores, MulticlassAccuracy):
    """`torchmetrics.classification.MulticlassAccuracy` with a sync-free update."""


class SyncFreeMulticlassPrecision(_SyncFreeStatScores, MulticlassPrecision):
    """`torchmetrics.classification.MulticlassPrecision` with a sync-free update."""


class SyncFreeMulticlassRecall(_SyncFreeStatScores, MulticlassRecall):
    """`torchmetrics.classification.MulticlassRecall` with a sync-free update."""


class SyncFreeMulticlassSpecificity(_SyncFreeStatScores, MulticlassSpecificity):
    """`torchmetrics.classification.MulticlassSpecificity` with a sync-free update."""


class SyncFreeMulticlassFBetaScore(_SyncFreeStatScores, MulticlassFBetaScore):
    """`torchmetrics.classification.MulticlassFBetaScore` with a sync-free update."""


class SyncFreeMulticlassF1Score(_SyncFreeStatScores, MulticlassF1Score):
    """`torchmetrics.classification.MulticlassF1Score` with a sync-free update."""


#: The torchmetrics classes converted by `to_sync_free`, and what they become.
SYNC_FREE_EQUIVALENTS: dict[type[Metric], type[Metric]] = {
    MulticlassStatScores: SyncFreeMulticlassStatScores,
    MulticlassAccuracy: SyncFreeMulticlassAccuracy,
    MulticlassPrecision: SyncFreeMulticlassPrecision,
    MulticlassRecall: SyncFreeMulticlassRecall,
    MulticlassSpecificity: SyncFreeMulticlassSpecificity,
    MulticlassFBetaScore: SyncFreeMulticlassFBetaScore,
    MulticlassF1Score: SyncFreeMulticlassF1Score,
}


def to_sync_free(metric: Metric) -> Metric:
    """A sync-free copy of ``metric`` when one exists for its class and arguments, else ``metric`` itself.

    The copy carries every attribute of the original (hyper-parameters, process group, accumulated state); only
    the class, hence ``update``, changes.

    Example:
        >>> from torchmetrics.classification import MulticlassAccuracy
        >>> type(to_sync_free(MulticlassAccuracy(num_classes=10, top_k=5))).__name__
        'SyncFreeMulticlassAccuracy'
    """
    target_cls = SYNC_FREE_EQUIVALENTS.get(type(metric))
    supported = (
        target_cls is not None
        and getattr(metric, "multidim_average", None) == "global"
        and getattr(metric, "ignore_index", 0) is None
        and isinstance(getattr(metric, "num_classes", None), int)
    )
    if not supported:
        return metric
    assert target_cls is not None
    # torchmetrics' own pickling protocol: __getstate__ drops the wrapped update/compute, __setstate__ wraps the new
    # class's methods, so the copy's update is ours and its compute is torchmetrics'.
    state: dict[str, Any] = copy.deepcopy(metric.__getstate__())
    converted = target_cls.__new__(target_cls)
    converted.__setstate__(state)
    return converted
