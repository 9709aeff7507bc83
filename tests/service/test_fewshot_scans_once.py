"""A job's few-shot episodes find the usable rows of its cached sets once, not once per episode.

Before: every episode scanned the whole validation set for its counted rows (and each of the job's calls, one
episode per rank at a time, scanned it again, and the training set for its drawable rows), so a job of 100
episodes read 1.28M cached training rows 100 times. Now `FewshotRows.find` finds them once per job.

`usable_rows` is wrapped here to count which set it reads; the real function still runs, and the rows the job
publishes are checked against `run_fewshot` on the same sets.
"""

from __future__ import annotations

import pytest
import torch
from tests.convex.helpers import gaussian_classes

import distprobe.convex.fewshot
import distprobe.service.train_convex
from distprobe.convex import FewshotRows, run_fewshot
from distprobe.convex.usable import usable_rows
from distprobe.service.config import EvalConfig
from distprobe.service.extract import CachedSplit
from distprobe.service.train_convex import run_fewshot_episodes

TRAIN, VAL = 151, 67  # unequal: a scan's set is told by its length


def _config() -> EvalConfig:
    stand_in = {"_target_": "tests.service.models.labeled"}
    fewshot = {"shots": [2, 5], "seeds": 3, "reg": 0.1}
    data = {"train": stand_in, "val": stand_in}
    return EvalConfig.from_dict({"num_classes": 3, "backbone": stand_in, "data": data, "probes": {"fewshot": fewshot}})


def test_each_set_is_scanned_once_per_job(monkeypatch, tmp_path):
    tx, ty, vx, vy = gaussian_classes(TRAIN, VAL, num_classes=3)
    tx[4, 0], vx[9, 1] = float("nan"), float("nan")  # a row of each set that must be left out
    train, val = CachedSplit(tx.float(), ty), CachedSplit(vx.float(), vy)
    scans: list[int] = []

    def counting(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        scans.append(features.shape[0])
        return usable_rows(features, labels, num_classes)

    for module in (distprobe.convex.fewshot, distprobe.service.train_convex):
        monkeypatch.setattr(module, "usable_rows", counting)
    rows = run_fewshot_episodes(_config(), train, val, torch.device("cpu"), tmp_path)
    assert sorted(scans) == [VAL, TRAIN], scans  # 6 episodes, each set read once

    monkeypatch.undo()
    episodes = run_fewshot(train.features, ty, val.features, vy, 3, shots=[2, 5], seeds=3, solver="ridge", reg=0.1)
    published = {r.head: r.value for r in rows if r.metric == "top1"}
    assert len(episodes) == 6
    for episode in episodes:
        assert not bool(episode.val_correct[9])
        assert published[episode.id] == pytest.approx(episode.top1, abs=0)


def test_rows_of_other_sets_are_refused():
    tx, ty, vx, vy = gaussian_classes(TRAIN, VAL, num_classes=3)
    rows = FewshotRows.find(tx, ty, vx[:-1], vy[:-1], 3)
    with pytest.raises(ValueError, match=r"fewshot: argument 'rows' holds rows of num_classes=3 and 66 validation"):
        run_fewshot(tx, ty, vx, vy, 3, shots=2, seeds=1, solver="ridge", reg=0.1, rows=rows)
