"""RankMe and LiDAR leave out embeddings holding a NaN or inf, instead of returning a wrong finite value.

Before the fix one NaN in one row made the whole summed Gram matrix NaN; the eigensolver's guard then replaced it
with zeros and the epoch's RankMe or LiDAR came out finite and wrong (3.41 became 2.60 on 8 random rows), with
nothing to tell. Now such a row (for LiDAR, the sample it is a view of) is left out on the device, with no host sync:
the value equals the one computed without it. Also through a `ProbeSet` monitor, as the Lightning callback runs it.
"""

from __future__ import annotations

import pytest
import torch
from tests.monitors.test_maths import direct_lidar, direct_rankme, low_rank_views

from distprobe.loop import ProbeSet
from distprobe.monitors import LiDAR, RankMe


def test_rankme_leaves_out_a_row_with_a_nan_or_inf():
    rows = torch.randn(12, 6, generator=torch.Generator().manual_seed(0))
    bad = rows.clone()
    bad[3, 2], bad[7, 0] = float("nan"), float("inf")
    metric = RankMe(6)
    metric.update(bad)
    kept = rows[[i for i in range(12) if i not in (3, 7)]]
    assert metric.compute().item() == pytest.approx(direct_rankme(kept).item(), rel=1e-9)
    assert metric.count.item() == 10


@pytest.mark.parametrize("layout", ["views", "rows_with_ids"])
def test_lidar_leaves_out_a_sample_with_a_non_finite_view(layout):
    views = low_rank_views(n=10, q=3, d=6, rank=4, seed=1)
    bad = views.clone()
    bad[4, 1, 2] = float("nan")  # one value of one view of sample 4: the whole sample goes
    metric = LiDAR(6)
    if layout == "views":
        metric.update(bad)
    else:
        metric.update(bad.reshape(-1, 6), torch.arange(10).repeat_interleave(3))
    kept = views[[i for i in range(10) if i != 4]]
    assert metric.compute().item() == pytest.approx(direct_lidar(kept).item(), rel=1e-6)
    assert (metric.num_samples.item(), metric.num_views.item()) == (9, 27)


def test_a_monitor_in_a_probe_set_logs_the_value_without_the_bad_rows():
    views = low_rank_views(n=8, q=2, d=6, rank=4, seed=2).float()
    bad = views.clone()
    bad[0, 0, 0] = float("nan")
    probes = ProbeSet.build([], monitors=[{"name": "m", "input": "views", "metrics": ("rankme", "lidar")}])
    probes.step({"views": bad}, {})
    values = probes.compute_train_metrics()
    assert values["train/m_rankme"].item() == pytest.approx(direct_rankme(bad.reshape(-1, 6)[1:]).item(), rel=1e-5)
    assert values["train/m_lidar"].item() == pytest.approx(direct_lidar(views[1:]).item(), rel=1e-5)
