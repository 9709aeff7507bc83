"""The service's convex probes on cached features holding bad rows: a training row with a non-finite feature or a
label out of range is left out on its own, a validation row with one is not counted, in a value nor in its interval;
on 1 and 2 gloo ranks (odd sizes: the ranks' shares are uneven).

Before: one NaN among 200 cached training rows made `run_ridge` drop its whole chunk of rows, which on one rank was
every row, and the job failed with ``KeyError: 'l2=0.001_top1'``; on 2 ranks it dropped the half of the rows that
shared the NaN row's rank. Validation rows the ridge did not count were still resampled in its intervals, and
logreg and few-shot scored NaN validation rows as answers.
"""

from __future__ import annotations

import pytest
import torch
from tests.helpers.dist import run_distributed

from distprobe.convex import RidgeStatistics, bootstrap_interval, logreg_grid, run_fewshot
from distprobe.service.config import EvalConfig, ServiceConfigError
from distprobe.service.extract import CachedSplit
from distprobe.service.train_convex import check_fewshot_classes, run_fewshot_episodes, run_logreg, run_ridge

from .helpers import gaussian_classes

RESAMPLES, SEED = 200, 3
BAD_TRAIN = 5
BAD_VAL = (4, 17, 60)  # a NaN feature, an inf feature, a label out of range


def _config(**probes) -> EvalConfig:
    stand_in = {"_target_": "tests.service.models.labeled"}
    options = {
        "ridge": {"l2": [0.001, 1.0]},
        "logreg": {"c_grid": [0.1, 1.0], "chain": 1},
        "fewshot": {"shots": [2, 5], "seeds": 2, "reg": 0.1},
        "intervals": {"resamples": RESAMPLES, "seed": SEED},
        **probes,
    }
    return EvalConfig.from_dict(
        {"num_classes": 3, "backbone": stand_in, "data": {"train": stand_in, "val": stand_in}, "probes": options}
    )


def _splits(bad_train: bool = True, bad_val: bool = True) -> tuple[CachedSplit, CachedSplit]:
    tx, ty, vx, vy = gaussian_classes(201, 101, num_classes=3, spread=0.8)
    tx, vx = tx.float(), vx.float()  # the cache's type
    if bad_train:
        tx[BAD_TRAIN, 0] = float("nan")
    if bad_val:
        vx[BAD_VAL[0], 1], vx[BAD_VAL[1], 2], vy[BAD_VAL[2]] = float("nan"), float("inf"), 3
    return CachedSplit(tx, ty), CachedSplit(vx, vy)


def _rows(rows) -> dict:
    return {(r.probe, r.head, r.metric): (r.value, r.low, r.high) for r in rows}


def _all_rows(job_dir=None) -> dict:
    config, (train, val), cpu = _config(), _splits(), torch.device("cpu")
    rows = run_ridge(config, train, val, cpu) + run_logreg(config, train, val, cpu)
    return _rows(rows + run_fewshot_episodes(config, train, val, cpu, job_dir))


def _counted() -> torch.Tensor:
    counted = torch.ones(101, dtype=torch.bool)
    counted[list(BAD_VAL)] = False
    return counted


def test_ridge_leaves_out_a_bad_training_row_alone():
    config, cpu = _config(), torch.device("cpu")
    train, val = _splits(bad_val=False)
    keep = torch.arange(201) != BAD_TRAIN
    clean = _rows(run_ridge(config, CachedSplit(train.features[keep], train.labels[keep]), val, cpu))
    assert _rows(run_ridge(config, train, val, cpu)) == clean
    assert ("ridge", "l2=0.001", "top1") in clean


def _interval(correct: torch.Tensor) -> tuple[float, float, float]:
    interval = bootstrap_interval(correct.double(), resamples=RESAMPLES, seed=SEED)
    return interval.value, interval.low, interval.high


def test_values_and_intervals_count_only_the_good_validation_rows():
    rows = _all_rows()
    counted = _counted()
    # Each value is the mean of its counted samples' results, and its interval resamples exactly those.
    for key, (value, low, high) in rows.items():
        if key[2] == "top1":
            assert low <= value <= high, key
    train, val = _splits()
    keep = torch.arange(201) != BAD_TRAIN
    stats = RidgeStatistics(6, 3)
    stats.update(train.features[keep], train.labels[keep])
    correct = stats.solve([0.001, 1.0]).predict(torch.nan_to_num(val.features)) == val.labels
    for i, head in enumerate(["l2=0.001", "l2=1"]):
        value, low, high = _interval(correct[i, counted])
        assert rows[("ridge", head, "top1")] == pytest.approx((value, low, high), abs=1e-6)
    # Logreg and each few-shot episode: the core's counted samples, and their interval alone.
    logreg = logreg_grid(train.features, train.labels, val.features, val.labels, 3, c_grid=[0.1, 1.0], chain=1)
    assert torch.equal(logreg.val_counted, counted)
    assert rows[("logreg", "best", "top1")] == pytest.approx(_interval(logreg.counted_correct), abs=1e-9)
    episodes = run_fewshot(
        train.features, train.labels, val.features, val.labels, 3, shots=[2, 5], seeds=2, solver="ridge", reg=0.1
    )
    for episode in episodes:
        assert rows[("fewshot", episode.id, "top1")] == pytest.approx(_interval(episode.val_correct[counted]), abs=1e-9)


def test_fewshot_episodes_read_back_are_scored_on_the_same_samples(tmp_path):
    first = _all_rows(tmp_path)
    assert len(list((tmp_path / "episodes" / "fewshot").iterdir())) == 4
    again = _all_rows(tmp_path)  # a requeued job: every episode read back from its file
    assert again == first


def test_a_class_whose_rows_are_all_bad_is_refused_before_any_probe_trains():
    train, _ = _splits(bad_train=False)
    features = train.features.clone()
    features[train.labels == 2, 0] = float("nan")
    with pytest.raises(ServiceConfigError, match=r"class 2 has 0 sample\(s\)"):
        check_fewshot_classes(_config(), CachedSplit(features, train.labels))


def _ranks(rank: int, world_size: int) -> dict:
    return _all_rows()


@pytest.mark.distributed
def test_two_uneven_ranks_give_one_process_rows():
    one = _all_rows()
    two = run_distributed(_ranks, 2)
    assert set(two[0]) == set(one)
    for key, expected in one.items():
        assert two[0][key] == pytest.approx(expected, abs=1e-6), key
