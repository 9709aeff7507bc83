"""What the convex protocols accept as "one value or a list", and how often `logreg_grid` warns about bad rows.

Before: `logreg_grid` read ``c_grid`` itself and iterated a string character by character (``"5"`` ran a grid of
C=5, ``"0.5"`` failed in ``float('.')``), while few-shot's own reader took ``shots="5"`` as one shot count; now one
helper refuses a string for both, naming the protocol, the argument, the value and the fix. And every rank of a
2-rank group logged the same skipped-rows warning (each holds the whole set); now rank 0 does, as the service's
ridge does. Real gloo processes.
"""

from __future__ import annotations

import logging
import re

import pytest
import torch
from tests.convex.helpers import gaussian_classes
from tests.helpers.dist import run_distributed

from distprobe.convex import logreg_grid, run_fewshot

STRING = (
    r"a (string|list holding a string); expected one number or a list of numbers, e\.g\. .*; "
    r"fix: pass the number itself, not its text"
)


def _problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return gaussian_classes(60, 20, dim=4, num_classes=3)


@pytest.mark.parametrize("c_grid", ["5", "0.5", ["0.1", 1.0]])
def test_logreg_refuses_a_string_grid(c_grid):
    with pytest.raises(ValueError, match=rf"^logreg: argument 'c_grid' got {re.escape(repr(c_grid))}, " + STRING):
        logreg_grid(*_problem(), 3, c_grid=c_grid)


@pytest.mark.parametrize(("argument", "value"), [("shots", "5"), ("reg", "0.01"), ("shots", ["5"])])
def test_fewshot_refuses_a_string(argument, value):
    options = {"shots": 5, "seeds": 1, "solver": "ridge", "reg": 0.01, argument: value}
    with pytest.raises(ValueError, match=rf"^fewshot: argument '{argument}' got {re.escape(repr(value))}, " + STRING):
        run_fewshot(*_problem(), 3, **options)


def test_one_number_is_still_a_grid_of_one():
    assert logreg_grid(*_problem(), 3, c_grid=0.5).c_grid == (0.5,)
    assert logreg_grid(*_problem(), 3, c_grid=torch.tensor(0.5)).c_grid == (0.5,)
    assert [r.shots for r in run_fewshot(*_problem(), 3, shots=5, seeds=1, solver="ridge", reg=0.01)] == [5]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _skipped_rows_warnings(rank: int, world_size: int) -> list[str]:
    train_x, train_y, val_x, val_y = _problem()
    train_x[3, 0] = float("nan")
    train_y[7] = 9  # out of range
    records = _Records()
    logging.getLogger("distprobe.convex.logreg").addHandler(records)
    group = torch.distributed.group.WORLD
    result = logreg_grid(train_x, train_y, val_x, val_y, 3, c_grid=(0.1, 1.0), chain=1, group=group)
    assert result.skipped_train == 2
    return [m for m in records.messages if "training samples" in m]


@pytest.mark.distributed
def test_logreg_warns_about_skipped_rows_on_rank_0_only():
    per_rank = run_distributed(_skipped_rows_warnings, 2)
    assert len(per_rank[0]) == 1 and "2 of 60 training samples" in per_rank[0][0]
    assert per_rank[1] == []
