"""What the report draws of one probe: its curves, its heads, its best head (plain data, no reading, no drawing)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from distprobe.report.readers import Series
from distprobe.report.service_logs import CheckpointResult

ProbeKind = Literal["probe", "bank", "knn", "ridge", "checkpoints"]
HeadOrders = Mapping[str, tuple[Sequence[str], str]]
"""Per bank name: its head ids in the bank's order, and where that order was read."""


@dataclass(frozen=True)
class HeadCurves:
    """One head of a bank (or one k of a kNN)."""

    head_id: str
    """``embedding/lr=0.01/wd=0/norm=none`` in a bank, ``k20`` in a kNN, ``l2=0.001`` in a ridge."""
    eval_accuracy: Series = ()
    """Its headline metric (accuracy, mAP, mIoU) on all validation samples."""
    train_accuracy: Series = ()
    """Its headline metric on the train epoch's batches."""
    train_loss: Series = ()
    """Its train epoch's mean loss."""


@dataclass(frozen=True)
class BestHead:
    """A bank's best head and the rule that picked it."""

    head_id: str
    """The head's id."""
    rule: str
    """How it was chosen, in words (for the summary)."""
    selected_by_bank: bool
    """True: the bank's own selection (``best_head``); False: the highest final eval accuracy among the heads."""


@dataclass(frozen=True)
class ProbeCurves:
    """Everything the report shows of one probe."""

    name: str
    """The probe's name."""
    kind: ProbeKind
    """``probe``, ``bank``, ``knn``, ``ridge``, or ``checkpoints`` (evaluated by the probing service only)."""
    headline_metric: str | None
    """The metric drawn and ranked by (`distprobe.report.series.headline_metric`): ``top1`` when logged, else another
    top-k or ``acc*`` metric, else a multi-label ``mAP`` or a dense ``mIoU``."""
    train_loss: Series = ()
    """Train loss on logging steps (a bank's: the mean over its heads)."""
    train_loss_epoch: Series = ()
    """Train loss, the epoch's mean."""
    eval_accuracy: Series = ()
    """A probe's eval metric; a bank's selected head's (or a ridge's chosen lambda's) on the report split
    (``best_*``); a kNN's first k's."""
    train_accuracy: Series = ()
    """A probe's train accuracy."""
    heads: tuple[HeadCurves, ...] = ()
    """A bank's heads, a kNN's k's, or a ridge's lambdas (by increasing lambda)."""
    best_head: BestHead | None = None
    """A bank's best head; a ridge's last chosen lambda."""
    best_l2: Series = ()
    """A ridge's chosen lambda at each validation (``eval/{name}_best_l2``)."""
    other_best: tuple[tuple[str, Series], ...] = ()
    """A bank's selected head's other metrics on the report split, by name: a multi-label bank's ``f1_micro`` and
    ``f1_macro``, a dense bank's ``pixel_acc``, a classifier's ``top5`` (``eval/{name}_best_{metric}``)."""
    checkpoints: tuple[CheckpointResult, ...] = ()
    """The probing service's results for this name."""

    @property
    def has_loss(self) -> bool:
        """Whether any train loss was logged (a kNN has none)."""
        return bool(self.train_loss or self.train_loss_epoch or any(h.train_loss for h in self.heads))

    def head(self, head_id: str) -> HeadCurves | None:
        """The head with that id, if logged."""
        return next((h for h in self.heads if h.head_id == head_id), None)
