"""`ProbeDeepSpeedStrategy`: Lightning's DeepSpeed with probes outside the engine and its optimizer; runs on CPU."""

from __future__ import annotations

from collections.abc import Callable, Generator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from torch import nn
from torch.optim import Optimizer
from typing_extensions import override

from distprobe.strategies.exclusion import drop_from_optimizers, hidden_probes, probe_parameters, unregister_probes
from distprobe.strategies.keep_out import (
    ProbeGradientsOutOfMainStep,
    ProbesHiddenWhileSharding,
    ProbesOutOfCheckpointLoading,
    ProbesOutOfPrecision,
    WorldProbeGroup,
)


class ProbeDeepSpeedStrategy(
    WorldProbeGroup,
    ProbeGradientsOutOfMainStep,
    ProbesOutOfCheckpointLoading,
    ProbesOutOfPrecision,
    ProbesHiddenWhileSharding,
    DeepSpeedStrategy,
):
    """`DeepSpeedStrategy` that keeps probes out of the DeepSpeed engine and optimizer, on GPU or on CPU with gloo.

    Registered as ``"distprobe_deepspeed"`` (ZeRO stage 2, like Lightning's ``"deepspeed"``) and
    ``"distprobe_deepspeed_stage_1"``, ``"_stage_2"``, ``"_stage_3"``. Over the stock strategy it adds:

    - ``pl_module.callbacks_modules`` is unregistered while DeepSpeed builds its engine (and during a ZeRO-3
      ``configure_model``), so the probes are never cast, broadcast, partitioned or hooked by DeepSpeed; their
      parameters are removed from the optimizer ``configure_optimizers`` returns before DeepSpeed wraps it (DeepSpeed
      takes a single optimizer: the probes' own optimizers live in their callbacks); under ZeRO-3, which walks every
      parameter of the module on every step, the container stays unregistered until ``teardown``;
    - a ``*-true`` precision casts the LightningModule in ``setup``, before the engine is built: the probes are
      hidden from that cast as well and keep their own dtype;
    - it accepts a CPU accelerator (the stock strategy refuses anything but CUDA); DeepSpeed then runs its CPU
      accelerator over gloo, which makes ZeRO 1-3 testable on a laptop;
    - ``probe_process_group``: the world group.

    Example:
        >>> import distprobe.strategies  # registers the names
        >>> trainer = pl.Trainer(strategy="distprobe_deepspeed_stage_3", accelerator="cpu", devices=2)  # doctest: +SKIP
    """

    _reregister_probes: Callable[[], None] | None = None

    @override
    def setup_environment(self) -> None:
        if isinstance(self.accelerator, CUDAAccelerator):
            super().setup_environment()
        else:
            # Skip only DeepSpeedStrategy's CUDA check; the rest (devices, process group) is DDPStrategy's.
            DDPStrategy.setup_environment(self)

    @override
    def setup_distributed(self) -> None:
        if isinstance(self.accelerator, CUDAAccelerator):
            super().setup_distributed()
            return
        # The stock method first checks that CUDA device indices match local ranks; CPU devices have no index.
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @override
    def _setup_model_and_optimizer(
        self, model: nn.Module, optimizer: Optimizer | None, lr_scheduler: Any = None
    ) -> tuple[Any, Optimizer]:
        if optimizer is not None:
            drop_from_optimizers([optimizer], probe_parameters(model))
        if self.zero_stage_3 and self._reregister_probes is None:
            # ZeRO-3 walks every parameter of the module on every step (gathering and releasing partitions), so the
            # probes stay unregistered until teardown rather than only while the engine is built.
            self._reregister_probes = unregister_probes(model)
        with hidden_probes(model), self._deepspeed_device_rank():
            return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)

    @override
    def teardown(self) -> None:
        super().teardown()
        if self._reregister_probes is not None:
            self._reregister_probes()
            self._reregister_probes = None

    @override
    def _initialize_deepspeed_inference(self, model: nn.Module) -> None:
        with hidden_probes(model), self._deepspeed_device_rank():
            super()._initialize_deepspeed_inference(model)

    @contextmanager
    def _deepspeed_device_rank(self) -> Generator[None, None, None]:
        """Let the root device carry the local rank as its index while DeepSpeed builds an engine.

        The stock strategy passes ``root_device.index`` to DeepSpeed as its device rank; a CPU device has no index,
        and DeepSpeed then assumes a world of one. DeepSpeed's CPU accelerator uses the rank for nothing else.
        """
        devices = self.parallel_devices
        if devices is None or self.root_device.type != "cpu":
            yield
            return
        saved = devices[self.local_rank]
        devices[self.local_rank] = torch.device("cpu", self.local_rank)
        try:
            yield
        finally:
            devices[self.local_rank] = saved
