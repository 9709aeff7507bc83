"""Seeded bootstrap intervals from per-sample results (torch only).

A reported accuracy is the mean of per-sample values (1 for a right answer, 0 for a wrong one). Resampling those
values with replacement gives its spread without running any model again; the percentile interval of the resampled
means is the interval reported. The resamples come from a generator seeded by the caller, so a number and its
interval are the same every time they are computed.
"""

from __future__ import annotations

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
    generator = torch.Generator().manual_seed(seed)
    means = torch.empty(resamples, dtype=torch.float64)
    per_chunk = max(1, _CHUNK // n)
    for start in range(0, resamples, per_chunk):
        count = min(per_chunk, resamples - start)
        index = torch.randint(0, n, (count, n), generator=generator)
        means[start : start + count] = values[index].mean(1)
    tail = (1.0 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
    return Interval(float(values.mean()), low, high, level, resamples)
