"""Embedding monitors in a plain-torch `ProbeSet` (the engine `EmbeddingMonitor` hands its Trainer's set), with real
torchmetrics: per-epoch train and eval values, ``every_n_steps`` windows, ``view_key`` ids, padded evaluation
batches and checkpoints, on one process and on 2 gloo ranks (one spawn) that must equal the direct formulas on the
concatenated features."""

import pytest
import torch
from tests.helpers.dist import run_distributed
from tests.monitors.test_maths import direct_lidar, direct_rankme, low_rank_views

from distprobe.loop import ProbeSet

STEPS, SAMPLES, VIEWS, DIM = 4, 6, 3, 10
VAL = 7  # 2 ranks: the second one's share is padded by one sample
MONITORS = [
    {"name": "views", "input": "views", "metrics": ("rankme", "lidar"), "stage": ("train", "val")},
    {"name": "rows", "input": "rows", "metrics": ("lidar",), "view_key": "view"},
    {"name": "win", "input": "views", "metrics": "rankme", "every_n_steps": 2},
]


def _data() -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per step, ``(SAMPLES, VIEWS, DIM)`` global views (rank r takes samples r, r + world, ...), and the val views."""
    views = low_rank_views(n=STEPS * SAMPLES + VAL, q=VIEWS, d=DIM, rank=4, seed=3)
    return list(views[: STEPS * SAMPLES].split(SAMPLES)), views[STEPS * SAMPLES :]


def _run(rank: int, world: int) -> dict:
    batches, val = _data()
    probes = ProbeSet.build([], monitors=MONITORS)
    windows = []
    for views in batches:
        mine = views[rank::world]
        rows = mine.transpose(0, 1).reshape(-1, DIM)  # every sample's view 0, then every sample's view 1, ...
        probes.step({"views": mine, "rows": rows}, {"view": torch.arange(VIEWS).repeat_interleave(len(mine))})
        windows.append({k: float(v) for k, v in probes.window_values.items()})
    train = {k: float(v) for k, v in probes.compute_train_metrics().items()}
    probes.reset_train_metrics()
    own = torch.arange(rank, VAL, world)
    share = -(-VAL // world)
    padded = torch.cat([own, own[: share - len(own)]])  # a distributed sampler repeats samples to even the shares
    probes.evaluate({"views": val[padded]}, {}, num_valid=len(own))
    evaluated = {k: float(v) for k, v in probes.compute_metrics().items()}
    state = probes.state_dict()
    resumed = ProbeSet.build([], monitors=MONITORS)
    resumed.load_state_dict(state)
    return {"windows": windows, "train": train, "eval": evaluated, "state": state, "resumed": resumed.state_dict()}


def _check(result: dict) -> None:
    batches, val = _data()
    seen = torch.cat(batches)
    expected_train = {
        "train/views_rankme": direct_rankme(seen.reshape(-1, DIM)),
        "train/views_lidar": direct_lidar(seen),
        "train/rows_lidar": direct_lidar(seen),  # the rows regrouped into samples by their view index
    }
    assert set(result["train"]) == set(expected_train)  # the windowed monitor logs only at its windows
    for key, value in expected_train.items():
        assert result["train"][key] == pytest.approx(float(value), rel=1e-6), key
    windows = result["windows"]
    assert windows[0] == {} and windows[2] == {}
    for step, rows in ((1, slice(0, 2)), (3, slice(2, 4))):  # each window sums its own two batches only
        window = torch.cat(batches[rows]).reshape(-1, DIM)
        assert windows[step] == {"train/win_rankme": pytest.approx(float(direct_rankme(window)), rel=1e-6)}
    assert result["eval"] == {
        "eval/views_rankme": pytest.approx(float(direct_rankme(val.reshape(-1, DIM))), rel=1e-6),
        "eval/views_lidar": pytest.approx(float(direct_lidar(val)), rel=1e-6),
    }
    assert result["state"]["win"]["train_batches"] == STEPS
    assert result["resumed"]["win"]["train_batches"] == STEPS  # where the windows fall survives a checkpoint


def test_monitors_in_a_probe_set_on_one_process():
    _check(_run(0, 1))


@pytest.mark.distributed
def test_monitors_in_a_probe_set_on_two_ranks_equal_the_concatenated_features():
    for result in run_distributed(_run, 2, timeout=120):
        _check(result)


def test_a_monitor_missing_its_view_ids_or_given_a_bad_metric_is_refused_by_name():
    probes = ProbeSet.build([], monitors=[MONITORS[1]])
    with pytest.raises(ValueError, match=r"monitor 'rows': view_key 'view' not found.*available keys: \['rows'\]"):
        probes.step({"rows": torch.randn(6, DIM)}, {})
    with pytest.raises(ValueError, match=r"monitor 'm': argument 'metrics' got \('rank_me',\)"):
        ProbeSet.build([], monitors=[{"name": "m", "input": "x", "metrics": ("rank_me",)}])
    with pytest.raises(ValueError, match=r"monitor 'm': unknown spec key\(s\) \['target'\]"):
        ProbeSet.build([], monitors=[{"name": "m", "input": "x", "target": "y"}])
