"""`ProbeDDPStrategy`: Lightning's DDP, with probes left out of the DDP wrapper and the main optimizer."""

from __future__ import annotations

from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from distprobe.strategies.exclusion import probe_state_names
from distprobe.strategies.keep_out import (
    ProbeGradientsOutOfMainStep,
    ProbesOutOfCheckpointLoading,
    ProbesOutOfOptimizers,
    ProbesOutOfPrecision,
    WorldProbeGroup,
)


def ignore_probes_in_ddp(module: nn.Module) -> list[str]:
    """Put the probes' parameters and buffers on ``module``'s DDP ignore list; return the names added.

    DDP would otherwise all-reduce gradients the probe never produces in the main backward (an error with
    ``find_unused_parameters=True``) and broadcast the probe's buffers from rank 0 on every forward.
    """
    names = probe_state_names(module)
    if names:
        already = list(getattr(module, "_ddp_params_and_buffers_to_ignore", []))
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, already + names)
    return names


class ProbeDDPStrategy(
    WorldProbeGroup,
    ProbeGradientsOutOfMainStep,
    ProbesOutOfCheckpointLoading,
    ProbesOutOfPrecision,
    ProbesOutOfOptimizers,
    DDPStrategy,
):
    """`DDPStrategy` that keeps parameters under ``pl_module.callbacks_modules`` out of DDP and the main optimizer.

    Registered as ``"distprobe_ddp"`` (and ``"distprobe_ddp_spawn"``). Every rank is a data-parallel rank, so
    ``probe_process_group`` is the world group.

    Example:
        >>> import distprobe.strategies  # registers the names
        >>> trainer = pl.Trainer(strategy="distprobe_ddp", accelerator="cpu", devices=2)  # doctest: +SKIP
    """

    @override
    def _setup_model(self, model: nn.Module) -> DistributedDataParallel:
        ignore_probes_in_ddp(model)
        return super()._setup_model(model)
