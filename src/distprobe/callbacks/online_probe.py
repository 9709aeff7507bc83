"""`OnlineProbe`: the reference online-probe API, trained by distprobe's engine."""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import nn
from typing_extensions import override

from distprobe import keys
from distprobe.callbacks.cadence import BadDataWarnings, logs_this_step, values_already_reduced
from distprobe.callbacks.own_data import FeatureFn, draw_features, eval_batches, own_data_of
from distprobe.callbacks.trainable import TrainableCallback
from distprobe.engine.checks import first_batch_problem, raise_if_any_rank_failed, world_check_group
from distprobe.engine.factories import build_module
from distprobe.engine.group import ProbeGroup
from distprobe.engine.probe import StepOutput, merge
from distprobe.features.lookup import MissingKeyError, lookup
from distprobe.features.tap_inputs import TapInputs, check_input_spec
from distprobe.metrics.exact import dataloader_at, valid_in_loader_batch
from distprobe.metrics.flat_sync import compute_synced


class OnlineProbe(TrainableCallback):
    """Train a probe on the model's detached features while the model trains, and log how well it does.

    The probe has its own optimizer, scheduler, accumulation and clipping; it is replicated over the data-parallel
    group by its own DistributedDataParallel and never joins the LightningModule's parameters, wrapper or optimizer.

    Args:
        module: The LightningModule to probe (None: taken at ``setup``).
        name: Unique identifier; keys logs, checkpoint state and ``pl_module.callbacks_modules[name]``.
        input: Key of the features in the step's outputs dict, else in the batch dict (dotted paths reach nested keys),
            else the dotted name of a submodule of the LightningModule, whose output is tapped by a forward hook:
            ``"backbone.blocks.8"``, pooled with a suffix such as ``":cls"`` or ``"backbone.blocks:last4"``
            (always a tap). See docs/taps.md.
        target: Key of the labels, looked up the same way.
        probe: An nn.Module, a callable returning one (called with ``module`` if it takes one argument), or a Hydra
            config with ``_target_``.
        loss_fn: Loss taking ``(preds, targets)``; default ``nn.CrossEntropyLoss()``. ``loss`` is an alias.
        optimizer: A name ("AdamW", "SGD", "LARS", any torch.optim optimizer), a ``{"type": ..., **kwargs}`` dict,
            a Hydra config, a partial/class/callable taking the parameters, an optimizer instance on the probe's
            parameters, or None for ``LARS(lr=0.1, clip_lr=True, eta=0.02, exclude_bias_n_norm=True,
            weight_decay=0)``.
        scheduler: A name (``T_max`` and similar lengths default to the probe's number of optimizer steps), a dict,
            a Hydra config, a partial/class/callable taking the optimizer, an instance, or None for a constant rate.
        accumulate_grad_batches: Micro-batches per probe optimizer step.
        gradient_clip_val: Clip threshold of the probe's gradients; None disables clipping.
        gradient_clip_algorithm: ``"norm"`` or ``"value"``.
        metrics: A dict, tuple, list, single torchmetrics Metric, ``{"train": ..., "val": ...}``, or None.
        verbose: Accepted for stable-pretraining compatibility (its 13th argument, which it stores and never reads).
        loss: Alias of ``loss_fn``.
        data: A labeled DataLoader of the probe's own (docs/own-data.md): the probe trains on its batches instead of
            the main ones, with ``features(pl_module, batch)`` as input and ``target`` a key of its batches. It is
            sharded over the data-parallel ranks and cycled; its position is checkpointed.
        val_data: The probe's own validation DataLoader, evaluated exactly at each validation epoch (the main
            validation batches are then not used by this probe).
        every_n_steps: With ``data``: one probe step every ``every_n_steps`` main training batches.
        features: With ``data``: ``features(pl_module, batch) -> tensor``, run under no_grad, in eval mode, under the
            main model's autocast; with a submodule tap as ``input`` it only needs to run the model.

    Logs ``train/{name}_loss``, ``train/{name}_skipped_steps`` and ``hparams/lr_{name}`` on the steps Lightning
    writes; ``train/{name}_loss_epoch``, the train metrics ``train/{name}_*`` and the bad-data counts
    ``train/{name}_bad_batches/{reason}`` at each train epoch's end; ``eval/{name}_*`` at each validation's end.
    Epoch values are exact over every rank's samples (one flat sync for all probes).

    Example:
        >>> import torchmetrics
        >>> probe = OnlineProbe(
        ...     None, name="linear", input="embedding", target="label", probe=nn.Linear(64, 10),
        ...     optimizer="AdamW", metrics={"top1": torchmetrics.classification.MulticlassAccuracy(10)},
        ... )
    """

    def __init__(
        self,
        module: pl.LightningModule | None,
        name: str,
        input: str,  # noqa: A002 - the reference API's name
        target: str,
        probe: Any,
        loss_fn: Callable[..., Any] | None = None,
        optimizer: Any = None,
        scheduler: Any = None,
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: Literal["norm", "value"] = "norm",
        metrics: Any = None,
        verbose: bool | None = None,
        *,
        loss: Callable[..., Any] | None = None,
        data: Any = None,
        val_data: Any = None,
        every_n_steps: int = 1,
        features: FeatureFn | None = None,
    ) -> None:
        if loss is not None and loss_fn is not None and loss is not loss_fn:
            raise ValueError(f"probe '{name}': got both 'loss' and 'loss_fn'; 'loss' is an alias, pass only one.")
        if input is None and target is None and loss is None and loss_fn is None:
            raise ValueError(
                f"probe '{name}': input, target and loss are all None, stable-pretraining's form for a probe module "
                "that computes its own loss inside the model's backward. distprobe trains every probe outside the "
                "model's backward, on detached features: give 'input' and 'target' keys (the loss defaults to "
                "cross-entropy), or subclass distprobe.callbacks.TrainableCallback for a custom training step."
            )
        for argument, key in (("input", input), ("target", target)):
            if not isinstance(key, str) or not key:
                raise ValueError(f"probe '{name}': argument '{argument}' got {key!r}; expected a non-empty key string.")
        check_input_spec(input, probe_name=name)
        self.own_data = own_data_of(name, data, val_data, features, every_n_steps)
        self.input = input
        self.target = target
        self.probe_spec = probe
        self.loss_fn = loss_fn if loss_fn is not None else loss
        self.metrics_spec = metrics
        self.verbose = verbose
        """stable-pretraining's 13th argument, kept for drop-in use; distprobe's logging does not depend on it."""
        self._checked_first_batch = False
        self._eval_values: dict[str, torch.Tensor] | None = None
        self._train_values: dict[str, torch.Tensor] | None = None
        self._bad_data_warnings = BadDataWarnings()
        self._tap_inputs: TapInputs | None = None
        super().__init__(
            module,
            name,
            optimizer=optimizer,
            scheduler=scheduler,
            accumulate_grad_batches=accumulate_grad_batches,
            gradient_clip_val=gradient_clip_val,
            gradient_clip_algorithm=gradient_clip_algorithm,
        )

    @override
    def configure_model(self, pl_module: pl.LightningModule | None) -> nn.Module:
        return build_module(self.probe_spec, owner=pl_module, probe_name=self.name)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.own_data is not None:
            self.own_data.shard_over(self.probe.dp_group)
            return  # its taps watch its own forward only
        self._tap_inputs = TapInputs.of(pl_module)
        self._tap_inputs.request(self, self.input, probe_name=self.name)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._tap_inputs is not None:
            self._tap_inputs.arm(pl_module)

    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._tap_inputs is not None:
            self._tap_inputs.arm(pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._tap_inputs is not None:
            self._tap_inputs.release(self)
            self._tap_inputs = None
        if self.own_data is not None:
            self.own_data.release()
        super().teardown(trainer, pl_module, stage)

    def _features_and_targets(self, outputs: Any, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if self._tap_inputs is not None:
            features = self._tap_inputs.read(self.input, outputs, batch, probe_name=self.name)
        else:
            features = lookup(self.input, outputs, batch, probe_name=self.name, argument="input")
        targets = lookup(self.target, outputs, batch, probe_name=self.name, argument="target")
        return features, targets

    def _own_features_and_targets(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[Any, Any]:
        assert self.own_data is not None
        features, targets = draw_features(self.own_data, trainer, pl_module, [self.input], self.target)
        return features[0], targets

    def _checked_features_and_targets(
        self, outputs: Any, batch: Any, read: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Look up the probe's tensors; on the first batch, check them collectively across all ranks."""
        if read is None:
            read = lambda: self._features_and_targets(outputs, batch)  # noqa: E731
        if self._checked_first_batch:
            return read()
        group = world_check_group()
        try:
            features, targets = read()
        except MissingKeyError as err:
            raise_if_any_rank_failed(str(err), group)
            raise AssertionError("unreachable: the call above raises") from err
        except Exception as err:  # noqa: BLE001 - any failure must reach every rank, or the others hang
            raise_if_any_rank_failed(f"probe '{self.name}': reading input and target failed: {err!r}", group)
            raise AssertionError("unreachable: the call above raises") from err
        raise_if_any_rank_failed(first_batch_problem(self.probe, features, targets, input_key=self.input), group)
        self._checked_first_batch = True
        return features, targets

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.own_data is not None:
            self._train_on_own_data(trainer, pl_module, batch_idx)
            return
        # All OnlineProbes of the trainer train as one group (one backward, one bucketed all-reduce): the first to
        # get here runs the step for all, the others find their outputs waiting.
        out, batch_size = _grouped_train_step(trainer, self, outputs, batch)
        if out.stepped:
            self._count_probe_step(trainer)
        _store_preds(keys.predictions(self.name), out.preds, outputs, batch)
        if not logs_this_step(trainer, batch_idx):
            return
        self._bad_data_warnings.check(self.probe)
        values = {
            keys.key(keys.TRAIN, self.name, keys.LOSS): out.loss,
            keys.key(keys.TRAIN, self.name, keys.SKIPPED_STEPS): self.probe.skipped_steps.float(),
            # Lightning's LearningRateMonitor sees only Lightning's optimizers. A device tensor filled from the host
            # float: Lightning would turn a float into one by a copy from pageable memory, a host sync on CUDA.
            keys.key(keys.HPARAMS, self.name, keys.LR): torch.full((), self.probe.current_lr(), device=out.loss.device),
        }
        pl_module.log_dict(values, on_step=True, on_epoch=False, batch_size=batch_size)

    def _train_on_own_data(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch_idx: int) -> None:
        """Every ``every_n_steps`` main batches (the same count on every rank): a step on the probe's own batch."""
        assert self.own_data is not None
        if not self.own_data.due():
            return
        features, targets = self._checked_features_and_targets(
            None, None, read=lambda: self._own_features_and_targets(trainer, pl_module)
        )
        out = self.probe.train_step(features, targets)
        if out.stepped:
            self._count_probe_step(trainer)
        if not logs_this_step(trainer, batch_idx):
            return
        self._bad_data_warnings.check(self.probe)
        values = {
            keys.key(keys.TRAIN, self.name, keys.LOSS): out.loss,
            keys.key(keys.TRAIN, self.name, keys.SKIPPED_STEPS): self.probe.skipped_steps.float(),
            keys.key(keys.HPARAMS, self.name, keys.LR): torch.full((), self.probe.current_lr(), device=out.loss.device),
        }
        batch_size = int(targets.shape[0]) if targets.ndim else 1
        pl_module.log_dict(values, on_step=True, on_epoch=False, batch_size=batch_size)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._train_values = None

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._train_values is None:
            _compute_epoch_values_of_all_probes(trainer, self, stage="train")
        values = self._train_values or {}
        self.probe.reset_train_metrics()
        if values:
            with values_already_reduced():
                pl_module.log_dict(values, on_step=False, on_epoch=True, sync_dist=False)

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.own_data is not None:
            return  # evaluated on its own validation data at the epoch's start
        features, targets = self._features_and_targets(outputs, batch)
        # Samples a distributed sampler repeats to pad this rank are left out: each sample counts exactly once.
        loader = dataloader_at(trainer.val_dataloaders, dataloader_idx)
        num_valid = valid_in_loader_batch(loader, batch_idx, targets.shape[0])
        preds = self.probe.eval_step(features, targets, num_valid=num_valid)
        _store_preds(keys.predictions(self.name), preds, outputs, batch)

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_values = None  # not computed yet this epoch
        if self.own_data is not None and not trainer.sanity_checking:
            # Before any epoch-end hook: the first OnlineProbe there computes every probe's values at once.
            for features, targets, num_valid in eval_batches(
                self.own_data, trainer, pl_module, [self.input], self.target
            ):
                self.probe.eval_step(features[0], targets, num_valid=num_valid)

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.own_data is not None:
            state = {**state, "own_data": self.own_data.state_dict()}
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        own = state_dict.pop("own_data", None)
        if own is not None and self.own_data is not None:
            self.own_data.load_state_dict(own)
        super().load_state_dict(state_dict)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._eval_values is None:
            _compute_epoch_values_of_all_probes(trainer, self, stage="val")
        values = self._eval_values or {}
        self.probe.metrics.val.reset()
        if values and not trainer.sanity_checking:
            with values_already_reduced():
                pl_module.log_dict(values, on_step=False, on_epoch=True, sync_dist=False)


def _store_preds(key: str, preds: torch.Tensor, outputs: Any, batch: Any) -> None:
    """Store predictions in the batch (where the reference documents them) and in the step's outputs.

    stable-pretraining puts them in the outputs, which Lightning hands, as one dict, to every later callback: its
    OnlineWriter reads them there.
    """
    for container in (batch, outputs):
        if isinstance(container, MutableMapping):
            container[key] = preds


def _compute_epoch_values_of_all_probes(
    trainer: pl.Trainer, caller: OnlineProbe, stage: Literal["train", "val"]
) -> None:
    """Compute the epoch values of every OnlineProbe of ``trainer`` with one flat sync per data-parallel group.

    The first OnlineProbe to reach the epoch-end hook calls it; the others find their values waiting
    (``_train_values`` / ``_eval_values``, cleared at each epoch start). Every rank holds the same callbacks in the
    same order, so the collectives line up. A subclass with its own epoch-end hook may not call this one: its
    states are left alone unless it is the caller.
    """
    attr = "_train_values" if stage == "train" else "_eval_values"
    hook = "on_train_epoch_end" if stage == "train" else "on_validation_epoch_end"
    shares = getattr(OnlineProbe, hook)
    callbacks = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning's callback connector
    probes = [
        cb
        for cb in callbacks
        if isinstance(cb, OnlineProbe)
        and cb._probe is not None
        and getattr(cb, attr) is None
        and getattr(type(cb), hook) is shares
    ]
    if caller not in probes:
        probes.append(caller)
    by_group: dict[int, list[OnlineProbe]] = {}
    for callback in probes:
        by_group.setdefault(id(callback.probe.dp_group), []).append(callback)
    for members in by_group.values():
        group = members[0].probe.dp_group
        if stage == "val":
            per_probe = compute_synced([m.probe.metrics.val for m in members], group)
        else:
            by_member = [m.probe.train_collections() for m in members]
            computed = iter(compute_synced([c for collections in by_member for c in collections], group))
            per_probe = [merge([next(computed) for _ in collections]) for collections in by_member]
        for callback, values in zip(members, per_probe, strict=True):
            setattr(callback, attr, values)


def _grouped_train_step(trainer: pl.Trainer, caller: OnlineProbe, outputs: Any, batch: Any) -> tuple[StepOutput, int]:
    """``caller``'s train step on ``batch`` and its batch size, trained with every OnlineProbe of ``trainer`` at once.

    The first OnlineProbe to reach ``on_train_batch_end`` reads every member's features and targets (first-batch
    checks included, in callback order on every rank), trains them all as one `ProbeGroup`, and leaves each other
    member its output, keyed by the batch object that Lightning hands to every callback of the step. A subclass with
    its own ``on_train_batch_end`` is not a member: it trains its probe itself.
    """
    waiting = getattr(caller, "_grouped_output", None)
    if waiting is not None:
        caller._grouped_output = None  # type: ignore[attr-defined]  # set on members by the step's first probe
        if waiting[0] is batch:
            return waiting[1], waiting[2]
    members = _train_group_members(trainer, caller)
    inputs = [member._checked_features_and_targets(outputs, batch) for member in members]
    outs = ProbeGroup([member.probe for member in members]).train_step(inputs)
    mine: tuple[StepOutput, int] | None = None
    for member, (_, targets), out in zip(members, inputs, outs, strict=True):
        batch_size = int(targets.shape[0]) if targets.ndim else 1
        if member is caller:
            mine = (out, batch_size)
        else:
            member._grouped_output = (batch, out, batch_size)  # type: ignore[attr-defined]
    assert mine is not None
    return mine


def _train_group_members(trainer: pl.Trainer, caller: OnlineProbe) -> list[OnlineProbe]:
    """The OnlineProbes of ``trainer`` that train in ``caller``'s group this step, in callback order."""
    shares = OnlineProbe.on_train_batch_end
    callbacks = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning's callback connector
    members = [
        cb
        for cb in callbacks
        if isinstance(cb, OnlineProbe)
        and cb._probe is not None
        and cb.own_data is None
        and type(cb).on_train_batch_end is shares
        and getattr(cb, "_grouped_output", None) is None
    ]
    return members if caller in members else [*members, caller]
