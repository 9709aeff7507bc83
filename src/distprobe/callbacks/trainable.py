"""`TrainableCallback`: a Lightning callback that owns a module trained by its own probe engine."""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from typing_extensions import override

from distprobe.engine import Probe, ProbeConfig, maths
from distprobe.engine.replicate import unshare_storage
from distprobe.strategies.groups import data_parallel_group

log = logging.getLogger(__name__)


class NotSetUpError(RuntimeError):
    """The callback was used before Lightning called its `setup` hook."""


def _registry(pl_module: pl.LightningModule, attr: str) -> dict[str, Any]:
    """The plain dict ``pl_module.<attr>``, created when missing.

    A plain dict, not an ``nn.ModuleDict``: the probe must never become a parameter of the LightningModule, or the
    main strategy would wrap, shard and optimise it.
    """
    registry = getattr(pl_module, attr, None)
    if registry is None:
        registry = {}
        # object.__setattr__ skips nn.Module's registration of submodules and parameters.
        object.__setattr__(pl_module, attr, registry)
    elif isinstance(registry, nn.Module):
        log.warning(
            "%s.%s is an nn.Module container: probes stored there become parameters of the LightningModule; "
            "use a distprobe strategy (see distprobe.strategies) to keep them out of the main optimizer.",
            type(pl_module).__name__,
            attr,
        )
    return registry


class TrainableCallback(Callback):
    """Base of callbacks that train their own module with their own optimizer, outside the main model.

    Subclasses give the module (`configure_model`) and call `self.probe.train_step` from their hooks. The base
    handles registration in ``pl_module.callbacks_modules``, building the engine on the right device and
    data-parallel group, and checkpointing by name.

    Args:
        module: The LightningModule being probed (None: taken at ``setup``).
        name: Unique name of this callback's module; keys its logs and checkpoint state.
        optimizer: See `OnlineProbe`.
        scheduler: See `OnlineProbe`.
        accumulate_grad_batches: Micro-batches per optimizer step of this module.
        gradient_clip_val: Clip threshold of this module's gradients; None disables clipping.
        gradient_clip_algorithm: ``"norm"`` or ``"value"``.
    """

    def __init__(
        self,
        module: pl.LightningModule | None,
        name: str,
        optimizer: Any = None,
        scheduler: Any = None,
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: Literal["norm", "value"] = "norm",
    ) -> None:
        super().__init__()
        self.name = name
        self.config = ProbeConfig(
            name=name,
            probe=None,
            loss_fn=getattr(self, "loss_fn", None),
            optimizer=optimizer,
            scheduler=scheduler,
            accumulate_grad_batches=accumulate_grad_batches,
            gradient_clip_val=gradient_clip_val,
            gradient_clip_algorithm=gradient_clip_algorithm,
            metrics=getattr(self, "metrics_spec", None),
        )
        self.module: nn.Module | None = None
        self._probe: Probe | None = None
        self._pending_state: dict[str, Any] | None = None
        if module is not None:
            self._attach(module)

    def configure_model(self, pl_module: pl.LightningModule | None) -> nn.Module:
        """Return the module this callback trains."""
        raise NotImplementedError(f"{type(self).__name__} must implement configure_model")

    @property
    def probe(self) -> Probe:
        """The engine training this callback's module (available from ``setup`` on)."""
        if self._probe is None:
            raise NotSetUpError(f"probe '{self.name}': used before Trainer called setup(); run it inside trainer.fit.")
        return self._probe

    @property
    @override
    def state_key(self) -> str:
        # Keyed by name, never by position: adding, removing or reordering probes keeps each one's state.
        return self._generate_state_key(name=self.name)

    def _attach(self, pl_module: pl.LightningModule) -> None:
        modules = _registry(pl_module, "callbacks_modules")
        if self.module is not None and modules.get(self.name) is self.module:
            return
        if self.name in modules:
            raise ValueError(
                f"probe '{self.name}': argument 'name' is already used by another callback on "
                f"{type(pl_module).__name__}; give each probe a unique name."
            )
        self.module = self.configure_model(pl_module)
        modules[self.name] = self.module

    def _total_optimizer_steps(self, trainer: pl.Trainer) -> int | None:
        try:
            main_steps = trainer.estimated_stepping_batches
        except Exception:  # noqa: BLE001 - no estimate (e.g. outside fit): scheduler defaults use their own
            return None
        if not math.isfinite(main_steps):
            return None
        micro_batches = int(main_steps) * trainer.accumulate_grad_batches
        return maths.optimizer_steps(micro_batches, self.config.accumulate_grad_batches)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._attach(pl_module)
        if self._probe is not None:
            return
        assert self.module is not None
        unshare_storage(self.module)
        metrics = _registry(pl_module, "callbacks_metrics")
        self._probe = Probe.build(
            self.config,
            module=self.module,
            dp_group=data_parallel_group(trainer.strategy),
            device=trainer.strategy.root_device,
            # Not `trainer.estimated_stepping_batches` here: it loads the train dataloader before Lightning restores a
            # stateful loader's position, and Lightning then silently skips that restore. See `on_train_start`.
            total_steps=None,
        )
        metrics[self.name] = self._probe.metrics
        if self._pending_state is not None:
            self._probe.load_state_dict(self._pending_state)
            self._pending_state = None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The train dataloader is set up (and restored) by now, so the step estimate is safe to ask for.
        self.probe.set_total_steps(self._total_optimizer_steps(trainer))

    @override
    def state_dict(self) -> dict[str, Any]:
        if self._probe is not None:
            return self._probe.state_dict()
        return dict(self._pending_state or {})

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied here, not in on_fit_start: under FSDP and DeepSpeed Lightning restores callbacks after it.
        if self._probe is not None:
            self._probe.load_state_dict(state_dict)
        else:
            self._pending_state = state_dict

    def _device(self) -> torch.device:
        return next(self.probe.module.parameters()).device
