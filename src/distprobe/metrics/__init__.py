"""Probe metrics: per-stage collections, sync-free updates and exact distributed evaluation."""

from distprobe.metrics.collection import ProbeMetrics, split_by_stage

__all__ = ["ProbeMetrics", "split_by_stage"]
