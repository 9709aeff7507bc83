"""Bootstrap intervals of the service's numbers, from per-sample results gathered over the job's ranks.

Rank ``r`` of ``N`` scores validation rows ``r, r + N, ...``. Each rank writes its rows' per-sample results (1 for a
right answer, 0 for a wrong one) into a zero-filled ``(N_val, columns)`` tensor and one sum over the group gives
every rank every row (`distprobe.convex.spread.gather_rows`): the same tensor at any world size. The interval is the
seeded percentile bootstrap of `distprobe.convex.bootstrap_interval`; no model is run again.
"""

from __future__ import annotations

import dataclasses

import torch

from distprobe.convex import bootstrap_interval
from distprobe.convex.spread import gather_rows
from distprobe.engine.replicate import default_group
from distprobe.service.config import IntervalsConfig
from distprobe.service.store import ResultRow


class PerSample:
    """A ``(N_val, columns)`` float64 table of per-sample results, filled by rows on each rank, then gathered."""

    def __init__(self, size: int, columns: int, device: torch.device) -> None:
        self.table = torch.zeros(size, columns, dtype=torch.float64, device=device)

    def fill(self, index: torch.Tensor, values: torch.Tensor, first_column: int = 0) -> None:
        """This rank's rows ``index`` ``(b,)`` get ``values`` ``(b, c)`` in columns ``first_column`` onwards.

        ``values`` may hold padding rows after the first ``b``; they are left out.
        """
        if index.numel():
            columns = slice(first_column, first_column + values.shape[1])
            self.table[index.to(self.table.device), columns] = values[: index.numel()].to(self.table)

    def gathered(self) -> torch.Tensor:
        """Every rank's rows (a collective: every rank calls it), on the CPU."""
        return gather_rows(self.table, default_group()).cpu()


def with_interval(row: ResultRow, per_sample: torch.Tensor, spec: IntervalsConfig) -> ResultRow:
    """``row`` with the bootstrap interval of ``per_sample`` ``(n,)`` (unchanged when intervals are off or n = 0)."""
    if spec.resamples < 1 or per_sample.numel() == 0:
        return row
    interval = bootstrap_interval(per_sample, resamples=spec.resamples, level=spec.level, seed=spec.seed)
    return dataclasses.replace(row, low=interval.low, high=interval.high)
