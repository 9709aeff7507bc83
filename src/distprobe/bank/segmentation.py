"""The segmentation metric kind of dense banks: exact mIoU and pixel accuracy from one confusion matrix per head.

Its states are a ``(K, C, C)`` confusion matrix (rows: target class, columns: predicted class) per split, counted
over every valid pixel (not ``ignore_index``) of every counted validation sample. Both reduce by sum, so the whole
validation set over every rank syncs in the bank's one flat all-reduce, and the sampler's padded duplicates never
enter them (the bank counts the first ``num_valid`` samples only, `distprobe.metrics.exact`). Each update is a
``scatter_add_`` into the fixed-size matrix: no host sync.

mIoU is computed as the segmentation suites report it: per class ``TP / (TP + FP + FN)`` over the whole set, averaged
over the classes present in the target or the prediction (a class absent from both is left out of the mean). The
best head is the one with the highest first metric of ``metrics`` (mIoU by default) on the selection split
(`distprobe.bank.selection`); its values are reported on the rest. Training reports each head's loss only (no
train-pixel metrics: they would cost a full-size upsampling per step).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torchmetrics import Metric

from distprobe import keys
from distprobe.bank import dense_loss
from distprobe.bank.config import BankConfig
from distprobe.bank.metrics import HeadLoss, parse_named_metrics
from distprobe.bank.metrics_set import BankMetrics
from distprobe.bank.selection import best_values
from distprobe.engine.bad_data import REASONS
from distprobe.engine.collectives import is_distributed
from distprobe.engine.deferred import DeferredSteps
from distprobe.metrics.counters import ReasonCounter, mark_updated
from distprobe.metrics.flat_sync import flat_sync

#: What a dense bank reports per head; the first one listed chooses the best head (mIoU by default).
SEGMENTATION_METRICS = ("mIoU", "pixel_acc")


def parse_segmentation_metrics(spec: Any, bank_name: str) -> dict[str, int]:
    """The metrics a dense bank reports (the class-index default ``("top1",)`` means all of them)."""
    return parse_named_metrics(spec, bank_name, SEGMENTATION_METRICS, "head 'dense'")


def miou_and_accuracy(confusion: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(K,)`` mIoU and pixel accuracy of ``(K, C, C)`` confusion matrices (NaN where no pixel was counted).

    Example:
        >>> confusion = torch.tensor([[[2, 1, 0], [0, 1, 0], [0, 0, 0]]])  # class 2 absent: left out
        >>> [round(v, 4) for t in miou_and_accuracy(confusion) for v in t.tolist()]
        [0.5833, 0.75]
    """
    matrix = confusion.double()
    tp = matrix.diagonal(dim1=1, dim2=2)
    union = matrix.sum(dim=2) + matrix.sum(dim=1) - tp
    present = union > 0
    iou = torch.where(present, tp / union.clamp(min=1), 0.0)
    miou = iou.sum(dim=1) / present.sum(dim=1)  # 0 / 0 = NaN: nothing counted
    accuracy = tp.sum(dim=1) / matrix.sum(dim=(1, 2))
    return miou.float(), accuracy.float()


