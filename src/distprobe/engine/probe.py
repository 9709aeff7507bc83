"""One probe: its module and replica, optimizer, scheduler, accumulation, clipping, bad-data policy and metrics.

The train step never synchronises with the host: it returns tensors, skips non-finite updates with a device-side
mask, and leaves every decision that could differ between ranks to the gradient all-reduce itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from distprobe import keys
from distprobe.engine import bad_data, functional, maths, skip
from distprobe.engine.batchnorm import sync_batch_norms
from distprobe.engine.config import ProbeConfig
from distprobe.engine.deferred import DeferredUpdates
from distprobe.engine.factories import build_module, build_optimizer, build_scheduler
from distprobe.engine.replicate import (
    agree_on_max,
    default_group,
    replicate_probe,
)
from distprobe.engine.shapes import BatchShapes, batch_rows, stand_in_preds
from distprobe.engine.state import gathered_window_grads, load_metric_states, own_window_grads, synced_metric_states
from distprobe.features.dtensor import whole
from distprobe.metrics.collection import ProbeMetrics
from distprobe.metrics.flat_sync import compute_synced
from distprobe.metrics.sync_free import update_collection

if TYPE_CHECKING:
    from torchmetrics import MetricCollection

#: Bumped when the layout of `Probe.state_dict` changes; loaders read older layouts with `.get` defaults.
#: 2: window gradients of every rank of the group, metric states as the group's reduction (held by its rank 0).
STATE_FORMAT = 2


@dataclass
class StepOutput:
    """What one train step returns; every field is a device tensor or a host-side fact known without a sync."""

    loss: torch.Tensor
    """The micro-batch loss, detached (log it as a tensor); computed on the cleaned batch when it held bad data."""
    preds: torch.Tensor
    """The probe's outputs for the micro-batch, detached. For a batch skipped for its shapes
    (`distprobe.engine.shapes`): a NaN row per sample of the batch as given, so that rows still match samples."""
    stepped: bool
    """Whether this micro-step closed an accumulation window (known on the host from the counter)."""
    bad: torch.Tensor
    """0-d bool: this rank's micro-batch held bad data, so its window's step is skipped on every rank."""


@dataclass
class PendingStep:
    """A micro-step between `Probe.forward_step` and `Probe.finish_step`: its loss waits for a backward."""

    scaled_loss: torch.Tensor
    """The loss times the accumulation scale, or NaN for bad data: what the backward runs on."""
    loss: torch.Tensor
    """The micro-batch loss, detached."""
    preds: torch.Tensor
    """The probe's outputs, detached."""
    targets: torch.Tensor
    """The targets made safe for the loss and the metrics."""
    checked: bad_data.Verdict
    """The micro-batch's bad-data verdict."""
    batch_size: int
    """Samples in the micro-batch (for the mean loss)."""
    boundary: bool
    """Whether this micro-step closes the accumulation window."""
    skipped_rows: int | None = None
    """The samples of a batch skipped for its shapes, as given (None: not skipped, or no tensor said)."""


