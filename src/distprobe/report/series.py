"""Small pure functions over a logged series and a head's id."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

from distprobe.report.readers import Point, Series

_HEAD_PARTS = re.compile(r"^(?P<source>.+)/lr=(?P<lr>[^/]+)/wd=(?P<wd>[^/]+)/norm=(?P<norm>none|bn)$")
_TOP_K = re.compile(r"^top\d+$")


def last(series: Series) -> Point | None:
    """The last point (the final value and its step)."""
    return series[-1] if series else None


def best(series: Series, higher: bool = True) -> Point | None:
    """The highest (``higher``) or lowest finite value and its first step; None without one."""
    finite = [p for p in series if math.isfinite(p[1])]
    if not finite:
        return None
    return max(finite, key=lambda p: (p[1] if higher else -p[1], -p[0]))


def head_parts(head_id: str) -> dict[str, str] | None:
    """``{"source", "lr", "wd", "norm"}`` of a bank head's id, or None if it is not one."""
    match = _HEAD_PARTS.match(head_id)
    return match.groupdict() if match else None


def accuracy_metric(metrics: Iterable[str]) -> str | None:
    """``top1`` if logged, else the first other top-k, else the first ``acc*`` metric."""
    names = sorted(set(metrics))
    top_k = sorted((m for m in names if _TOP_K.match(m)), key=lambda m: int(m[3:]))
    candidates = top_k + [m for m in names if m.startswith("acc")]
    return candidates[0] if candidates else None
