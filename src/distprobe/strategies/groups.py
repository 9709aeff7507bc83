"""Which process group a probe replicates over, for any Lightning strategy."""

from __future__ import annotations

import torch.distributed as dist
from lightning.pytorch.strategies import Strategy


def data_parallel_group(strategy: Strategy) -> dist.ProcessGroup | None:
    """Return the data-parallel process group that probes replicate over, or None outside torch.distributed.

    Under a device mesh with a tensor-parallel dimension, ranks of one tensor-parallel group see the same batch, so a
    probe must replicate over ``device_mesh["data_parallel"]`` only; everywhere else it is the world group.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    own = getattr(strategy, "probe_process_group", None)
    if own is not None:
        return own
    try:
        mesh = strategy.device_mesh  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):  # RuntimeError: ModelParallelStrategy before setup_environment
        mesh = None
    if mesh is not None and "data_parallel" in (mesh.mesh_dim_names or ()):
        return mesh["data_parallel"].get_group()
    return dist.group.WORLD
