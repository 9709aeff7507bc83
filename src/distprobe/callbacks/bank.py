"""`OnlineProbeBank`: a grid of linear heads over one or more feature sources, trained as one fused step."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import nn
from typing_extensions import override

from distprobe import keys
from distprobe.bank import BankConfig, ProbeBank
from distprobe.bank.checks import feature_sizes, first_batch_problem, size_problem
from distprobe.bank.config import Normalization
from distprobe.bank.metric_kinds import build_metrics
from distprobe.callbacks.base import Stage, require_keys
from distprobe.callbacks.cadence import StepValues, logs_this_step
from distprobe.callbacks.own_data import FeatureFn, own_data_of
from distprobe.callbacks.registry import check_strategy_keeps_probes_out, claim, registry
from distprobe.callbacks.selection import SelectsOnSplit
from distprobe.callbacks.trainable import optimizer_steps_of_fit
from distprobe.engine.checks import raise_if_any_rank_failed, world_check_group
from distprobe.engine.precision import MatmulPrecision

log = logging.getLogger(__name__)


class OnlineProbeBank(SelectsOnSplit):
    """Train K linear heads (every source x normalization x lr x weight decay) and report the best one.

    The heads train as one fused operation: one batched matmul per feature source, one cross-entropy call for all
    heads, one all-reduce of their single flat gradient per optimizer step (overlapped with the next forward).
    Each head's update is the one it would get as a separate `OnlineProbe` with its hyper-parameters.

    Args:
        module: The LightningModule to probe (None: taken at ``setup``).
        name: Unique name; keys logs, checkpoint state and ``pl_module.callbacks_modules[name]``.
        input: A key (or a list of keys) of features in the step's outputs or batch, as for `OnlineProbe`.
        target: Key of the class labels.
        num_classes: Number of classes.
        lr: Learning rates of the grid.
        weight_decay: Weight decays of the grid.
        normalization: Per head, None or ``"batchnorm"`` (BatchNorm without affine before the head, MAE's protocol).
        optimizer: ``"SGD"`` (momentum 0.9), ``"AdamW"`` or ``"LARS"``, or a ``{"type": ..., **options}`` dict.
        scheduler: As for `OnlineProbe`; every head's rate follows it from its own lr.
        accumulate_grad_batches: Micro-batches per optimizer step.
        gradient_clip_val: Clip threshold of each head's gradient; None disables clipping.
        gradient_clip_algorithm: ``"norm"`` or ``"value"``.
        metrics: What each head reports; the first one listed chooses the best head. Top-k accuracies
            (``("top1", "top5")`` or a ``{name: k}`` dict); for ``multilabel=True`` among ``mAP``, ``f1_micro``,
            ``f1_macro``; for ``head="dense"`` among ``mIoU``, ``pixel_acc`` (all of them, mAP or mIoU first, by
            default).
        in_features: Feature size (one int, or per source); None: read from the first batch.
        selection_fraction: Share of validation samples that choose the best head; the rest report it. A sample's
            share follows its position in its validation dataloader (`SelectsOnSplit`).
        head: The head family: ``"linear"``, ``"attentive"`` (V-JEPA's attentive probe over ``(B, N, D)`` tokens,
            docs/attentive.md) or ``"dense"`` (linear segmentation heads on patch tokens, ``(B, H, W)`` mask
            targets, mIoU; docs/dense.md).
        head_options: The family's options (attentive: ``num_queries``, ``depth``, ``num_heads``, ``mlp_ratio``;
            dense: ``grid``, ``ignore_index``, ``loss_chunk_heads``, ``loss_chunk_elements``, ``loss_resolution``,
            ``loss_grid_scale``, ``samples_per_step``; online defaults bound the cost, docs/dense.md).
        matmul_precision: The heads' float32 matmuls on CUDA: ``"high"`` (TF32, cheaper), ``"highest"`` (IEEE
            float32), or None: the family's default, TF32 for linear heads (their accuracy measured unchanged by
            it), the process's setting for attentive and dense heads. The backbone's precision is left as it is.
        multilabel: Targets are ``(B, num_classes)`` multi-hot: BCE, mAP and F1 (docs/multilabel.md).
        data: A labeled DataLoader of the bank's own, as for `OnlineProbe` (docs/own-data.md).
        val_data: The bank's own validation DataLoader, evaluated exactly at each validation epoch.
        every_n_steps: With ``data``: one bank step every ``every_n_steps`` main training batches.
        features: With ``data``: ``features(pl_module, batch)`` returning a tensor (one source) or a dict keyed by
            the source names; sources naming submodules are tapped from this forward.

    Logs, per head, ``eval/{name}/{head_id}_{metric}`` (all validation samples) and, for the best head,
    ``eval/{name}_best_{metric}`` (report split) and ``eval/{name}_best_head`` (its index in `head_ids`); at train
    epoch ends ``train/{name}/{head_id}_{metric}``, ``train/{name}/{head_id}_loss``, ``train/{name}_loss_epoch``
    and ``train/{name}_bad_batches/{reason}``; ``train/{name}_loss`` (the mean over heads) on logging steps.

    Example:
        >>> bank = OnlineProbeBank(
        ...     None, name="grid", input="embedding", target="label", num_classes=10,
        ...     lr=[1e-3, 1e-2, 1e-1], weight_decay=[0.0, 1e-4], normalization=[None, "batchnorm"],
        ... )
        >>> len(bank.head_ids)
        12
    """

    def __init__(
        self,
        module: pl.LightningModule | None,
        name: str,
        input: str | Sequence[str],  # noqa: A002 - the reference API's name
        target: str,
        num_classes: int,
        lr: Sequence[float] = (1e-3, 1e-2, 1e-1),
        weight_decay: Sequence[float] = (0.0,),
        normalization: Sequence[Normalization] | Normalization = (None,),
        optimizer: Any = "SGD",
        scheduler: Any = None,
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: Literal["norm", "value"] = "norm",
        metrics: Any = ("top1",),
        in_features: int | Mapping[str, int] | None = None,
        selection_fraction: float = 0.2,
        *,
        head: str = "linear",
        head_options: Mapping[str, Any] | None = None,
        matmul_precision: MatmulPrecision | None = None,
        multilabel: bool = False,
        data: Any = None,
        val_data: Any = None,
        every_n_steps: int = 1,
        features: FeatureFn | None = None,
    ) -> None:
        require_keys("bank", name, target=target)
        config = BankConfig(
            name=name,
            inputs=[input] if isinstance(input, str) else list(input),
            num_classes=num_classes,
            lr=lr,
            weight_decay=weight_decay,
            normalization=[normalization] if normalization is None or isinstance(normalization, str) else normalization,
            optimizer=optimizer,
            scheduler=scheduler,
            accumulate_grad_batches=accumulate_grad_batches,
            gradient_clip_val=gradient_clip_val,
            gradient_clip_algorithm=gradient_clip_algorithm,
            metrics=metrics,
            in_features=in_features,
            selection_fraction=selection_fraction,
            family=head,
            head_options=head_options,
            multilabel=multilabel,
            matmul_precision=matmul_precision,
        )
        own_data = own_data_of(name, data, val_data, features, every_n_steps, kind="bank")
        super().__init__(name, config.inputs, target, own_data)
        self.config = config
        self.metrics = build_metrics(self.config)
        self._pl_module: pl.LightningModule | None = None
        self._step_values = StepValues()
        self._sizes_checked = False
        """Whether a validation batch before any training batch passed `_size_problem`."""
        if module is not None:
            self._register_metrics(module)

    # --- what users read ----------------------------------------------------------------------------------------

    @property
    def head_ids(self) -> list[str]:
        """Readable ids of the heads, such as ``"embedding/lr=0.01/wd=0/norm=none"``, in the bank's order."""
        return [h.head_id for h in self.config.heads()]

    @property
    def bank(self) -> ProbeBank:
        """The engine (from ``setup`` on with ``in_features``, else from the first training batch)."""
        return self.sized_engine("bank", "heads do")

    def head(self, head_id: str) -> nn.Module:
        """That head as a plain module with its current weights (an ``nn.Linear`` when it has no normalization)."""
        return self.bank.head(head_id)

    @property
    def best_head_id(self) -> str | None:
        """The head chosen at the last validation (on the selection split)."""
        return None if self._engine is None else self._engine.best_head_id

    # --- set-up -------------------------------------------------------------------------------------------------

    def _register_metrics(self, pl_module: pl.LightningModule) -> None:
        metrics = registry(pl_module, "callbacks_metrics")
        if isinstance(metrics, nn.Module):
            metrics[self.name] = nn.ModuleDict({k.replace("/", "_"): m for k, m in self.metrics.named()})
        else:
            metrics[self.name] = self.metrics

    @override
    def build_engine(self, size: Any) -> None:
        assert self._where is not None and self._pl_module is not None, "built after setup"
        dp_group, device = self._where
        bank = ProbeBank.build(
            self.config,
            in_features=dict(size),
            dp_group=dp_group,
            device=device,
            # Lengths come later (`set_total_steps`): Lightning's step estimate loads the train dataloader, and asked
            # at setup it would make Lightning skip restoring a stateful loader's position.
            total_steps=None,
            metrics=self.metrics,
        )
        claim(self._pl_module, self.name, bank.heads)[self.name] = bank.heads
        bank.name_target(str(self.target))  # `require_keys` made it a key
        self.engine_ready(bank)

    @override
    def set_up(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pl_module = pl_module
        self._register_metrics(pl_module)
        if self._engine is None:
            claim(pl_module, self.name)
        check_strategy_keeps_probes_out(trainer, pl_module, self.name)

    @override
    def known_size(self) -> Any:
        sizes = {s: self.config.in_features_of(s) for s in self.config.inputs}
        return None if any(v is None for v in sizes.values()) else {s: int(v) for s, v in sizes.items() if v}

    @override
    def size_of(self, read: Any) -> Any:
        return feature_sizes(self.config, read[0])

    @override
    def add_to(self, probe_set: Any) -> None:
        probe_set.add_bank(self.config, self.bank)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # The train loader is set up (and restored) by now: the step estimate no longer disturbs its restore.
        if self._engine is not None:
            self.bank.set_total_steps(self._steps_of_fit(trainer))

    def _steps_of_fit(self, trainer: pl.Trainer) -> int | None:
        return optimizer_steps_of_fit(trainer, self.config.accumulate_grad_batches, self.batches_per_step)

    # --- training -----------------------------------------------------------------------------------------------

    @override
    def as_read(self, features: list[torch.Tensor], targets: torch.Tensor | None) -> Any:
        return features, targets

    @override
    def first_batch_problem(self, read: Any) -> str | None:
        features, targets = read
        return first_batch_problem(
            self.name,
            self.config.inputs,
            features,
            targets,
            self.config.num_classes,
            config=self.config,
            built=self._built_sizes(),
        )

    def _built_sizes(self) -> dict[str, int] | None:
        """The feature sizes of heads built before the first batch (``in_features``, a checkpoint's), or None."""
        return None if self._engine is None else dict(self.bank.heads.in_features)

    @override
    def eval_read(self, trainer: pl.Trainer, outputs: Any, batch: Any) -> Any:
        read = super().eval_read(trainer, outputs, batch)
        if not self.checked_first_batch and not self._sizes_checked:
            # Validation before any training batch (the sanity check, trainer.validate alone): sizes only, decided
            # on every rank at once; the targets' rule there stays validation's (bad samples are left out).
            raise_if_any_rank_failed(
                size_problem(self.name, self.config, read[0], self._built_sizes()), world_check_group()
            )
            self._sizes_checked = True
        return read

    @override
    def first_batch_passed(self, trainer: pl.Trainer, read: Any) -> None:
        built_now = self._engine is None
        super().first_batch_passed(trainer, read)
        if built_now:
            # Built after on_train_start: the schedule's length now (a collective, every rank at this first batch).
            self.bank.set_total_steps(self._steps_of_fit(trainer))

    @override
    def after_train_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch_idx: int, out: Any) -> None:
        if out is None or not logs_this_step(trainer, batch_idx):
            self._step_values.skipped(trainer)  # a bank on its own data trains every every_n_steps batches
            return
        values = {
            keys.key(keys.TRAIN, self.name, keys.LOSS): out.loss.mean(),
            keys.key(keys.TRAIN, self.name, keys.SKIPPED_STEPS): self.bank.skipped_steps.sum().float(),
        }
        pl_module.log_dict(values, on_step=True, on_epoch=False, batch_size=out.preds.shape[0])
        self._step_values.logged(trainer, values)

    @override
    def reset_epoch(self, stage: Stage) -> None:
        if stage == "train":
            self.bank.reset_train_metrics()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._engine is not None:
            self.bank.settle()

    # --- validation and exit ------------------------------------------------------------------------------------

    @override
    def start_eval_epoch(self) -> None:
        self.bank.start_eval_epoch()

    @override
    def eval_step(self, read: Any, num_valid: int | None) -> torch.Tensor | None:
        return self.evaluate_on_split(self.bank, read, num_valid)

    @override
    def release_engine(self) -> None:
        if self._engine is not None:
            self.bank.settle()
