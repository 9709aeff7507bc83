"""Whole problems spread over the ranks of a group, and their results gathered (torch only).

A C grid or a set of few-shot episodes is many independent problems. Each rank fits whole problems, so nothing is
communicated inside a fit, and the results come back with one sum of zero-filled tensors: every entry is written by
exactly one rank and is zero on the others, so the sum is that rank's value bit for bit, and the gathered results
are the same at any world size as long as each problem is fitted the same way wherever it runs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from distprobe.engine.collectives import rank_and_world, sum_over_group


def my_share(num_problems: int, group: dist.ProcessGroup | None) -> list[int]:
    """The problems this rank fits: ``rank, rank + world, ...`` (every rank a whole, fixed subset)."""
    rank, world = rank_and_world(group)
    return list(range(rank, num_problems, world))


def gather_rows(rows: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """``rows`` ``(P, ...)`` with this rank's problems filled and every other row zero, summed over ``group``.

    The result holds every problem's row, as the rank that fitted it wrote it.
    """
    return sum_over_group(rows, group)
