"""`eval/{name}_best_l2` is logged as the configured lambda exactly, not its float32 neighbour.

Before: the ridge logged the chosen lambda as a float32 tensor, so ``l2=1e-4`` read ``9.99999975e-05`` in
``trainer.callback_metrics`` and in a CSV log, and a user comparing it with the ``l2`` list found no match.
A real `lightning.Trainer` with a real `CSVLogger`.
"""

from __future__ import annotations

import csv

from lightning.pytorch.loggers import CSVLogger
from tests.helpers.models import Backbone, loader, trainer

from distprobe.callbacks import OnlineRidge

#: None of them is a float32 number: each one's float32 neighbour differs from it.
L2 = (1e-4, 0.1, 0.3)
KEY = "eval/ridge_best_l2"


def test_the_logged_lambda_is_the_configured_one(tmp_path):
    ridge = OnlineRidge(None, "ridge", input="embedding", target="label", num_classes=3, l2=L2)
    logger = CSVLogger(tmp_path, name="log", version=0)
    fit = trainer([ridge], max_epochs=2, logger=logger, log_every_n_steps=1)
    fit.fit(Backbone(lr=0.0), loader(96, batch_size=32), loader(40, batch_size=16, seed=1))

    logged = fit.callback_metrics[KEY].item()
    assert logged == L2[ridge.ridge.best_index]
    assert logged in L2
    with open(logger.log_dir + "/metrics.csv") as file:
        written = [float(row[KEY]) for row in csv.DictReader(file) if row.get(KEY)]
    assert len(written) == 2  # one per validation
    assert all(value in L2 for value in written), written
