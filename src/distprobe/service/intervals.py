"""Bootstrap intervals of the service's numbers, from per-sample results gathered over the job's ranks.

Rank ``r`` of ``N`` scores validation rows ``r, r + N, ...``. Each rank writes its rows' per-sample results (1 for a
right answer, 0 for a wrong one) into a zero-filled ``(N_val, columns)`` tensor and one sum over the group gives
every rank every row (`distprobe.convex.spread.gather_rows`): the same tensor at any world size. The interval is the
seeded bias-corrected percentile bootstrap of `distprobe.convex.bootstrap_bounds`; no model is run again.

Only rank 0 publishes rows, so only rank 0 computes intervals. The columns of one table share their resamples:
drawing the resample indices is the cost (1,000 x N of them), so a bank's heads and a kNN's k's are resampled
together, each resample's means for every column as one product of its counts with the table. The draws are
`bootstrap_interval`'s own (both call `bootstrap_bounds`), so each column's interval is the one it would give alone.
"""

from __future__ import annotations

import dataclasses

import torch

from distprobe.convex.bootstrap import Reducer, bootstrap_bounds
from distprobe.convex.spread import gather_rows
from distprobe.engine.collectives import rank_and_world
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


def interval_columns(table: torch.Tensor, spec: IntervalsConfig) -> list[tuple[float, float]] | None:
    """Each column's bootstrap interval of the mean of ``table`` ``(N, columns)``, resamples shared by the columns.

    None when intervals are off (``resamples: 0``), on ranks other than 0 (their rows are not published), or when
    there are no samples or no columns.
    """
    if spec.resamples < 1 or 0 in table.shape or rank_and_world(default_group())[0] != 0:
        return None
    values = table.detach().to(torch.float64).cpu()
    bounds = resampled(values.shape[0], lambda counts: counts @ values / values.shape[0], spec)
    return [(float(low), float(high)) for low, high in bounds.T.tolist()]


def resampled(n: int, reduce: Reducer, spec: IntervalsConfig) -> torch.Tensor:
    """`bootstrap_bounds` ``(2, columns)`` of ``reduce`` over ``n`` samples: the config's resamples, level, seed."""
    return bootstrap_bounds(n, reduce, resamples=spec.resamples, level=spec.level, seed=spec.seed)


def attach(row: ResultRow, bounds: list[tuple[float, float]] | None, column: int) -> ResultRow:
    """``row`` with column ``column``'s interval of `interval_columns`'s output (unchanged when it is None)."""
    if bounds is None:
        return row
    low, high = bounds[column]
    return dataclasses.replace(row, low=low, high=high)


def with_interval(row: ResultRow, per_sample: torch.Tensor, spec: IntervalsConfig) -> ResultRow:
    """``row`` with the bootstrap interval of ``per_sample`` ``(n,)`` (see `interval_columns`)."""
    return attach(row, interval_columns(per_sample.reshape(-1, 1), spec), 0)
