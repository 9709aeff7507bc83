"""Label-free monitors of an embedding (RankMe, LiDAR): torchmetrics Metrics with summed float64 states.

In a plain-torch (torchrun) loop, update the metrics on each rank's batches and compute them all with one flat
all-reduce::

    from distprobe.metrics.flat_sync import compute_metrics_synced
    from distprobe.monitors import LiDAR, RankMe

    rankme, lidar = RankMe(dim).to(device), LiDAR(dim).to(device)
    for batch in loader:
        views = model(batch["views"])  # (samples, views, dim): every view of a sample in this rank's batch
        rankme.update(views)
        lidar.update(views)
    values = compute_metrics_synced([rankme, lidar], group)  # one all-reduce, the same values on every rank
    rankme.reset(); lidar.reset()

Or give `distprobe.loop.ProbeSet.build` their `MonitorConfig`s (``monitors=``): the set checks, updates, windows and
computes them with its other members. See docs/monitors.md.
"""

from distprobe.monitors.functional import effective_rank, lidar_from_sums, per_sample_statistics, rankme_from_sums
from distprobe.monitors.member import EmbeddingMonitorEngine, MonitorConfig, compute_monitors
from distprobe.monitors.metrics import MONITORS, LiDAR, RankMe, build_monitor

__all__ = [
    "MONITORS",
    "EmbeddingMonitorEngine",
    "LiDAR",
    "MonitorConfig",
    "RankMe",
    "build_monitor",
    "compute_monitors",
    "effective_rank",
    "lidar_from_sums",
    "per_sample_statistics",
    "rankme_from_sums",
]
