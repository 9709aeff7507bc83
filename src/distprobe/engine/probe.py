"""One probe: its module and replica, optimizer, scheduler, accumulation, clipping and metrics.

The train step never synchronises with the host: it returns tensors, skips non-finite updates with a device-side
mask, and leaves every decision that could differ between ranks to the gradient all-reduce itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from distprobe.engine import maths
from distprobe.engine.config import ProbeConfig
from distprobe.engine.factories import build_module, build_optimizer, build_scheduler
from distprobe.engine.replicate import replicate_probe
from distprobe.metrics.collection import ProbeMetrics
from distprobe.metrics.flat_sync import compute_synced

#: Bumped when the layout of `Probe.state_dict` changes; loaders read older layouts with `.get` defaults.
STATE_FORMAT = 1


@dataclass
class StepOutput:
    """What one train step returns; every field is a device tensor or a host-side fact known without a sync."""

    loss: torch.Tensor
    """The micro-batch loss, detached (log it as a tensor)."""
    preds: torch.Tensor
    """The probe's outputs for the micro-batch, detached."""
    stepped: bool
    """Whether this micro-step closed an accumulation window (known on the host from the counter)."""


def to_probe_input(features: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Detach features from the backbone's graph and bring them to the probe's device and dtype.

    A DTensor (a tensor-parallel backbone's output) is gathered into a full local tensor first.
    """
    full_tensor = getattr(features, "full_tensor", None)
    if callable(full_tensor):
        features = full_tensor()
    return features.detach().to(device=param.device, dtype=param.dtype)


class Probe:
    """A trainable probe replicated over a data-parallel group.

    Build it with `Probe.build`; call `train_step` for every training micro-batch and `eval_step` for every
    validation batch. Under torch.distributed every rank of the group must call `train_step` the same number of
    times (the all-reduce on each accumulation boundary is a collective).

    Example:
        >>> probe = Probe.build(ProbeConfig(name="linear", probe=nn.Linear(8, 3), optimizer="SGD"))
        >>> out = probe.train_step(torch.randn(4, 8), torch.tensor([0, 1, 2, 0]))
        >>> out.stepped
        True
    """

    def __init__(
        self,
        *,
        config: ProbeConfig,
        module: nn.Module,
        replica: nn.Module,
        optimizer: Optimizer,
        scheduler: LRScheduler,
        loss_fn: Callable[..., Any],
        metrics: ProbeMetrics,
        dp_group: dist.ProcessGroup | None,
    ) -> None:
        self.config = config
        self.module = module
        self.replica = replica
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.loss_fn = loss_fn
        self.metrics = metrics
        self.dp_group = dp_group
        self._scheduler_restored = False
        self.micro_step = 0
        """Micro-batches seen since the start of training; the window position is ``micro_step % accumulate``."""
        self.skipped_steps = torch.zeros((), dtype=torch.long, device=self._param().device)
        """Optimizer steps skipped because a gradient was not finite (a device tensor, never read on the host)."""

    @classmethod
    def build(
        cls,
        config: ProbeConfig,
        *,
        module: nn.Module | None = None,
        dp_group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
        total_steps: int | None = None,
        owner: Any = None,
    ) -> Probe:
        """Resolve the config into a ready probe.

        Args:
            config: The probe's specification.
            module: An already resolved probe module (else ``config.probe`` is resolved here).
            dp_group: The data-parallel group to replicate over; None trains a single replica.
            device: Where the probe lives; default: where its parameters already are.
            total_steps: The probe's number of optimizer steps, for scheduler defaults such as ``T_max``.
            owner: Passed to a ``probe`` callable that takes one argument (the LightningModule).
        """
        if module is None:
            module = build_module(config.probe, owner=owner, probe_name=config.name)
        if device is not None:
            module.to(device)
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"probe '{config.name}': argument 'probe' has no trainable parameters.")
        optimizer = build_optimizer(config.optimizer, params, probe_name=config.name)
        scheduler = build_scheduler(config.scheduler, optimizer, total_steps=total_steps, probe_name=config.name)
        metrics = ProbeMetrics(config.metrics, config.name).to(params[0].device)
        metrics.set_process_group(dp_group)
        replica = replicate_probe(module, dp_group)
        return cls(
            config=config,
            module=module,
            replica=replica,
            optimizer=optimizer,
            scheduler=scheduler,
            loss_fn=config.make_loss_fn(),
            metrics=metrics,
            dp_group=dp_group,
        )

    @property
    def name(self) -> str:
        """The probe's unique name."""
        return self.config.name

    def _param(self) -> torch.Tensor:
        return next(self.module.parameters())

    def _params(self) -> list[nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def train_step(self, features: torch.Tensor, targets: torch.Tensor) -> StepOutput:
        """Train on one micro-batch; step the optimizer when it closes an accumulation window."""
        accumulate = self.config.accumulate_grad_batches
        boundary = maths.is_boundary(self.micro_step, accumulate)
        param = self._param()
        device = param.device
        x = to_probe_input(features, param)
        targets = targets.to(device)
        if not self.module.training:  # `train()` walks every submodule: only when someone switched to eval
            self.module.train()
        # Micro-steps keep gradients local: the one all-reduce happens in the boundary's backward.
        no_sync = getattr(self.replica, "no_sync", None)
        sync_ctx = contextlib.nullcontext() if boundary or no_sync is None else no_sync()
        # The probe trains in its own dtype, outside the main model's autocast and loss scaling: its gradients are
        # never scaled, so clipping sees true values and no GradScaler is involved.
        in_autocast = torch.is_autocast_enabled(device.type)
        outside_autocast = torch.autocast(device.type, enabled=False) if in_autocast else contextlib.nullcontext()
        with sync_ctx, outside_autocast:
            preds = self.replica(x)
            loss = self.loss_fn(preds, targets)
            maths.scale_for_accumulation(loss, accumulate).backward()
        self.micro_step += 1
        if boundary:
            self._optimizer_step(device)
        preds = preds.detach()
        return StepOutput(loss=loss.detach(), preds=preds, stepped=boundary)

    def _optimizer_step(self, device: torch.device) -> None:
        params = self._params()
        grads = [p.grad for p in params if p.grad is not None]
        # After the all-reduce every rank holds the same gradients, so every rank reaches the same verdict with no
        # extra collective; a non-finite value on any rank poisons the reduced gradient everywhere.
        found_inf = maths.nonfinite_flag(grads).to(device)
        maths.clip_gradients(grads, self.config.gradient_clip_val, self.config.gradient_clip_algorithm)
        if self._skips_on_device(params):
            # Fused optimizers skip the update themselves where `found_inf` is 1 (GradScaler's protocol), state and
            # step counter included: no copies, one kernel.
            self.optimizer.found_inf = found_inf  # type: ignore[attr-defined]
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf  # type: ignore[attr-defined]
        else:
            # No need to clean the gradients first: whatever a non-finite step writes is put back just below.
            saved = self._snapshot()
            self.optimizer.step()
            maths.restore_where(found_inf.bool(), *self._undo_targets(saved))
        self.skipped_steps += found_inf.long()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def _skips_on_device(self, params: list[nn.Parameter]) -> bool:
        """Whether the optimizer can skip a step itself, given ``found_inf`` (fused Adam, AdamW and SGD can).

        Not on a step that creates state: fused SGD leaves a first momentum buffer uninitialised when it skips.
        """
        if not getattr(self.optimizer, "_step_supports_amp_scaling", False):
            return False
        return all(self.optimizer.state.get(p) for p in params)

    def _state_tensors(self, p: nn.Parameter) -> dict[str, torch.Tensor]:
        # Only tensors on the probe's device can be restored without a host sync; a host-side counter (Adam's
        # `step` unless `capturable=True`) still advances on a skipped step.
        device = p.device
        return {
            k: v
            for k, v in self.optimizer.state.get(p, {}).items()
            if isinstance(v, torch.Tensor) and v.device == device
        }

    def _snapshot(self) -> dict[tuple[int, str | None], torch.Tensor]:
        """Copies of the parameters and optimizer-state tensors, to undo a skipped step on the device."""
        saved: dict[tuple[int, str | None], torch.Tensor] = {}
        for p in self._params():
            saved[(id(p), None)] = p.detach().clone()
            for key, value in self._state_tensors(p).items():
                saved[(id(p), key)] = value.clone()
        return saved

    def _undo_targets(
        self, saved: dict[tuple[int, str | None], torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        # State the step created (a first momentum buffer) has no saved copy and is undone to zeros: a fresh state.
        targets: list[torch.Tensor] = []
        before: list[torch.Tensor | None] = []
        for p in self._params():
            targets.append(p.detach())
            before.append(saved[(id(p), None)])
            for key, value in self._state_tensors(p).items():
                targets.append(value)
                before.append(saved.get((id(p), key)))
        return targets, before

    @torch.no_grad()
    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """The probe's outputs in eval mode, without touching gradients or metrics."""
        was_training = self.module.training
        self.module.eval()
        try:
            x = to_probe_input(features, self._param())
            with torch.autocast(device_type=x.device.type, enabled=False):
                return self.module(x)
        finally:
            self.module.train(was_training)

    def set_total_steps(self, total_steps: int | None) -> None:
        """Rebuild the scheduler with lengths (``T_max``...) from ``total_steps``, unless training already began.

        For adapters that learn the run's length only after `build` (Lightning, once the train dataloader is set
        up). A scheduler that has stepped or was restored from a checkpoint keeps its state and lengths.
        """
        if total_steps is None or self._scheduler_restored or self.scheduler.last_epoch > 0:
            return
        if isinstance(self.config.scheduler, LRScheduler):  # the user's instance: its lengths are theirs
            return
        # Undo what constructing the first scheduler did to the rates (LinearLR applies its start factor at once).
        for group in self.optimizer.param_groups:
            group["lr"] = group.get("initial_lr", group["lr"])
        self.scheduler = build_scheduler(
            self.config.scheduler, self.optimizer, total_steps=total_steps, probe_name=self.name
        )

    def train_metric_values(self, preds: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Update the train metrics and return their values on this micro-batch (local to this rank)."""
        if not len(self.metrics.train):
            return {}
        return self.metrics.train(preds, targets.to(preds.device))

    def eval_step(self, features: torch.Tensor, targets: torch.Tensor, num_valid: int | None = None) -> torch.Tensor:
        """Predict in eval mode and update the eval metrics with the first ``num_valid`` samples (all by default).

        ``num_valid`` drops the repeated samples a distributed sampler pads the last batch with, so that every
        validation sample counts exactly once.
        """
        preds = self.predict(features)
        if len(self.metrics.val):
            keep = slice(None) if num_valid is None else slice(0, num_valid)
            self.metrics.val.update(preds[keep], targets[keep].to(preds.device))
        return preds

    def compute_eval_metrics(self) -> dict[str, torch.Tensor]:
        """Eval metrics reduced over the data-parallel group (one flat collective), then reset for the next epoch.

        To sync many probes at once, pass all their ``metrics.val`` to `distprobe.metrics.compute_synced` instead.
        """
        if not len(self.metrics.val):
            return {}
        (values,) = compute_synced([self.metrics.val], self.dp_group)
        self.metrics.val.reset()
        return values

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume this probe exactly, keyed by field (never by position)."""
        in_window = self.micro_step % self.config.accumulate_grad_batches != 0
        return {
            "format": STATE_FORMAT,
            "name": self.name,
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "micro_step": self.micro_step,
            # Mid-window gradients are part of the state: without them a resumed window would step on a partial sum.
            "window_grads": [None if p.grad is None else p.grad.detach().clone() for p in self._params()]
            if in_window
            else None,
            "skipped_steps": self.skipped_steps.detach().clone(),
            "metrics": self.metrics.metric_states(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` saved; fields added in later formats fall back to defaults."""
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._scheduler_restored = True
        self.micro_step = int(state.get("micro_step", 0))
        window_grads = state.get("window_grads")
        for p, g in zip(self._params(), window_grads or [None] * len(self._params()), strict=True):
            p.grad = None if g is None else g.to(p.device)
        self.skipped_steps = state.get("skipped_steps", torch.zeros((), dtype=torch.long)).to(self._param().device)
        self.metrics.load_metric_states(state.get("metrics", {}))
