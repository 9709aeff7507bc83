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


def accuracy_metric(metrics: Iterable[str]) -> str | None:
    """``top1`` if logged, else the first other top-k, else the first ``acc*`` metric."""
    names = sorted(set(metrics))
    top_k = sorted((m for m in names if is_top_k(m)), key=lambda m: int(m[3:]))
    candidates = top_k + [m for m in names if m.startswith("acc")]
    return candidates[0] if candidates else None
