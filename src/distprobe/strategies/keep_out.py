"""What the distprobe strategies add over Lightning's, hook by hook, as mixins placed before the stock class.

Each mixin overrides one hook and calls the stock one through ``super()``, so a strategy lists what it needs:
``class ProbeDDPStrategy(WorldProbeGroup, ProbesOutOfPrecision, ProbesOutOfOptimizers, DDPStrategy)``.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch.distributed as dist
from lightning.pytorch.strategies import Strategy
from torch import nn
from torch.optim import Optimizer
from typing_extensions import override

from distprobe.engine.collectives import default_group
from distprobe.strategies.exclusion import (
    drop_from_optimizers,
    hidden_probes,
    probe_gradients_set_aside,
    probe_parameters,
    probes_kept_out_of_precision,
    probes_out_of_loading,
)


class WorldProbeGroup(Strategy):
    """Probes replicate over the world group: every rank is a data-parallel rank (DDP, FSDP, DeepSpeed)."""

    @property
    def probe_process_group(self) -> dist.ProcessGroup | None:
        """The group probes replicate over: the world group."""
        return default_group()


class ProbesOutOfPrecision(Strategy):
    """The precision plugin's casts during ``setup`` leave the probes' dtype alone."""

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        assert self.lightning_module is not None
        with probes_kept_out_of_precision(self.precision_plugin, self.lightning_module):
            super().setup(trainer)


class ProbesOutOfOptimizers(Strategy):
    """Probe parameters that ``configure_optimizers`` named are removed from the main optimizers."""

    @override
    def setup_optimizers(self, trainer: pl.Trainer) -> None:
        super().setup_optimizers(trainer)
        assert self.lightning_module is not None
        drop_from_optimizers(self.optimizers, probe_parameters(self.lightning_module))


class ProbesHiddenWhileSharding(Strategy):
    """``configure_model`` (run in ``model_sharded_context``) never sees the probes, so it cannot shard them."""

    @contextmanager
    @override
    def model_sharded_context(self) -> Generator[None, None, None]:
        assert self.lightning_module is not None
        with hidden_probes(self.lightning_module), super().model_sharded_context():
            yield


class ProbesOutOfCheckpointLoading(Strategy):
    """Loading the model's checkpoint leaves the probes alone: their callbacks restore them by name.

    DDP loads the model state in ``load_model_state_dict``; FSDP, ModelParallel and DeepSpeed in ``load_checkpoint``.
    """

    @override
    def load_checkpoint(self, checkpoint_path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        # Passed through as given: Lightning 2.6.6 takes ``weights_only``, the floor release 2.4.0 (README.md,
        # "Supported versions") does not.
        if self.lightning_module is None:
            return super().load_checkpoint(checkpoint_path, *args, **kwargs)
        with probes_out_of_loading(self.lightning_module):
            return super().load_checkpoint(checkpoint_path, *args, **kwargs)

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        assert self.lightning_module is not None
        with probes_out_of_loading(self.lightning_module):
            super().load_model_state_dict(checkpoint, strict=strict)


class ProbeGradientsOutOfMainStep(Strategy):
    """The main training step and optimizer step (forward, backward, gradient clipping) see no probe gradient.

    A probe registered in the LightningModule (an ``nn.ModuleDict``) keeps its open accumulation window in its
    parameters' ``.grad``. Norm clipping over the whole module (FSDP1's ``model.clip_grad_norm_``, or
    ``clip_grad_norm_(self.parameters())`` in ``configure_gradient_clipping`` or in a manual-optimization
    ``training_step``), or a gradient-norm log, would count those gradients in the backbone's norm and scale them: the
    backbone would train differently than without probes, and the probe's window would be changed. They are set aside
    during both steps and put back, the same tensors, after them.
    """

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        if self.lightning_module is None:
            return super().training_step(*args, **kwargs)
        with probe_gradients_set_aside(self.lightning_module):
            return super().training_step(*args, **kwargs)

    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: pl.LightningModule | nn.Module | None = None,
        **kwargs: Any,
    ) -> Any:
        if self.lightning_module is None:
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        with probe_gradients_set_aside(self.lightning_module):
            return super().optimizer_step(optimizer, closure, model, **kwargs)