def to_probe_input(features: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Detach features from the backbone's graph and bring them to the probe's device and dtype.

    A DTensor (a tensor-parallel backbone's output) is gathered into a full local tensor first.
    """
    return whole(features).detach().to(device=param.device, dtype=param.dtype)


def build_metrics(config: ProbeConfig) -> ProbeMetrics:
    """The probe's metric collections (train, val, loss, bad-data counts) from ``config.metrics``."""
    return ProbeMetrics(config.metrics, config.name, reasons=bad_data.REASONS)


def merge(dicts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One dict of every logged value (their keys never collide: each carries its probe's name)."""
    return {k: v for d in dicts for k, v in d.items()}


def _hyperparameters(optimizer: Optimizer) -> list[dict[str, Any]]:
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


@dataclass(eq=False, kw_only=True)
class Probe:
    """A trainable probe replicated over a data-parallel group.

    Build it with `Probe.build`; call `train_step` for every training micro-batch and `eval_step` for every
    validation batch. Under torch.distributed every rank of the group must call `train_step`, `state_dict` and
    the metric computations the same number of times (they hold collectives).

    Example:
        >>> probe = Probe.build(ProbeConfig(name="linear", probe=nn.Linear(8, 3), optimizer="SGD"))
        >>> out = probe.train_step(torch.randn(4, 8), torch.tensor([0, 1, 2, 0]))
        >>> out.stepped
        True
    """

    config: ProbeConfig
    """The probe's specification."""
    module: nn.Module = field(repr=False)
    """The probe's own module (its parameters never join the main model's)."""
    replica: nn.Module = field(repr=False)
    """What trains: the module's DistributedDataParallel over ``dp_group``, or the module itself (one replica)."""
    optimizer: Optimizer = field(repr=False)
    """The optimizer of the module's trainable parameters."""
    scheduler: LRScheduler = field(repr=False)
    """Its learning-rate scheduler (rebuilt by `set_total_steps` until training begins)."""
    loss_fn: Callable[..., Any] = field(repr=False)
    """The training loss, ``loss_fn(preds, targets)``."""
    metrics: ProbeMetrics = field(repr=False)
    """The train, validation, loss and bad-data metric collections."""
    dp_group: dist.ProcessGroup | None
    """The data-parallel group the probe is replicated over (None: a single replica)."""
    initial_hyperparameters: list[dict[str, Any]] | None = field(default=None, repr=False)
    """Each param group's settings (``params`` left out) before any scheduler touched them: OneCycleLR and CyclicLR
    rewrite ``lr`` when built, and the scheduler rebuilt for the run's length starts from these. None: read from
    ``optimizer`` at construction."""

    def __post_init__(self) -> None:
        # Looked up once: the Parameter objects never change (loading and unsharing keep them), and a generator per
        # step is host time the step pays on every probe.
        self._first_param = next(self.module.parameters())
        if self.initial_hyperparameters is None:
            self.initial_hyperparameters = _hyperparameters(self.optimizer)
        self._scheduler_restored = False
        self._ignore_index = bad_data.ignore_index_of(self.loss_fn)
        self._buffers = [b for b in self.module.buffers() if b.is_floating_point()]
        self._window_state = [*self._buffers, *(b for b in self.module.buffers() if not b.is_floating_point())]
        """What a skipped window puts back: the running statistics, then the integer buffers, BatchNorm's
        ``num_batches_tracked`` among them (the weights of ``momentum=None``'s cumulative average)."""
        self._local_batchnorm, self._group_batchnorm = bad_data.batchnorm_kinds(self.module)
        self._window_buffers: list[torch.Tensor] | None = None
        """The running statistics (BatchNorm) as the open window found them."""
        self.micro_step = 0
        """Micro-batches seen since the start of training; the window position is ``micro_step % accumulate``."""
        self._window_grads: list[torch.Tensor | None] | None = None
        """The open window's gradient tensors, held so that nothing outside can drop them between micro-steps."""
        self.skipped_steps = torch.zeros((), dtype=torch.long, device=self._param().device)
        """Optimizer steps skipped because a gradient was not finite (a device tensor, never read on the host)."""
        self.deferred = DeferredUpdates(self.metrics)
        """The train steps' loss, bad-data counts and metric inputs not yet in ``metrics`` (see `fold_metrics`)."""
        self.batch_shapes = BatchShapes(
            "probe",
            self.name,
            ["input 'features'", "target 'targets'"],
            prefix=keys.stage_prefix(keys.TRAIN, self.name),
            eval_prefix=keys.stage_prefix(keys.EVAL, self.name),
        ).to(self._param().device)
        """The first training batch's shapes; a later batch of other shapes is skipped and counted
        (``train/{name}_bad_batches/wrong_shape``). Adapters name the inputs by their keys."""

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
        metrics: ProbeMetrics | None = None,
    ) -> Probe:
        """Resolve the config into a ready probe.

        Args:
            config: The probe's specification.
            module: An already resolved probe module (else ``config.probe`` is resolved here).
            dp_group: The data-parallel group to replicate over; None trains a single replica.
            device: Where the probe lives; default: where its parameters already are.
            total_steps: The probe's number of optimizer steps, for scheduler defaults such as ``T_max``.
            owner: Passed to a ``probe`` callable that takes one argument (the LightningModule).
            metrics: Already built metrics for ``config.metrics`` (an adapter that shows them before set-up).
        """
        if module is None:
            module = build_module(config.probe, owner=owner, probe_name=config.name)
        if device is not None:
            module.to(device)
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"probe '{config.name}': argument 'probe' has no trainable parameters.")
        sync_batch_norms(module, dp_group)
        optimizer = build_optimizer(config.optimizer, params, probe_name=config.name)
        hyperparameters = _hyperparameters(optimizer)
        scheduler = build_scheduler(config.scheduler, optimizer, total_steps=total_steps, probe_name=config.name)
        if metrics is None:
            metrics = build_metrics(config)
        metrics.to(params[0].device)
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
            initial_hyperparameters=hyperparameters,
        )

    @property
    def name(self) -> str:
        """The probe's unique name."""
        return self.config.name

    def _param(self) -> torch.Tensor:
        return self._first_param

    def train_step(self, features: torch.Tensor, targets: torch.Tensor) -> StepOutput:
        """Train on one micro-batch; step the optimizer when it closes an accumulation window.

        Bad data (non-finite features, labels out of range, non-finite targets) never raises: the batch is cleaned so
        that nothing can fault, its gradient is poisoned, and the window's step is skipped on every rank.
        To train several probes with one backward and one bucketed all-reduce, see `distprobe.engine.ProbeGroup`.
        """
        boundary = maths.is_boundary(self.micro_step, self.config.accumulate_grad_batches)
        # Micro-steps keep gradients local: the one all-reduce happens in the boundary's backward.
        no_sync = getattr(self.replica, "no_sync", None)
        sync_ctx = contextlib.nullcontext() if boundary or no_sync is None else no_sync()
        with sync_ctx:
            pending = self.forward_step(features, targets, self.replica)
            pending.scaled_loss.backward()
        return self.finish_step(pending)

    def forward_step(
        self, features: torch.Tensor | None, targets: torch.Tensor | None, model: nn.Module
    ) -> PendingStep:
        """The first half of `train_step`: the forward through ``model`` (the replica or the bare module) and the loss.

        The caller runs the backward of ``scaled_loss`` (alone, or summed with other probes'), reduces the gradients
        at a window's end unless ``model`` is the DDP replica, and then calls `finish_step`. A batch of other shapes
        than the first (None: an input missing from it) trains as an empty batch of the first one's shapes, counted
        as bad data (`distprobe.engine.shapes`).
        """
        given = [features, targets]
        (features, targets), skipped = self.batch_shapes.conform(given, self._param().device)
        pending = self._forward_step(features, targets, model)
        if skipped:
            pending.skipped_rows = batch_rows(given)
        return pending

    def _forward_step(self, features: torch.Tensor, targets: torch.Tensor, model: nn.Module) -> PendingStep:
        accumulate = self.config.accumulate_grad_batches
        param = self._param()
        device = param.device
        x = to_probe_input(features, param)
        targets = targets.to(device)
        features_ok = None
        if self._buffers:  # a BatchNorm probe: a NaN must not reach the (group's) statistics
            features_ok = bad_data.finite_features(x)
            x = bad_data.zero_nonfinite(x)
        if not self.module.training:  # `train()` walks every submodule: only when someone switched to eval
            self.module.train()
        # The probe trains in its own dtype, outside the main model's autocast and loss scaling: its gradients are
        # never scaled, so clipping sees true values and no GradScaler is involved.
        in_autocast = torch.is_autocast_enabled(device.type)
        outside_autocast = torch.autocast(device.type, enabled=False) if in_autocast else contextlib.nullcontext()
        self._restore_window_grads()
        if self._buffers and self.micro_step % accumulate == 0:
            # The window's first micro-step: its running statistics go back here if the window's step is skipped.
            self._window_buffers = [b.clone() for b in self._window_state]
        batch = int(x.shape[0]) if x.ndim else 1  # on the host: no sync
        if batch == 0 or (batch == 1 and self._local_batchnorm):
            with outside_autocast:
                return self._untrainable_step(x, targets, model)
        with outside_autocast:
            preds = model(x)
            safe_targets, countable, in_range, finite = bad_data.check_targets(targets, preds, self._ignore_index)
            loss = self.loss_fn(preds, safe_targets)
            if features_ok is None:  # see `bad_data.finite_features`
                features_ok = torch.isfinite(loss.detach())
            checked = bad_data.verdict(features_ok, countable, in_range, finite)
            scaled = bad_data.poison(loss, checked.bad, scale=1.0 / accumulate)
        return PendingStep(
            scaled_loss=scaled,
            loss=loss.detach(),
            preds=preds.detach(),
            targets=safe_targets,
            checked=checked,
            batch_size=int(targets.shape[0]) if targets.ndim else 1,
            boundary=maths.is_boundary(self.micro_step, accumulate),
        )

    def _untrainable_step(self, x: torch.Tensor, targets: torch.Tensor, model: nn.Module) -> PendingStep:
        """A micro-batch too small to train on: no sample, or one through a BatchNorm of this rank alone.

        Such a batch ends an epoch or comes out of a filter; it is not bad data: it is not counted as bad, and it
        adds nothing to the metrics or the mean loss. Its window's step is skipped on every rank, through the gradient
        as for bad data, since a zero gradient would still move the weights by momentum and weight decay.

        The forward still runs, so that the replica's (or a `GroupBatchNorm`'s) collectives pair up with the other
        ranks'. It runs in eval mode, so that no running statistic moves (torch's BatchNorm also refuses one sample
        in training), except for no sample through a `GroupBatchNorm`, whose training forward is a collective.
        """
        one_sample = bool(x.shape[0])
        if one_sample or not self._group_batchnorm:
            self.module.eval()
        try:
            preds = model(x)
        finally:
            self.module.train()
        safe_targets, _, _, _ = bad_data.check_targets(targets, preds, self._ignore_index)
        # A loss of no sample is left undefined rather than asked of a user's loss_fn (it may refuse an empty batch).
        loss = self.loss_fn(preds, safe_targets) if one_sample else preds.new_full((), float("nan"))
        # Every parameter gets a NaN gradient, also with no sample (whose gradient through the outputs is zero);
        # `preds` stays in the graph for the backward's own collectives (a GroupBatchNorm's).
        every_param = torch.stack([p.sum() for p in skip.params_of(self.optimizer)]).sum()
        return PendingStep(
            scaled_loss=(preds.sum() + every_param) * float("nan"),
            loss=loss.detach(),
            preds=preds.detach(),
            targets=safe_targets,
            checked=bad_data.untrainable_verdict(int(preds.shape[0]), preds.device),
            batch_size=int(preds.shape[0]),
            boundary=maths.is_boundary(self.micro_step, self.config.accumulate_grad_batches),
        )

    def finish_step(self, pending: PendingStep, *, fused_if_unset: bool = False) -> StepOutput:
        """The second half of `train_step`, once the backward ran (and, at a window's end, the gradients are reduced).

        ``fused_if_unset`` is passed to `step_window` at a window's end.
        """
        checked = pending.checked
        self.deferred.add(
            pending.loss, checked.bad, pending.batch_size, checked.counts, pending.preds, pending.targets, checked.keep
        )
        self.micro_step += 1
        if pending.boundary:
            self.step_window(fused_if_unset=fused_if_unset)
            self._window_grads = None
        else:
            self._window_grads = [p.grad for p in skip.params_of(self.optimizer)]
        preds = pending.preds if pending.skipped_rows is None else stand_in_preds(pending.preds, pending.skipped_rows)
        return StepOutput(loss=pending.loss, preds=preds, stepped=pending.boundary, bad=checked.bad)

    def _restore_window_grads(self) -> None:
        """Put back the open window's gradients if something set them to None since the last micro-step.

        A probe registered in the LightningModule's ``nn.ModuleDict`` is a parameter of it, and Lightning zeroes the
        LightningModule's gradients before each validation (``on_validation_model_zero_grad``): a window that spans a
        validation, or an epoch end, would otherwise lose its first micro-batches.
        """
        if self._window_grads is None:
            return
        for p, grad in zip(skip.params_of(self.optimizer), self._window_grads, strict=True):
            if p.grad is not grad:
                p.grad = grad

    def step_window(self, *, fused_if_unset: bool = False) -> None:
        """Close the accumulation window on the reduced gradients: clip, step unless non-finite, schedule, zero.

        ``fused_if_unset``: a torch Adam, AdamW or SGD whose user left the implementation unset steps with its fused
        kernel (see `skip.step_unless_nonfinite`).
        """
        params = skip.params_of(self.optimizer)
        grads = [p.grad for p in params if p.grad is not None]
        # After the all-reduce every rank holds the same gradients, so every rank reaches the same verdict with no
        # extra collective; a non-finite value on any rank (bad data poisons its gradient) poisons the reduced
        # gradient everywhere.
        found_inf = functional.nonfinite_flag(grads).to(self._param().device)
        functional.clip_gradients(grads, self.config.gradient_clip_val, self.config.gradient_clip_algorithm)
        skip.step_unless_nonfinite(self.optimizer, found_inf, fused_if_unset=fused_if_unset)
        if self._window_buffers is not None:
            # A skipped step leaves no trace in the running statistics either. Decided by the all-reduced verdict, the
            # same on every rank: a rank's own "bad batch" flag would restore the statistics on that rank only.
            functional.restore_where(found_inf.bool(), self._window_state, self._window_buffers)
            self._window_buffers = None
        self.skipped_steps += found_inf.long()
        for p in params:  # `zero_grad(set_to_none=True)` without its per-call profiler range and hooks
            p.grad = None
        self.scheduler.step()

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """The probe's outputs in eval mode, without touching gradients or metrics (non-finite features give 0s)."""
        return self._predict(to_probe_input(features, self._param()))

    @torch.no_grad()
    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        """`predict` on features already on the probe's device and dtype."""
        was_training = self.module.training
        self.module.eval()
        try:
            with torch.autocast(device_type=x.device.type, enabled=False):
                return self.module(bad_data.zero_nonfinite(x))
        finally:
            self.module.train(was_training)

    def set_total_steps(self, total_steps: int | None) -> None:
        """Rebuild the scheduler with lengths (``T_max``...) from ``total_steps``, unless training already began.

        For adapters that learn the run's length only after `build` (Lightning, once the train dataloader is set
        up). A scheduler that has stepped or was restored from a checkpoint keeps its state and lengths. Ranks agree
        on the largest ``total_steps`` first (a collective over the world: uneven loaders give each rank its own
        count, and replicas on different schedules would diverge).
        """
        total_steps = agree_on_max(total_steps, default_group(), device=self._param().device)
        if total_steps is None or self._scheduler_restored or self.scheduler.last_epoch > 0:
            return
        if isinstance(self.config.scheduler, LRScheduler):  # the user's instance: its lengths are theirs
            return
        # Undo what building the first scheduler wrote into the optimizer (OneCycleLR, CyclicLR set `lr`, LinearLR
        # applies its start factor, cycling schedulers also set momenta): the rebuild starts from the user's rates.
        assert self.initial_hyperparameters is not None, "set by __post_init__"
        for group, hyperparameters in zip(self.optimizer.param_groups, self.initial_hyperparameters, strict=True):
            for key in [k for k in group if k != "params"]:
                del group[key]
            group.update(hyperparameters)
        self.scheduler = build_scheduler(
            self.config.scheduler, self.optimizer, total_steps=total_steps, probe_name=self.name
        )

    def current_lr(self) -> float:
        """The learning rate of the optimizer's first parameter group (a host float: no sync)."""
        return float(self.optimizer.param_groups[0]["lr"])

    def eval_step(self, features: torch.Tensor, targets: torch.Tensor, num_valid: int | None = None) -> torch.Tensor:
        """Predict in eval mode and update the eval metrics with the first ``num_valid`` samples (all by default).

        ``num_valid`` drops the repeated samples a distributed sampler pads the last batch with, so that every
        validation sample counts exactly once. Samples with bad data are left out of the sync-free metrics (and
        made harmless for the others), never an error. A batch of other shapes than training established is skipped
        and counted (`distprobe.engine.shapes`): none of its samples counts, and its predictions are NaN rows.
        """
        given = [features, targets]
        (features, targets), skipped = self.batch_shapes.conform_eval(given, self._param().device)
        x = to_probe_input(features, self._param())
        preds = self._predict(x)
        if skipped:
            return stand_in_preds(preds, batch_rows(given))
        if len(self.metrics.val):
            keep = slice(None) if num_valid is None else slice(0, num_valid)
            safe_targets, countable, in_range, finite = bad_data.check_targets(
                targets[keep].to(preds.device), preds[keep], None
            )
            checked = bad_data.verdict(bad_data.row_checks(x[keep]), countable, in_range, finite)
            update_collection(self.metrics.val, preds[keep], safe_targets, checked.keep)
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

    def compute_train_metrics(self) -> dict[str, torch.Tensor]:
        """Train metrics and mean loss since the last `reset_train_metrics`, and the run's bad-batch counts.

        Reduced over the group with one flat collective: call it on every rank, at an epoch end.
        """
        return merge(compute_synced(self.train_collections(), self.dp_group))

    def fold_metrics(self) -> None:
        """Fold the kept train-step values into ``metrics``: call it before reading a train metric's state."""
        self.deferred.fold()

    def train_collections(self) -> list[MetricCollection]:
        """The collections `compute_train_metrics` reduces (their states folded), for syncing many probes' at once."""
        self.fold_metrics()
        return [self.metrics.train, self.metrics.loss, self.metrics.bad_batches]

    def reset_train_metrics(self) -> None:
        """Start a new epoch of train metrics and mean loss (the run-long bad-batch counts stay)."""
        self.fold_metrics()  # the bad-batch counts among the kept values run over the whole training
        self.metrics.train.reset()
        self.metrics.loss.reset()

    def release(self) -> None:
        """Drop the DDP replica (it holds the process group); the next `rejoin` builds it again.

        Call it when training ends: a DDP reducer still alive at interpreter exit can abort the process after a
        successful run.
        """
        self.replica = self.module

    def rejoin(self) -> None:
        """Replicate again over the probe's group after `release` (a collective; a no-op when replicated)."""
        if self.replica is self.module and self.dp_group is not None:
            self.replica = replicate_probe(self.module, self.dp_group)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume this probe exactly, keyed by field (never by position).

        A collective over the data-parallel group: Lightning writes rank 0's callback state only, so rank-local
        state is gathered or reduced first. Mid-window gradients are saved for every rank of the group (each takes
        its own back on resume, bitwise), metric states as the group's reduction.
        """
        in_window = self.micro_step % self.config.accumulate_grad_batches != 0
        window_grads = None
        if in_window:
            self._restore_window_grads()
            window_grads = gathered_window_grads(skip.params_of(self.optimizer), self.dp_group)
        return {
            "format": STATE_FORMAT,
            "name": self.name,
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "micro_step": self.micro_step,
            # Without them a resumed window would step on a partial sum: a list per rank of the group.
            "window_grads_per_rank": window_grads,
            "window_buffers": None if not in_window else self._window_buffers,
            "skipped_steps": self.skipped_steps.detach().clone(),
            "metrics": self._synced_metric_states(),
            "wrong_shape_batches": self.batch_shapes.state_dict(self.dp_group),
        }

    def _synced_metric_states(self) -> dict[str, Any]:
        self.fold_metrics()
        return synced_metric_states(self.metrics, self.dp_group)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` saved; fields added in later formats fall back to defaults."""
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._scheduler_restored = True
        self.micro_step = int(state.get("micro_step", 0))
        params = skip.params_of(self.optimizer)
        window_grads = own_window_grads(state, self.dp_group)
        for p, g in zip(params, window_grads or [None] * len(params), strict=True):
            p.grad = None if g is None else g.to(p.device)
        self._window_grads = [p.grad for p in params] if window_grads is not None else None
        self.skipped_steps = state.get("skipped_steps", torch.zeros((), dtype=torch.long)).to(self._param().device)
        saved = state.get("window_buffers")
        if saved is not None:
            # A checkpoint from before the integer buffers were saved: they keep the values they load with.
            saved = [*saved, *(b.clone() for b in self._window_state[len(saved) :])]
        self._window_buffers = None if saved is None else [b.to(self._param().device) for b in saved]
        self.deferred.discard()
        load_metric_states(self.metrics, state.get("metrics", {}), self.dp_group)
        self.batch_shapes.load_state_dict(state.get("wrong_shape_batches"), self.dp_group)
