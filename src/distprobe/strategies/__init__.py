"""Lightning strategy plug-ins that keep probes out of the main model's wrapper, sharding and optimizer."""

from distprobe.strategies.groups import data_parallel_group

__all__ = ["data_parallel_group"]
