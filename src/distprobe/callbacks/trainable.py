"""`TrainableCallback`: a Lightning callback that owns a module trained by its own probe engine."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import nn
from typing_extensions import override

from distprobe.callbacks.base import ProbeCallback, Stage, config_from_arguments
from distprobe.callbacks.own_data import OwnData
from distprobe.callbacks.registry import check_strategy_keeps_probes_out, claim, registry
from distprobe.engine import Probe, ProbeConfig, bad_data, maths
from distprobe.engine.checks import first_batch_problem
from distprobe.engine.probe import build_metrics
from distprobe.engine.replicate import unshare_storage
from distprobe.probeset.members import name_inputs
from distprobe.strategies.groups import data_parallel_group

log = logging.getLogger(__name__)


class NotSetUpError(RuntimeError):
    """The callback was used before Lightning called its `setup` hook."""


class TrainableCallback(ProbeCallback):
    """Base of callbacks that train their own module with their own optimizer, outside the main model.

    Subclasses give the module (`configure_model`). The base handles registration in ``pl_module.callbacks_modules``,
    building the engine on the right device and data-parallel group, training it in the Trainer's probe group on the
    ``sources`` it reads (a subclass without sources calls ``self.probe.train_step`` from its own hooks),
    checkpointing by name, and releasing the replica when training ends.

    ``__init__`` reads nothing a subclass sets: a subclass whose `configure_model` needs its own fields passes
    ``module=None`` here, sets them, then calls ``self._attach(module)``, as `OnlineProbe` does.

    Args:
        module: The LightningModule being probed (None: taken at ``setup``).
        name: Unique name of this callback's module; keys its logs and checkpoint state.
        optimizer: See `OnlineProbe`.
        scheduler: See `OnlineProbe`.
        accumulate_grad_batches: Micro-batches per optimizer step of this module.
        gradient_clip_val: Clip threshold of this module's gradients; None disables clipping.
        gradient_clip_algorithm: ``"norm"`` or ``"value"``.
        loss_fn: Loss taking ``(preds, targets)``; None: cross-entropy.
        metrics: See `OnlineProbe`.
        sources: The input names the probe reads (none: the subclass feeds the probe itself).
        target: Key of the targets.
        own_data: The probe's own labeled data, or None.
    """

    ticks_global_step = True

    def __init__(
        self,
        module: pl.LightningModule | None,
        name: str,
        optimizer: Any = None,
        scheduler: Any = None,
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: Literal["norm", "value"] = "norm",
        *,
        loss_fn: Any = None,
        metrics: Any = None,
        sources: Sequence[str] = (),
        target: str | None = None,
        own_data: OwnData | None = None,
    ) -> None:
        super().__init__(name, sources, target, own_data)
        self.config = config_from_arguments(ProbeConfig, locals(), probe=None)  # the module comes at setup
        self.module: nn.Module | None = None
        # Built now, not at setup: stable-pretraining's users read pl_module.callbacks_metrics[name] before fit.
        self.metrics = build_metrics(self.config)
        if module is not None:
            self._attach(module)

    def configure_model(self, pl_module: pl.LightningModule | None) -> nn.Module:
        """Return the module this callback trains."""
        raise NotImplementedError(f"{type(self).__name__} must implement configure_model")

    @property
    def probe(self) -> Probe:
        """The engine training this callback's module (available from ``setup`` on)."""
        if self._engine is None:
            raise NotSetUpError(f"probe '{self.name}': used before Trainer called setup(); run it inside trainer.fit.")
        return self._engine

    def _attach(self, pl_module: pl.LightningModule) -> None:
        modules = registry(pl_module, "callbacks_modules")
        if self.module is not None and self.name in modules and modules[self.name] is self.module:
            return
        modules = claim(pl_module, self.name)
        self.module = self.configure_model(pl_module)
        modules[self.name] = self.module
        metrics = registry(pl_module, "callbacks_metrics")
        metrics[self.name] = self.metrics.as_module_dict() if isinstance(metrics, nn.Module) else self.metrics

    @override
    def set_up(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._attach(pl_module)
        check_strategy_keeps_probes_out(trainer, pl_module, self.name)
        if self._engine is not None:
            self._engine.rejoin()  # a second fit, after `teardown` released the replica
            return
        assert self.module is not None
        unshare_storage(self.module)
        probe = Probe.build(
            self.config,
            module=self.module,
            dp_group=data_parallel_group(trainer.strategy),
            device=trainer.strategy.root_device,
            # Not `trainer.estimated_stepping_batches` here: it loads the train dataloader before Lightning restores a
            # stateful loader's position, and Lightning then silently skips that restore. See `on_train_start`.
            total_steps=None,
            metrics=self.metrics,
        )
        if self.sources:
            name_inputs(probe, self.sources[0], self.target)
        self.engine_ready(probe)

    @override
    def add_to(self, probe_set: Any) -> None:
        probe_set.add_probe(self.probe)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # The train dataloader is set up (and restored) by now, so the step estimate is safe to ask for.
        self.probe.set_total_steps(
            optimizer_steps_of_fit(trainer, self.config.accumulate_grad_batches, self.batches_per_step)
        )
        _refuse_probe_in_main_optimizer(trainer, self.probe)

    @override
    def read_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any) -> Any:
        if not self.sources:
            return None  # a subclass that feeds its probe itself
        return super().read_step(trainer, pl_module, outputs, batch)  # a later missing key: the coordinator's

    @override
    def evaluates(self, trainer: pl.Trainer) -> bool:
        # A subclass without sources feeds its probe itself, in validation too: there is nothing to read for it.
        return bool(self.sources) and super().evaluates(trainer)

    @override
    def first_batch_problem(self, read: Any) -> str | None:
        features, targets = read
        problem = first_batch_problem(self.probe, features, targets, input_key=self.sources[0])
        return problem if problem is not None else self._loss_problem(features, targets)

    def _loss_problem(self, features: torch.Tensor, targets: torch.Tensor) -> str | None:
        """What fails when the loss takes the probe's outputs and the first batch's targets (no gradient), or None.

        A loss that refuses them (``BCEWithLogitsLoss`` and integer multi-hot targets) would otherwise fail in the
        first training step with torch's message, which names neither the probe nor the loss. The whole batch, not
        a slice (a loss may need its size); a loss module with buffers is not called (the call could change them).
        """
        loss_fn = self.probe.loss_fn
        if isinstance(loss_fn, nn.Module) and any(True for _ in loss_fn.buffers()):
            return None
        preds = self.probe.predict(features)  # the engine's check ran it on two samples already
        # The targets as the training step passes them to the loss (int32 class indices as int64, for one).
        safe_targets = bad_data.check_targets(targets.to(preds.device), preds, bad_data.ignore_index_of(loss_fn))[0]
        try:
            with torch.no_grad():
                loss_fn(preds, safe_targets)
        except Exception as err:  # noqa: BLE001 - whatever the loss raises must reach every rank, not hang them
            loss = type(loss_fn).__name__
            return (
                f"probe '{self.name}': its loss ({loss}) fails on the probe's outputs of shape {tuple(preds.shape)} "
                f"and the targets of shape {tuple(targets.shape)} and dtype {targets.dtype} ({type(err).__name__}: "
                f"{err}); give it targets of the shape and dtype it takes (e.g. .float() multi-hot targets for "
                "BCEWithLogitsLoss), or a loss for these targets."
            )
        return None

    @override
    def reset_epoch(self, stage: Stage) -> None:
        if stage == "train":
            self.probe.reset_train_metrics()
        else:
            self.probe.metrics.val.reset()

    @override
    def release_engine(self) -> None:
        # The replica's DDP reducer holds the process group: one left alive at interpreter exit can abort a run that
        # succeeded (SIGABRT, "terminate called without an active exception"), and Slurm then marks it FAILED.
        if self._engine is not None:
            self._engine.release()


def optimizer_steps_of_fit(trainer: pl.Trainer, accumulate_grad_batches: int, every_n_steps: int = 1) -> int | None:
    """A probe's optimizer steps over the fit, from Lightning's estimate (None when there is none).

    ``every_n_steps``: a probe on its own data trains once every that many main training batches, so its schedule
    is that many times shorter (a cosine over the main batches would end a fraction of the way down).

    Ask only once the train dataloader is set up (``on_train_start`` or later): the estimate loads the loader, and
    asked earlier it makes Lightning skip restoring a stateful loader's position.
    """
    try:
        main_steps = trainer.estimated_stepping_batches
    except Exception:  # noqa: BLE001 - no estimate (e.g. outside fit): scheduler defaults use their own
        return None
    if not math.isfinite(main_steps):
        return None
    micro_batches = int(main_steps) * trainer.accumulate_grad_batches // every_n_steps
    return maths.optimizer_steps(micro_batches, accumulate_grad_batches)


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
