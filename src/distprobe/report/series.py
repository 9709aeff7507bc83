"""Small pure functions over a logged series and a metric's name."""

from __future__ import annotations

import math
from collections.abc import Iterable

from distprobe.report.readers import Point, Series


def last(series: Series) -> Point | None:
    """The last point (the final value and its step)."""
    return series[-1] if series else None


def best(series: Series, higher: bool = True) -> Point | None:
    """The highest (``higher``) or lowest finite value and its first step; None without one."""
    finite = [p for p in series if math.isfinite(p[1])]
    if not finite:
        return None
    return max(finite, key=lambda p: (p[1] if higher else -p[1], -p[0]))


def is_top_k(metric: str) -> bool:
    """Whether ``metric`` is named as a top-k accuracy: ``top1``, ``top5``."""
    return metric.startswith("top") and metric[3:].isdigit()


#: Headline metrics that are not accuracies, in the order the report prefers them: a multi-label bank's or kNN's
#: macro mAP (`distprobe.bank.multilabel`), a dense bank's mIoU (`distprobe.bank.segmentation`), then what a bank
#: that lists only others in its ``metrics`` logs (F1s, pixel accuracy).
SCORE_METRICS = ("mAP", "mIoU", "f1_micro", "f1_macro", "pixel_acc")


def headline_metric(metrics: Iterable[str]) -> str | None:
    """The metric a probe is drawn and ranked by; None if it logged none of these.

    ``top1`` if logged, else the first other top-k, else the first ``acc*`` metric, else the first of
    `SCORE_METRICS` logged.
    """
    names = sorted(set(metrics))
    top_k = sorted((m for m in names if is_top_k(m)), key=lambda m: int(m[3:]))
    candidates = top_k + [m for m in names if m.startswith("acc")] + [m for m in SCORE_METRICS if m in names]
    return candidates[0] if candidates else None


def axis_label(metric: str | None) -> str:
    """The y label of a metric's panel: ``accuracy`` for a top-k or ``acc*`` metric, else the metric's own name."""
    if metric is None or is_top_k(metric) or metric.startswith("acc"):
        return "accuracy"
    return metric
