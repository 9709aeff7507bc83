"""Multi-label targets for banks: ``(B, C)`` multi-hot labels, BCE with logits, mAP and F1, exact over the set.

A metric kind (`distprobe.bank.metric_kinds`) owns three things the bank's engine asks it for:

- **its states**: the train F1 counts (per head and class: true positives, false positives, false negatives; all
  summed, so they sync in the bank's one flat all-reduce) and, in validation, every counted sample's logits,
  targets and split (a ``cat`` state: average precision ranks samples, so it needs all of them);
- **its exact sync**: each rank keeps only its real samples (the sampler's padded duplicates are cut by
  ``num_valid``, `distprobe.metrics.exact`) and the epoch's end gathers them from every rank, uneven counts
  included, so each value is torchmetrics' ``multilabel_average_precision`` / ``multilabel_f1_score`` on the whole
  set, computed once per head;
- **its selection score**: the first metric of ``metrics`` on the selection split (`distprobe.bank.selection`),
  macro mAP by default (``metrics=["f1_micro"]`` reports F1 alone and chooses by it); the best head's values are
  reported on the rest.

A target value outside {0, 1} (or not finite) is bad data: the batch's step is skipped for every head and counted
(``targets_out_of_range``, ``nonfinite_targets``), and the sample is not counted in metrics.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist
from torchmetrics import Metric
from torchmetrics.functional.classification import (
    binary_average_precision,
    binary_f1_score,
    multilabel_average_precision,
    multilabel_f1_score,
)
from torchmetrics.utilities.distributed import gather_all_tensors

from distprobe import keys
from distprobe.bank.config import BankConfig
from distprobe.bank.metrics import HeadLoss, parse_named_metrics
from distprobe.bank.metrics_set import BankMetrics
from distprobe.bank.selection import best_values
from distprobe.engine.bad_data import REASONS
from distprobe.engine.collectives import is_distributed
from distprobe.engine.deferred import DeferredSteps
from distprobe.metrics.counters import ReasonCounter, mark_updated

#: The values a multi-label bank reports per head; the first one listed chooses the best head (mAP, macro, by default).
MULTILABEL_METRICS = ("mAP", "f1_micro", "f1_macro")
#: Probabilities above it count as predicted labels (torchmetrics' default).
THRESHOLD = 0.5
_TRAIN_METRICS = ("f1_micro", "f1_macro")


def parse_multilabel_metrics(spec: Any, bank_name: str) -> dict[str, int]:
    """The metrics a multi-label bank reports (the class-index default ``("top1",)`` means all of them)."""
    return parse_named_metrics(spec, bank_name, MULTILABEL_METRICS, "multilabel=True")


def check_targets(
    targets: torch.Tensor, preds: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(safe float targets, (B,) samples metrics may count, 0-d all in {0, 1}, 0-d all finite)``, on the device.

    ``preds`` (``(B, C)``, one head's) only sets the dtype; a non-binary value becomes 0 so the loss stays finite.
    """
    binary = (targets == 0) | (targets == 1)
    finite = torch.isfinite(targets) if targets.is_floating_point() else torch.ones_like(binary)
    safe = torch.where(binary, targets, 0).to(preds.dtype)
    return safe, binary.all(dim=1), (binary | finite.logical_not()).all(), finite.all()


def f1_from_counts(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor, average: str) -> torch.Tensor:
    """``(K,)`` F1 from ``(K, C)`` counts, as torchmetrics' multilabel F1 (0 where a denominator is 0)."""
    if average == "micro":
        tp, fp, fn = tp.sum(dim=1), fp.sum(dim=1), fn.sum(dim=1)
    denominator = (2 * tp + fp + fn).double()
    f1 = torch.where(denominator > 0, 2 * tp.double() / denominator.clamp(min=1), 0.0)
    return (f1 if average == "micro" else f1.mean(dim=1)).float()


