"""`OnlineProbe`: the reference online-probe API, trained by distprobe's engine."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import nn
from typing_extensions import override

from distprobe import keys
from distprobe.callbacks.base import require_keys
from distprobe.callbacks.cadence import BadDataWarnings, StepValues, logs_this_step
from distprobe.callbacks.own_data import FeatureFn, own_data_of
from distprobe.callbacks.trainable import TrainableCallback
from distprobe.engine.factories import build_module


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
        require_keys("probe", name, input=input, target=target)
        super().__init__(
            None,
            name,
            optimizer=optimizer,
            scheduler=scheduler,
            accumulate_grad_batches=accumulate_grad_batches,
            gradient_clip_val=gradient_clip_val,
            gradient_clip_algorithm=gradient_clip_algorithm,
            loss_fn=loss_fn if loss_fn is not None else loss,
            metrics=metrics,
            sources=[input],
            target=target,
            own_data=own_data_of(name, data, val_data, features, every_n_steps),
        )
        self.input = input
        self.probe_spec = probe
        self.loss_fn = loss_fn if loss_fn is not None else loss
        self.metrics_spec = metrics
        self.verbose = verbose
        """stable-pretraining's 13th argument, kept for drop-in use; distprobe's logging does not depend on it."""
        self._bad_data_warnings = BadDataWarnings()
        self._step_values = StepValues()
        if module is not None:
            self._attach(module)

    @override
    def configure_model(self, pl_module: pl.LightningModule | None) -> nn.Module:
        return build_module(self.probe_spec, owner=pl_module, probe_name=self.name)

    @override
    def after_train_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch_idx: int, out: Any) -> None:
        if out is None or not logs_this_step(trainer, batch_idx):
            self._step_values.skipped(trainer)  # a probe on its own data trains every every_n_steps batches
            return
        self._bad_data_warnings.check(self.probe)
        values = {
            keys.key(keys.TRAIN, self.name, keys.LOSS): out.loss,
            keys.key(keys.TRAIN, self.name, keys.SKIPPED_STEPS): self.probe.skipped_steps.float(),
            # Lightning's LearningRateMonitor sees only Lightning's optimizers. A device tensor filled from the host
            # float: Lightning would turn a float into one by a copy from pageable memory, a host sync on CUDA.
            keys.key(keys.HPARAMS, self.name, keys.LR): torch.full((), self.probe.current_lr(), device=out.loss.device),
        }
        batch_size = int(out.preds.shape[0]) if out.preds.ndim else 1
        pl_module.log_dict(values, on_step=True, on_epoch=False, batch_size=batch_size)
        self._step_values.logged(trainer, values)
