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

from distprobe.callbacks.registry import check_strategy_keeps_probes_out, registry
from distprobe.engine import Probe, ProbeConfig, maths
from distprobe.engine.clean_exit import settle_gloo_workers_at_exit
from distprobe.engine.probe import build_metrics
from distprobe.engine.replicate import unshare_storage
from distprobe.strategies.groups import data_parallel_group

log = logging.getLogger(__name__)


class NotSetUpError(RuntimeError):
    """The callback was used before Lightning called its `setup` hook."""


class TrainableCallback(Callback):
    """Base of callbacks that train their own module with their own optimizer, outside the main model.

    Subclasses give the module (`configure_model`) and call `self.probe.train_step` from their hooks. The base
    handles registration in ``pl_module.callbacks_modules``, building the engine on the right device and
    data-parallel group, checkpointing by name, and releasing the replica when training ends.

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
        # Built now, not at setup: stable-pretraining's users read pl_module.callbacks_metrics[name] before fit.
        self.metrics = build_metrics(self.config)
        self._probe: Probe | None = None
        self._pending_state: dict[str, Any] | None = None
        self._drives_global_step = False
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
        modules = registry(pl_module, "callbacks_modules")
        if self.module is not None and self.name in modules and modules[self.name] is self.module:
            return
        if self.name in modules:
            raise ValueError(
                f"probe '{self.name}': argument 'name' is already used by another callback on "
                f"{type(pl_module).__name__}; give each probe a unique name."
            )
        self.module = self.configure_model(pl_module)
        modules[self.name] = self.module
        metrics = registry(pl_module, "callbacks_metrics")
        metrics[self.name] = self.metrics.as_module_dict() if isinstance(metrics, nn.Module) else self.metrics

    def _total_optimizer_steps(self, trainer: pl.Trainer) -> int | None:
        return optimizer_steps_of_fit(trainer, self.config.accumulate_grad_batches)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._attach(pl_module)
        check_strategy_keeps_probes_out(trainer, pl_module, self.name)
        settle_gloo_workers_at_exit()
        if self._probe is not None:
            self._probe.rejoin()  # a second fit, after `teardown` released the replica
            return
        assert self.module is not None
        unshare_storage(self.module)
        self._probe = Probe.build(
            self.config,
            module=self.module,
            dp_group=data_parallel_group(trainer.strategy),
            device=trainer.strategy.root_device,
            # Not `trainer.estimated_stepping_batches` here: it loads the train dataloader before Lightning restores a
            # stateful loader's position, and Lightning then silently skips that restore. See `on_train_start`.
            total_steps=None,
            metrics=self.metrics,
        )
        if self._pending_state is not None:
            self._probe.load_state_dict(self._pending_state)
            self._pending_state = None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The train dataloader is set up (and restored) by now, so the step estimate is safe to ask for.
        self.probe.set_total_steps(self._total_optimizer_steps(trainer))
        _refuse_probe_in_main_optimizer(trainer, self.probe)
        lead = next((cb for cb in trainer.callbacks if isinstance(cb, TrainableCallback)), None)  # type: ignore[attr-defined]
        self._drives_global_step = lead is self and _without_main_optimizer(trainer)

    def _count_probe_step(self, trainer: pl.Trainer) -> None:
        """Advance ``trainer.global_step`` for a probe optimizer step when the LightningModule has no optimizer.

        A frozen backbone (linear evaluation; stable-pretraining's ``Module(optim=None)``) under manual optimization
        steps no Lightning optimizer, so ``global_step`` stays 0: ``max_steps`` never ends the fit, and step-keyed
        logs, checkpoints and schedules all see step 0. As stable-pretraining does, the first probe's optimizer
        steps then count as the training's steps.
        """
        if self._drives_global_step:
            progress = trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
            progress.increment_ready()
            progress.increment_completed()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # The replica's DDP reducer holds the process group: one left alive at interpreter exit can abort a run that
        # succeeded (SIGABRT, "terminate called without an active exception"), and Slurm then marks it FAILED.
        if self._probe is not None:
            self._probe.release()

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


def optimizer_steps_of_fit(trainer: pl.Trainer, accumulate_grad_batches: int) -> int | None:
    """A probe's optimizer steps over the fit, from Lightning's estimate (None when there is none).

    Ask only once the train dataloader is set up (``on_train_start`` or later): the estimate loads the loader, and
    asked earlier it makes Lightning skip restoring a stateful loader's position.
    """
    try:
        main_steps = trainer.estimated_stepping_batches
    except Exception:  # noqa: BLE001 - no estimate (e.g. outside fit): scheduler defaults use their own
        return None
    if not math.isfinite(main_steps):
        return None
    micro_batches = int(main_steps) * trainer.accumulate_grad_batches
    return maths.optimizer_steps(micro_batches, accumulate_grad_batches)


def _without_main_optimizer(trainer: pl.Trainer) -> bool:
    """Manual optimization and no real optimizer: nothing but the probes would ever advance ``global_step``.

    Under automatic optimization Lightning steps its stand-in optimizer and counts the steps itself.
    """
    from lightning.pytorch.core.optimizer import _MockOptimizer

    if trainer.lightning_module.automatic_optimization:
        return False
    return all(isinstance(o, _MockOptimizer) for o in trainer.optimizers)


def _refuse_probe_in_main_optimizer(trainer: pl.Trainer, probe: Probe) -> None:
    """A probe parameter in a main optimizer would have its window's gradients wiped by the main ``zero_grad``."""
    mine = {id(p) for p in probe.module.parameters()}
    for optimizer in trainer.optimizers:
        if any(id(p) in mine for group in optimizer.param_groups for p in group["params"]):
            raise ValueError(
                f"probe '{probe.name}': its parameters are in the LightningModule's optimizer "
                f"({type(optimizer).__name__}), which would zero and step them with the backbone. Build that "
                "optimizer without pl_module.callbacks_modules (stable-pretraining's Module skips it by name), or "
                "use a distprobe strategy (e.g. strategy='distprobe_ddp'), which removes probes from it."
            )