class HeadConfusion(Metric):
    """Every head's pixel confusion matrix ``(K, C, C)``, from ``(B, K, C, h, w)`` logits and ``(B, H, W)`` masks.

    The logits are upsampled to the masks' size as the loss upsamples them, in the same chunks of heads x samples
    (`distprobe.bank.dense_loss.upsampled_chunks`: at most ``max_heads`` heads and ``max_elements`` upsampled
    logits at once), so validation's memory is bounded as training's. The counts are the same whatever the chunks:
    each pixel's prediction depends on its own sample and head only.
    """

    full_state_update = False
    confusion: torch.Tensor

    def __init__(
        self, num_heads: int, num_classes: int, ignore_index: int, max_heads: int | None, max_elements: int | None
    ) -> None:
        super().__init__(sync_on_compute=True)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.max_heads = max_heads
        self.max_elements = max_elements
        self.add_state("confusion", torch.zeros(num_heads, num_classes, num_classes, dtype=torch.long), "sum")

    def update(self, logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor) -> None:
        """Count the valid pixels of the ``keep`` samples, the logits upsampled bilinearly to the masks' size."""
        c = self.num_classes
        size = (targets.shape[-2], targets.shape[-1])
        valid = (targets != self.ignore_index) & keep.view(-1, 1, 1)
        # Rows of the flat (K * C * C) matrix: target class, scaled, per pixel (invalid pixels add 0 to class 0).
        rows = torch.where(valid, targets, 0).long() * c
        flat = self.confusion.view(-1)
        by_head = logits.transpose(0, 1)  # (K, B, C, h, w): a view, chunks are copied by the upsampling
        for heads, samples, values in dense_loss.upsampled_chunks(by_head, size, self.max_heads, self.max_elements):
            predicted = values.argmax(dim=-1)  # (k_c, s_c, H, W)
            del values  # the next chunk's upsampling must not find this one alive
            first = torch.arange(heads.start, heads.start + predicted.shape[0], device=flat.device)
            index = (first.view(-1, 1, 1, 1) * c * c + rows[samples]) + predicted
            flat.scatter_add_(0, index.flatten(), valid[samples].expand_as(index).flatten().long())
        mark_updated(self)

    def compute(self) -> torch.Tensor:
        """``(K,)`` mIoU."""
        return miou_and_accuracy(self.confusion)[0]


class SegmentationBankMetrics(BankMetrics):
    """A dense bank's metrics: the `BankMetrics` interface over the states of the module docstring."""

    def __init__(self, config: BankConfig, num_heads: int, kind: str = "segmentation") -> None:
        from distprobe.bank.families.dense import DenseOptions

        options = DenseOptions.parse(config.head_options, config.name)
        self.config = config
        self.num_heads = num_heads
        self.names = list(config.top_k)
        self.train: dict[str, Any] = {}
        self.loss = HeadLoss(num_heads)
        self.bad_batches = ReasonCounter(REASONS)
        # Validation upsamples in the loss's chunks (heads x samples), so its memory is bounded as training's.
        chunks = (options.loss_chunk_heads, options.loss_chunk_elements)
        args = (num_heads, config.num_classes, options.ignore_index, *chunks)
        # One confusion matrix per split gives every reported value: mIoU and pixel accuracy alike.
        self.select: dict[str, Any] = {"confusion": HeadConfusion(*args)}
        self.report: dict[str, Any] = {"confusion": HeadConfusion(*args)}
        self.deferred = DeferredSteps(self._fold, lambda: False)

    def update_eval(
        self, logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor, select: torch.Tensor
    ) -> None:
        """Count a validation batch's pixels into the selection split (``select``) or the report split."""
        self.select["confusion"].update(logits, targets, keep & select)
        self.report["confusion"].update(logits, targets, keep & select.logical_not())

    def confusions(self, group: dist.ProcessGroup | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The selection and report splits' ``(K, C, C)`` matrices summed over ``group`` (one flat all-reduce)."""
        select, report = self.select["confusion"], self.report["confusion"]
        if not is_distributed(group):
            return select.confusion, report.confusion
        synced = flat_sync([select, report], group)
        return synced[(id(select), "confusion")], synced[(id(report), "confusion")]

    def compute_eval(self, group: dist.ProcessGroup | None) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """Per-head values on the whole set, the best head (by the first metric on the selection split) on the rest."""
        select, report = self.confusions(group)
        splits = (select + report, select, report)
        whole, chosen, reported = (dict(zip(SEGMENTATION_METRICS, miou_and_accuracy(m), strict=True)) for m in splits)
        values: dict[str, torch.Tensor] = {}
        for head in self.config.heads():
            for name in self.names:
                values[keys.relative_key(name, head=head.head_id)] = whole[name][head.index]
        selector = self.names[0]  # the first metric the user listed, as a class-index bank's (mIoU by default)
        best = self.choose_best(chosen[selector], whole[selector])
        values.update(best_values(self.names, best, lambda b: {n: reported[n][b] for n in self.names}, select.device))
        for metric in [*self.select.values(), *self.report.values()]:
            metric.reset()
        return values, best
