"""Metric kinds: what a bank reports per head, how its states sync exactly, and which score chooses the best head.

A head family declares its kind (`distprobe.bank.families.HeadFamily.metric_kind`); a multi-label bank's targets
make it ``"multilabel"`` whatever the family. A new kind (dense heads' mIoU, for one) is one `BankMetrics`
subclass in its own file and one entry here: the bank's engine only calls the `BankMetrics` interface
(``update_eval``, ``compute_eval``, ``compute_train``, ``synced_states``...).
"""

from __future__ import annotations

from distprobe.bank.config import BankConfig
from distprobe.bank.metrics_set import BankMetrics
from distprobe.bank.multilabel import MultiLabelBankMetrics
from distprobe.bank.segmentation import SegmentationBankMetrics

#: Each kind's metrics by name.
METRIC_KINDS: dict[str, type[BankMetrics]] = {
    "classification": BankMetrics,
    "multilabel": MultiLabelBankMetrics,
    "segmentation": SegmentationBankMetrics,
}


def metric_kind(config: BankConfig) -> str:
    """The kind of ``config``'s bank: ``"multilabel"`` for multi-hot targets, else its family's."""
    if config.multilabel:
        return "multilabel"
    from distprobe.bank.families import FAMILIES

    return FAMILIES[config.family].metric_kind


def build_metrics(config: BankConfig, num_heads: int | None = None) -> BankMetrics:
    """The bank's metrics, of its kind."""
    kind = metric_kind(config)
    count = len(config.heads()) if num_heads is None else num_heads
    return METRIC_KINDS[kind](config, count, kind=kind)
