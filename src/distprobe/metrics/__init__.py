"""Probe metrics: per-stage collections, sync-free updates and exact distributed evaluation."""

from distprobe.metrics.collection import ProbeMetrics, split_by_stage
from distprobe.metrics.exact import real_samples_on_rank, valid_in_batch, valid_in_loader_batch
from distprobe.metrics.flat_sync import can_flat_sync, compute_synced, flat_sync
from distprobe.metrics.sync_free import SYNC_FREE_EQUIVALENTS, to_sync_free

__all__ = [
    "SYNC_FREE_EQUIVALENTS",
    "ProbeMetrics",
    "can_flat_sync",
    "compute_synced",
    "flat_sync",
    "real_samples_on_rank",
    "split_by_stage",
    "to_sync_free",
    "valid_in_batch",
    "valid_in_loader_batch",
]
