"""A windowed `EmbeddingMonitor` (``every_n_steps``) writes each window's values to the loggers once.

Lightning keeps a step value logged from a callback until the epoch ends and writes it again at every later logging
step. Before the fix a monitor logging RankMe every 3 batches therefore wrote each window's value under 3 steps of
a CSV log (its own and the next two), as if it had been measured there. Now each value is written once: at the step
its window closes when Lightning writes that step, else at the next step Lightning writes; and
``trainer.callback_metrics`` still holds the last window's value. Real `lightning.Trainer` fits with a `CSVLogger`.
"""

from __future__ import annotations

import csv

import pytest
from lightning.pytorch.loggers import CSVLogger
from tests.helpers.models import Backbone, loader, trainer

from distprobe.callbacks import EmbeddingMonitor

BATCHES, EPOCHS, WINDOW = 7, 2, 3
KEY = "train/m_rankme"


def _written(tmp_path, log_every_n_steps: int) -> tuple[list[tuple[int, float]], float]:
    monitor = EmbeddingMonitor(None, "m", input="embedding", every_n_steps=WINDOW)
    logger = CSVLogger(tmp_path)
    t = trainer([monitor], max_epochs=EPOCHS, logger=logger, log_every_n_steps=log_every_n_steps)
    t.fit(Backbone(), loader(n=BATCHES * 8, batch_size=8))
    with open(f"{logger.log_dir}/metrics.csv") as file:
        rows = [(int(row["step"]), float(row[KEY])) for row in csv.DictReader(file) if row.get(KEY)]
    return rows, float(t.callback_metrics[KEY])


def _first_written_step(step: int, every: int) -> int:
    """The first step from ``step`` on that Lightning writes: ``(step + 1) % every == 0`` (``should_update_logs``)."""
    return step + (-(step + 1)) % every


@pytest.mark.parametrize("log_every_n_steps", [1, 2])
def test_each_window_is_written_once(tmp_path, log_every_n_steps):
    rows, last = _written(tmp_path, log_every_n_steps)
    closing_steps = [batch - 1 for batch in range(WINDOW, BATCHES * EPOCHS + 1, WINDOW)]  # batches 3, 6, 9, 12
    assert [step for step, _ in rows] == [_first_written_step(s, log_every_n_steps) for s in closing_steps]
    values = [value for _, value in rows]
    assert len(set(values)) == len(values)  # four windows, four values: none written twice
    assert values[-1] == pytest.approx(last, rel=1e-6)  # callback_metrics keeps the last window's
