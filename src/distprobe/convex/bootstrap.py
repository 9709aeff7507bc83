"""Seeded bootstrap intervals from per-sample results (torch only).

A reported accuracy is the mean of per-sample values (1 for a right answer, 0 for a wrong one). Resampling those
values with replacement gives its spread without running any model again; the percentile interval of the resampled
means is the interval reported. The resamples come from a generator seeded by the caller, so a number and its
interval are the same every time they are computed.

A value that is not a mean (mAP, F1, mIoU) is resampled the same way: `bootstrap_bounds` draws the resamples and
hands each chunk of them, as a ``(resamples, N)`` matrix of how often each sample was drawn, to a reducer that turns
per-sample statistics into the value (`distprobe.convex.resampled` holds the reducers of the service's metrics).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

#: The most index entries drawn at once (resamples x samples), to bound memory on large validation sets.
_CHUNK = 1 << 24


@dataclass(frozen=True)
class Interval:
    """A value and its bootstrap interval."""

    value: float
    low: float
    high: float
    level: float
    resamples: int


def bootstrap_interval(
    per_sample: torch.Tensor, *, resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> Interval:
    """The mean of ``per_sample`` ``(N,)`` and its percentile bootstrap interval at ``level``.

    Example:
        >>> interval = bootstrap_interval(torch.tensor([1.0, 0.0, 1.0, 1.0]), resamples=200)
        >>> interval.low <= interval.value <= interval.high
        True
    """
    values = per_sample.detach().reshape(-1).to(torch.float64).cpu()
    if values.numel() == 0:
        raise ValueError("bootstrap_interval: no per-sample values; expected one value per validation sample")
    if resamples < 1 or not 0.0 < level < 1.0:
        raise ValueError(
            f"bootstrap_interval: resamples={resamples}, level={level}; expected resamples >= 1 and level in (0, 1)"
        )
    n = values.numel()
    mean = lambda counts: counts @ values[:, None] / n  # noqa: E731
    low, high = bootstrap_bounds(n, mean, resamples=resamples, level=level, seed=seed)[:, 0]
    return Interval(float(values.mean()), float(low), float(high), level, resamples)


#: A reducer: ``(resamples, N)`` float64 draw counts (each row sums to N) -> ``(resamples, columns)`` values.
Reducer = Callable[[torch.Tensor], torch.Tensor]


def bootstrap_bounds(
    n: int, reduce: Reducer, *, resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> torch.Tensor:
    """``(2, columns)`` percentile bounds at ``level`` of ``reduce`` over ``resamples`` resamples of ``n`` samples.

    Every value the service reports is resampled here, in chunks of at most `_CHUNK` drawn indices, so the draws
    (and an interval) depend on ``seed``, ``resamples`` and ``n`` only. A column whose resampled value is NaN (a
    resample without a sample it needs) is bounded over its other resamples; NaN when all are.

    Example:
        >>> values = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
        >>> bootstrap_bounds(4, lambda counts: counts @ values[:, None] / 4, resamples=200).shape
        torch.Size([2, 1])
    """
    if n < 1 or resamples < 1 or not 0.0 < level < 1.0:
        raise ValueError(
            f"bootstrap_bounds: n={n}, resamples={resamples}, level={level}; expected n >= 1 samples, "
            "resamples >= 1 and level in (0, 1)"
        )
    generator = torch.Generator().manual_seed(seed)
    parts = []
    per_chunk = max(1, _CHUNK // n)
    for start in range(0, resamples, per_chunk):
        count = min(per_chunk, resamples - start)
        index = torch.randint(0, n, (count, n), generator=generator)
        counts = torch.zeros(count, n, dtype=torch.float64).scatter_add_(1, index, torch.ones(count, n).double())
        parts.append(reduce(counts).to(torch.float64).reshape(count, -1))
    tail = (1.0 - level) / 2
    quantiles = torch.tensor([tail, 1.0 - tail], dtype=torch.float64)
    return torch.nanquantile(torch.cat(parts), quantiles, dim=0)