class HeadMultiLabelF1(Metric):
    """F1 at 0.5 of every head, micro or macro over the labels, from summed counts (exact on any world size)."""

    full_state_update = False
    tp: torch.Tensor
    fp: torch.Tensor
    fn: torch.Tensor

    def __init__(self, num_heads: int, num_labels: int, average: str) -> None:
        super().__init__(sync_on_compute=True)
        self.average = average
        for state in ("tp", "fp", "fn"):
            self.add_state(state, torch.zeros(num_heads, num_labels, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor) -> None:
        """Count ``(B, K, C)`` logits against ``(B, C)`` multi-hot targets, ``keep`` ``(B,)`` bool."""
        self.fast_update(logits, targets, keep)

    def fast_update(self, logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor) -> None:
        """`update` without torchmetrics' per-call wrapper."""
        predicted = (logits.sigmoid() > THRESHOLD) & keep[:, None, None]
        actual = (targets > 0.5)[:, None, :] & keep[:, None, None]
        self.tp.add_((predicted & actual).sum(dim=0))
        self.fp.add_((predicted & actual.logical_not()).sum(dim=0))
        self.fn.add_((predicted.logical_not() & actual).sum(dim=0))
        mark_updated(self)

    def compute(self) -> torch.Tensor:
        """``(K,)`` F1 values."""
        return f1_from_counts(self.tp, self.fp, self.fn, self.average)


class EvalSamples(Metric):
    """Every counted validation sample: ``(n, K, C)`` logits, ``(n, C)`` targets, ``(n,)`` selection flags."""

    full_state_update = False
    logits: list[torch.Tensor]
    targets: list[torch.Tensor]
    select: list[torch.Tensor]

    def __init__(self) -> None:
        super().__init__(sync_on_compute=False)
        for state in ("logits", "targets", "select"):
            self.add_state(state, [], dist_reduce_fx="cat")

    def update(self, logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor, select: torch.Tensor) -> None:
        """Keep the rows of ``keep`` (bad samples and sampler padding are never kept)."""
        self.logits.append(logits[keep].float())
        self.targets.append(targets[keep].long())
        self.select.append(select[keep])

    def gathered(self, group: dist.ProcessGroup | None, num_heads: int, num_labels: int) -> list[torch.Tensor]:
        """The three tensors over every rank of ``group`` (uneven counts included), in rank order."""
        device = self.device
        empty = (
            torch.empty(0, num_heads, num_labels, device=device),
            torch.empty(0, num_labels, dtype=torch.long, device=device),
            torch.empty(0, dtype=torch.bool, device=device),
        )
        local = [
            torch.cat(parts) if parts else blank
            for parts, blank in zip((self.logits, self.targets, self.select), empty, strict=True)
        ]
        if not is_distributed(group):
            return local
        return [torch.cat(gather_all_tensors(t.contiguous(), group=group)) for t in local]

    def compute(self) -> torch.Tensor:
        """The number of samples kept on this rank (the values are `MultiLabelBankMetrics.compute_eval`'s)."""
        return torch.tensor(sum(t.shape[0] for t in self.targets))


def head_values(probs: torch.Tensor, targets: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """One head's ``(n, C)`` probabilities against ``(n, C)`` targets: each metric by torchmetrics (NaN: no sample)."""
    num_labels = targets.shape[1]
    out: dict[str, torch.Tensor] = {}
    with warnings.catch_warnings():
        # A label without positives in a split is common (rare labels, the small selection split). torchmetrics
        # (1.9) scores its AP as 0 and keeps it in the macro mean, which is what is reported (the service's
        # intervals resample the same number); its warning would repeat every epoch for every head.
        warnings.filterwarnings("ignore", message=".*[Nn]o positive samples.*")
        _fill(out, probs, targets, names, num_labels)
    return {k: v.float() for k, v in out.items()}


def _fill(
    out: dict[str, torch.Tensor], probs: torch.Tensor, targets: torch.Tensor, names: list[str], num_labels: int
) -> None:
    for name in names:
        if targets.shape[0] == 0:
            out[name] = torch.tensor(float("nan"), device=probs.device)
        elif num_labels == 1:
            # One binary label (torchmetrics' multilabel functions refuse num_labels=1): its AP and F1 are the
            # macro and the micro values alike.
            prob, target = probs[:, 0], targets[:, 0]
            if name == "mAP":
                out[name] = binary_average_precision(prob, target, thresholds=None)
            else:
                out[name] = binary_f1_score(prob, target, threshold=THRESHOLD)
        elif name == "mAP":
            out[name] = multilabel_average_precision(probs, targets, num_labels, average="macro", thresholds=None)
        else:
            average: Any = name.removeprefix("f1_")  # "micro" or "macro", from MULTILABEL_METRICS
            out[name] = multilabel_f1_score(probs, targets, num_labels, threshold=THRESHOLD, average=average)


class MultiLabelBankMetrics(BankMetrics):
    """A multi-label bank's metrics: the `BankMetrics` interface over the states of the module docstring."""

    def __init__(self, config: BankConfig, num_heads: int, kind: str = "multilabel") -> None:
        self.config = config
        self.num_heads = num_heads
        self.num_labels = config.num_classes
        self.names = list(config.top_k)
        self.train: dict[str, Any] = {
            name: HeadMultiLabelF1(num_heads, config.num_classes, name.removeprefix("f1_"))
            for name in self.names
            if name in _TRAIN_METRICS
        }
        self.loss = HeadLoss(num_heads)
        self.bad_batches = ReasonCounter(REASONS)
        self.select: dict[str, Any] = {}  # no top-k counts: the samples themselves are kept
        self.report: dict[str, Any] = {}
        self.samples = EvalSamples()
        """This epoch's validation samples (not in checkpoints: a validation epoch is never resumed midway)."""
        self.deferred = DeferredSteps(self._fold, lambda: bool(self.train))

    def to(self, device: torch.device | str) -> MultiLabelBankMetrics:
        """Move every state to ``device``."""
        super().to(device)
        self.samples.to(device)
        return self

    def set_process_group(self, group: dist.ProcessGroup | None) -> None:
        """The group torchmetrics would sync over."""
        super().set_process_group(group)
        self.samples.process_group = group

    def update_eval(
        self, logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor, select: torch.Tensor
    ) -> None:
        """Keep a validation batch's counted samples, with their split."""
        self.samples.update(logits, targets, keep, select)

    def compute_eval(self, group: dist.ProcessGroup | None) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """Per-head values on the whole set, the best head (by the first metric on the selection split) on the rest."""
        logits, targets, select = self.samples.gathered(group, self.num_heads, self.num_labels)
        self.samples.reset()
        probs = logits.sigmoid()
        selector = self.names[0]  # the first metric the user listed, as a class-index bank's (mAP by default)
        values: dict[str, torch.Tensor] = {}
        whole, chosen = [], []
        for head in self.config.heads():
            for name, value in head_values(probs[:, head.index], targets, self.names).items():
                values[keys.relative_key(name, head=head.head_id)] = value
            whole.append(values[keys.relative_key(selector, head=head.head_id)])
            chosen.append(head_values(probs[select, head.index], targets[select], [selector])[selector])
        best = self.choose_best(torch.stack(chosen), torch.stack(whole))
        report = select.logical_not()

        def at_best(b: torch.Tensor) -> dict[str, torch.Tensor]:
            return head_values(probs[report][:, int(b)], targets[report], self.names)

        values.update(best_values(self.names, best, at_best, probs.device))
        return values, best
