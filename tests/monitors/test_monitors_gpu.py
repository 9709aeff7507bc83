"""On CUDA: the monitors' updates and EmbeddingMonitor's step never sync the host, and equal the CPU values.

Run with ``pytest -m gpu tests/monitors``; without CUDA these tests are skipped by the conftest.
"""

import pytest
import torch
from tests.monitors.test_maths import low_rank_views

from distprobe.monitors import LiDAR, RankMe
from distprobe.monitors.functional import occurrence_index

pytestmark = pytest.mark.gpu


def test_updates_run_with_no_host_sync_and_equal_the_cpu_values():
    views = low_rank_views(n=64, q=3, d=32)
    rows = views.transpose(0, 1).reshape(-1, 32)
    view_ids = torch.arange(3).repeat_interleave(64)
    cpu = [RankMe(32), LiDAR(32), LiDAR(32)]
    gpu = [m.to("cuda") for m in (RankMe(32), LiDAR(32), LiDAR(32))]
    for metrics, device in ((cpu, "cpu"), (gpu, "cuda")):
        v, r, ids = views.to(device), rows.to(device), view_ids.to(device)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                metrics[0].update(v)
                metrics[1].update(v)
                metrics[2].update(r, occurrence_index(ids))
        finally:
            torch.cuda.set_sync_debug_mode(0)
    for a, b in zip(cpu, gpu, strict=True):
        torch.testing.assert_close(b.compute().cpu(), a.compute(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gpu[1].compute(), gpu[2].compute(), atol=1e-9, rtol=1e-9)


def test_embedding_monitor_step_runs_with_no_host_sync():
    from distprobe.callbacks.monitors import EmbeddingMonitor

    monitor = EmbeddingMonitor(None, "m", input="rows", metrics=("rankme", "lidar"), view_key="view_ids")
    monitor.monitor.place(None, torch.device("cuda"))  # what setup takes from the strategy
    rows = low_rank_views(n=16, q=2, d=8).transpose(0, 1).reshape(-1, 8).cuda()
    # What the coordinator hands the monitor's engine each step, through its ProbeSet: (features, sample ids, views).
    read = (rows, None, torch.arange(2, device="cuda").repeat_interleave(16))
    assert monitor.first_batch_problem(read) is None
    monitor.monitor.train_step(*read)  # first batch: builds the metrics
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            monitor.monitor.train_step(*read)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert monitor.metrics["train"]["lidar"].num_samples.item() == 64
