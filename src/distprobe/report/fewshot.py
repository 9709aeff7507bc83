"""The probing service's few-shot results as curves: per shot count, the mean over seeds and its spread, by step.

The service stores each episode's value under the head ``shots={shots}/seed={seed}`` and, per shot count, the mean
over seeds under ``shots={shots}`` with its bootstrap interval and ``{metric}_std`` (the standard deviation over
seeds, n - 1). The report draws the mean with a mean +- std band (`distprobe.report.plot`), not one thin line per
episode. Without the shot count's rows (a store of another version), the mean and std come from the episodes.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from distprobe import keys
from distprobe.report.service_logs import CheckpointResult
from distprobe.service.store import BootstrapEnds

STD_SUFFIX = "_std"
"""The shot count's standard deviation over seeds is stored as the metric ``{metric}_std``."""


@dataclass(frozen=True)
class ShotsPoint(BootstrapEnds):
    """One shot count at one checkpoint: the mean over seeds, with its bootstrap interval where the store has it."""

    step: int
    mean: float
    """The mean over seeds."""
    std: float
    """The standard deviation over seeds (n - 1; 0 for one seed)."""
    seeds: int
    """How many episodes (seeds) the checkpoint's results hold for this shot count (0: only the mean was read)."""


@dataclass(frozen=True)
class ShotsCurve:
    """One shot count's points over the checkpoints, by step."""

    shots: int
    points: tuple[ShotsPoint, ...]


def is_fewshot(head: str) -> bool:
    """Whether ``head`` is a few-shot episode's or shot count's (`distprobe.keys.fewshot_shots`)."""
    return keys.fewshot_shots(head) is not None


def fewshot_curves(rows: Sequence[CheckpointResult], metric: str) -> list[ShotsCurve]:
    """One curve per shot count found in ``rows`` (by increasing shots), for ``metric`` (``top1``)."""
    episodes: dict[tuple[int, int], list[float]] = {}
    means: dict[tuple[int, int], CheckpointResult] = {}
    stds: dict[tuple[int, int], float] = {}
    for row in rows:
        parsed = keys.fewshot_shots(row.head)
        if parsed is None:
            continue
        shots, seed = parsed
        at = (shots, row.step)
        if seed is not None and row.metric == metric:
            episodes.setdefault(at, []).append(row.value)
        elif seed is None and row.metric == metric:
            means[at] = row
        elif seed is None and row.metric == metric + STD_SUFFIX:
            stds[at] = row.value
    curves: dict[int, list[ShotsPoint]] = {}
    for shots, step in sorted(set(episodes) | set(means)):
        values = episodes.get((shots, step), [])
        mean_row = means.get((shots, step))
        if mean_row is not None:
            mean, low, high = mean_row.value, mean_row.low, mean_row.high
        else:
            mean, low, high = statistics.fmean(values), None, None
        std = stds.get((shots, step))
        if std is None:
            std = statistics.stdev(values) if len(values) > 1 else 0.0
        curves.setdefault(shots, []).append(ShotsPoint(step, mean, std, len(values), low=low, high=high))
    return [ShotsCurve(shots, tuple(points)) for shots, points in sorted(curves.items())]
