"""`ProbeModelParallelStrategy`: Lightning's ModelParallelStrategy (FSDP2 / tensor parallel) with probes left out."""

from __future__ import annotations

import lightning.pytorch as pl
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from typing_extensions import override

from distprobe.strategies.exclusion import hidden_probes
from distprobe.strategies.keep_out import (
    ProbeGradientsOutOfMainStep,
    ProbesHiddenWhileSharding,
    ProbesOutOfCheckpointLoading,
    ProbesOutOfOptimizers,
)


class ProbeModelParallelStrategy(
    ProbeGradientsOutOfMainStep,
    ProbesOutOfCheckpointLoading,
    ProbesHiddenWhileSharding,
    ProbesOutOfOptimizers,
    ModelParallelStrategy,
):
    """`ModelParallelStrategy` whose ``configure_model`` never sees the probes; probes replicate over the DP group.

    Registered as ``"distprobe_fsdp2"`` (``tensor_parallel_size=1``: every rank data-parallel, as ``fully_shard``
    without a mesh assumes) and ``"distprobe_model_parallel"`` (Lightning's defaults: one data-parallel rank per node,
    tensor parallel within a node). Over the stock strategy it adds:

    - with ``tensor_parallel_size`` given and ``data_parallel_size="auto"``, the data-parallel size is the rest of the
      world (the stock strategy takes the number of nodes, so its 1-node default shards data over nothing);

    - ``pl_module.callbacks_modules`` is unregistered while ``configure_model`` runs, so a ``fully_shard(self)`` there
      leaves the probes out, as ``fully_shard(..., ignored_params=...)`` would, without the user naming them; it stays
      hidden while the strategy casts the model and builds the optimizers, so probes keep their dtype and never enter
      the main optimizer (they are removed from it as well, should ``configure_optimizers`` name them);
    - ``probe_process_group``: ``device_mesh["data_parallel"]``'s group. Ranks of one tensor-parallel group see the
      same batch: gradients are averaged over the data-parallel group only, and the probes' initial weights are
      broadcast once from global rank 0 so that every tensor-parallel rank holds the same replica.

    Example:
        >>> import distprobe.strategies  # registers the names
        >>> trainer = pl.Trainer(strategy="distprobe_fsdp2", accelerator="cpu", devices=2)  # doctest: +SKIP
    """

    @property
    def probe_process_group(self) -> dist.ProcessGroup | None:
        """The group probes replicate over: the device mesh's data-parallel dimension (None before set-up)."""
        mesh = self._device_mesh
        if mesh is None:
            return None
        return mesh["data_parallel"].get_group()

    @override
    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto" and isinstance(self._tensor_parallel_size, int):
            # Lightning's "auto" means one data-parallel rank per node; with the tensor-parallel size given, the
            # data-parallel size is whatever makes up the world (all of it for plain FSDP2).
            self._data_parallel_size = max(1, self.num_nodes * self.num_processes // self._tensor_parallel_size)
        super().setup_environment()

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        assert self.lightning_module is not None
        # Probes replicate in their own engine (which also aligns tensor-parallel ranks), never in the sharded model.
        with hidden_probes(self.lightning_module):
            super().setup(trainer)
