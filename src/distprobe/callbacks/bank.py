"""`OnlineProbeBank`: a grid of linear heads over one or more feature sources, trained as one fused step."""

from __future__ import annotations

import logging
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from typing_extensions import override

from distprobe import keys
from distprobe.bank import BankConfig, ProbeBank
from distprobe.bank.checks import first_batch_problem
from distprobe.bank.config import Normalization
from distprobe.bank.metrics_set import BankMetrics, logged_keys
from distprobe.callbacks.cadence import logs_this_step, values_already_reduced
from distprobe.callbacks.own_data import FeatureFn, draw_features, eval_batches, own_data_of
from distprobe.callbacks.registry import check_strategy_keeps_probes_out, registry
from distprobe.callbacks.trainable import optimizer_steps_of_fit
from distprobe.engine.checks import raise_if_any_rank_failed, world_check_group
from distprobe.engine.clean_exit import settle_gloo_workers_at_exit
from distprobe.features.lookup import MissingKeyError, lookup
from distprobe.features.tap_inputs import TapInputs, check_input_spec
from distprobe.metrics.exact import dataloader_at, valid_in_loader_batch
from distprobe.strategies.groups import data_parallel_group

log = logging.getLogger(__name__)


class OnlineProbeBank(Callback):
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
        metrics: Top-k accuracies per head: ``("top1", "top5")`` or a ``{name: k}`` dict.
        in_features: Feature size (one int, or per source); None: read from the first batch.
        selection_fraction: Share of validation samples that choose the best head; the rest report it.
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
        data: Any = None,
        val_data: Any = None,
        every_n_steps: int = 1,
        features: FeatureFn | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(target, str) or not target:
            raise ValueError(f"bank '{name}': argument 'target' got {target!r}; expected a non-empty key string.")
        self.name = name
        self.target = target
        self.config = BankConfig(
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
        )
        for source in self.config.inputs:
            check_input_spec(source, probe_name=name)
        self.metrics = BankMetrics(self.config, len(self.config.heads()))
        self.own_data = own_data_of(name, data, val_data, features, every_n_steps)
        self._tap_inputs: TapInputs | None = None
        self._bank: ProbeBank | None = None
        self._pending_state: dict[str, Any] | None = None
        self._trainer: pl.Trainer | None = None
        self._pl_module: pl.LightningModule | None = None
        self._checked_first_batch = False
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
        if self._bank is None:
            raise RuntimeError(
                f"bank '{self.name}': its heads do not exist yet; they are created at setup when 'in_features' is "
                "given, else from the first training batch."
            )
        return self._bank

    def head(self, head_id: str) -> nn.Module:
        """That head as a plain module with its current weights (an ``nn.Linear`` when it has no normalization)."""
        return self.bank.head(head_id)

    @property
    def best_head_id(self) -> str | None:
        """The head chosen at the last validation (on the selection split)."""
        return None if self._bank is None else self._bank.best_head_id

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    # --- set-up -------------------------------------------------------------------------------------------------

    def _register_metrics(self, pl_module: pl.LightningModule) -> None:
        metrics = registry(pl_module, "callbacks_metrics")
        if isinstance(metrics, nn.Module):
            metrics[self.name] = nn.ModuleDict({k.replace("/", "_"): m for k, m in self.metrics.named()})
        else:
            metrics[self.name] = self.metrics

    def _build(self, in_features: dict[str, int]) -> None:
        trainer, pl_module = self._trainer, self._pl_module
        assert trainer is not None and pl_module is not None, "built after setup"
        self._bank = ProbeBank.build(
            self.config,
            in_features=in_features,
            dp_group=data_parallel_group(trainer.strategy),
            device=trainer.strategy.root_device,
            # Lengths come later (`set_total_steps`): Lightning's step estimate loads the train dataloader, and asked
            # at setup it would make Lightning skip restoring a stateful loader's position.
            total_steps=None,
            metrics=self.metrics,
        )
        modules = registry(pl_module, "callbacks_modules")
        if self.name in modules and modules[self.name] is not self._bank.heads:
            raise ValueError(
                f"bank '{self.name}': argument 'name' is already used by another callback on "
                f"{type(pl_module).__name__}; give each probe and bank a unique name."
            )
        modules[self.name] = self._bank.heads
        if self._pending_state is not None:
            self._bank.load_state_dict(self._pending_state)
            self._pending_state = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer, self._pl_module = trainer, pl_module
        self._register_metrics(pl_module)
        modules = registry(pl_module, "callbacks_modules")
        if self._bank is None and self.name in modules:
            raise ValueError(
                f"bank '{self.name}': argument 'name' is already used by another callback on "
                f"{type(pl_module).__name__}; give each probe and bank a unique name."
            )
        check_strategy_keeps_probes_out(trainer, pl_module, self.name)
        settle_gloo_workers_at_exit()
        if self.own_data is not None:
            # Its taps watch its own forward only.
            self.own_data.shard_over(data_parallel_group(trainer.strategy))
        else:
            # Sources may name submodules (feature taps, docs/taps.md): one shared hook per module for every callback.
            self._tap_inputs = TapInputs.of(pl_module)
            for source in self.config.inputs:
                self._tap_inputs.request(self, source, probe_name=self.name)
        if self._bank is None:
            sizes = self._saved_or_configured_sizes()
            if sizes is not None:
                self._build(sizes)

    def _saved_or_configured_sizes(self) -> dict[str, int] | None:
        if self._pending_state is not None:
            return dict(self._pending_state["in_features"])
        sizes = {s: self.config.in_features_of(s) for s in self.config.inputs}
        if any(v is None for v in sizes.values()):
            return None
        return {s: int(v) for s, v in sizes.items() if v is not None}

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The train loader is set up (and restored) by now: the step estimate no longer disturbs its restore.
        if self._bank is not None:
            self._bank.set_total_steps(optimizer_steps_of_fit(trainer, self.config.accumulate_grad_batches))

    # --- training -----------------------------------------------------------------------------------------------

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

    def _lookup(self, outputs: Any, batch: Any) -> tuple[list[torch.Tensor], torch.Tensor]:
        if self._tap_inputs is not None:
            features = [self._tap_inputs.read(s, outputs, batch, probe_name=self.name) for s in self.config.inputs]
        else:
            features = [lookup(s, outputs, batch, probe_name=self.name, argument="input") for s in self.config.inputs]
        targets = lookup(self.target, outputs, batch, probe_name=self.name, argument="target")
        return features, targets

    def _first_batch(self, read: Any) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Read and check the first batch on every rank at once (a bad key must not hang the other ranks)."""
        group = world_check_group()
        problem = None
        try:
            features, targets = read()
            problem = first_batch_problem(self.name, self.config.inputs, features, targets, self.config.num_classes)
        except MissingKeyError as err:
            problem = str(err)
        except Exception as err:  # noqa: BLE001 - any failure must reach every rank, or the others hang
            problem = f"bank '{self.name}': reading input and target failed: {err!r}"
        raise_if_any_rank_failed(problem, group)
        if self._bank is None:
            self._build({s: int(f[0].numel()) for s, f in zip(self.config.inputs, features, strict=True)})
            # Built after on_train_start: the schedule's length now (a collective, every rank at this first batch).
            assert self._trainer is not None, "the first batch comes after setup"
            self.bank.set_total_steps(optimizer_steps_of_fit(self._trainer, self.config.accumulate_grad_batches))
        self._checked_first_batch = True
        return features, targets

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        own = self.own_data
        if own is not None:
            # Every ``every_n_steps`` main batches (the same count on every rank): a step on the bank's own batch.
            if not own.due():
                return

            def read() -> tuple[list[torch.Tensor], torch.Tensor]:
                assert own is not None
                return draw_features(own, trainer, pl_module, self.config.inputs, self.target)
        else:

            def read() -> tuple[list[torch.Tensor], torch.Tensor]:
                return self._lookup(outputs, batch)

        features, targets = read() if self._checked_first_batch else self._first_batch(read)
        out = self.bank.train_step(features, targets)
        _store(keys.predictions(self.name), out.preds, outputs, batch)
        if logs_this_step(trainer, batch_idx):
            values = {
                keys.key(keys.TRAIN, self.name, keys.LOSS): out.loss.mean(),
                keys.key(keys.TRAIN, self.name, keys.SKIPPED_STEPS): self.bank.skipped_steps.sum().float(),
            }
            pl_module.log_dict(values, on_step=True, on_epoch=False, batch_size=targets.shape[0])

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._bank is None:
            return
        values = logged_keys(self._bank.compute_train_metrics(), "train", self.name)
        self._bank.reset_train_metrics()
        with values_already_reduced():
            pl_module.log_dict(values, on_step=False, on_epoch=True, sync_dist=False)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._bank is not None:
            self._bank.settle()

    # --- validation ---------------------------------------------------------------------------------------------

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._bank is not None:
            self._bank.start_eval_epoch()
        if self.own_data is not None and self._bank is not None and not trainer.sanity_checking:
            for features, targets, num_valid in eval_batches(
                self.own_data, trainer, pl_module, self.config.inputs, self.target
            ):
                self._bank.eval_step(features, targets, num_valid=num_valid)

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
        if self._bank is None or self.own_data is not None:  # no heads yet (sanity check), or its own val data
            return
        features, targets = self._lookup(outputs, batch)
        loader = dataloader_at(trainer.val_dataloaders, dataloader_idx)
        num_valid = valid_in_loader_batch(loader, batch_idx, targets.shape[0])
        preds = self._bank.eval_step(features, targets, num_valid=num_valid)
        _store(keys.predictions(self.name), preds, outputs, batch)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._bank is None:
            return
        values = logged_keys(self._bank.compute_eval_metrics(), "eval", self.name)
        if values and not trainer.sanity_checking:
            with values_already_reduced():
                pl_module.log_dict(values, on_step=False, on_epoch=True, sync_dist=False)

    # --- checkpoints and exit -----------------------------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        state = self._bank.state_dict() if self._bank is not None else dict(self._pending_state or {})
        if self.own_data is not None:
            state = {**state, "own_data": self.own_data.state_dict()}
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied here, not in on_fit_start: under FSDP and DeepSpeed Lightning restores callbacks after it.
        state_dict = dict(state_dict)
        own = state_dict.pop("own_data", None)
        if own is not None and self.own_data is not None:
            self.own_data.load_state_dict(own)
        if self._bank is not None:
            self._bank.load_state_dict(state_dict)
            return
        self._pending_state = state_dict
        if self._trainer is not None and self._pl_module is not None and state_dict:
            self._build(dict(state_dict["in_features"]))

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._bank is not None:
            self._bank.settle()
        if self._tap_inputs is not None:
            self._tap_inputs.release(self)
            self._tap_inputs = None
        if self.own_data is not None:
            self.own_data.release()


def _store(key: str, preds: torch.Tensor, outputs: Any, batch: Any) -> None:
    for container in (batch, outputs):
        if isinstance(container, MutableMapping):
            container[key] = preds
