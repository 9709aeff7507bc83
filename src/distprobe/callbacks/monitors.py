"""`EmbeddingMonitor`: label-free monitors (RankMe, LiDAR) of a model's features, logged from Lightning."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torchmetrics import Metric
from typing_extensions import override

from distprobe import keys
from distprobe.callbacks.cadence import values_already_reduced
from distprobe.engine.checks import raise_if_any_rank_failed, world_check_group
from distprobe.engine.clean_exit import settle_gloo_workers_at_exit
from distprobe.features.dtensor import whole
from distprobe.features.lookup import MissingKeyError, lookup
from distprobe.features.tap_inputs import TapInputs, check_input_spec
from distprobe.metrics.exact import dataloader_at, valid_in_loader_batch
from distprobe.metrics.flat_sync import compute_metrics_synced
from distprobe.monitors.functional import occurrence_index
from distprobe.monitors.metrics import MONITORS, LiDAR, build_monitor
from distprobe.strategies.groups import data_parallel_group

Stage = Literal["train", "val"]


class EmbeddingMonitor(Callback):
    """Log label-free measures of an embedding: RankMe and LiDAR, exact over every rank, with no feature gathered.

    Features are read as `OnlineProbe` reads them (a key of the step's outputs, of the batch, or a submodule tap)
    and summed on their device with no host sync. At each epoch's end (or every ``every_n_steps`` training
    batches) the monitors of every `EmbeddingMonitor` of the trainer are computed with one flat all-reduce.

    Args:
        module: The LightningModule to monitor (None: taken at ``setup``); kept for the reference API's shape.
        name: Unique name; keys the logs.
        input: Key of the features (``(B, D)`` rows or ``(B, V, D)`` views), or a submodule to tap, as for
            `OnlineProbe`.
        metrics: Any of ``"rankme"`` and ``"lidar"``.
        sample_key: Key of each row's source-sample id (rows sharing one are views of one sample), for LiDAR on
            ``(rows, D)`` features.
        view_key: Key of each row's view index, for views concatenated one after another (``[view 0 of every
            sample, view 1 of every sample, ...]``): the i-th row of each view is sample i. ``(B, V, D)`` features
            need neither key.
        stage: ``"train"``, ``"val"`` or both (a sequence).
        every_n_steps: Log the training monitors over windows of this many training batches (counted across
            epochs) instead of once per epoch.
        dim: The embedding size; None: read from the first batch.
        centered: RankMe of the centred features (the covariance's spectrum) instead of the paper's raw embeddings.

    LiDAR needs all views of a sample in the same batch on the same rank. Logs ``train/{name}_{metric}`` and
    ``eval/{name}_{metric}``. In validation, the samples a distributed sampler repeats to pad a rank are left out
    for ``(B, D)`` and ``(B, V, D)`` features and with ``view_key``; with ``sample_key`` they are kept.

    Example:
        >>> monitor = EmbeddingMonitor(None, "backbone", input="embedding", metrics=("rankme", "lidar"),
        ...                            view_key="view", stage=("train", "val"))
    """

    def __init__(
        self,
        module: pl.LightningModule | None,
        name: str,
        input: str,  # noqa: A002 - the reference API's name
        metrics: str | Sequence[str] = ("rankme",),
        *,
        sample_key: str | None = None,
        view_key: str | None = None,
        stage: Stage | Sequence[Stage] = "train",
        every_n_steps: int | None = None,
        dim: int | None = None,
        centered: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(input, str) or not input:
            raise ValueError(f"monitor '{name}': argument 'input' got {input!r}; expected a non-empty key string.")
        check_input_spec(input, probe_name=name)
        kinds = (metrics,) if isinstance(metrics, str) else tuple(metrics)
        unknown = [k for k in kinds if k not in MONITORS]
        if unknown or not kinds:
            raise ValueError(
                f"monitor '{name}': argument 'metrics' got {metrics!r}; expected some of {sorted(MONITORS)}."
            )
        stages = (stage,) if isinstance(stage, str) else tuple(stage)
        if not stages or any(s not in keys.LOG_STAGE for s in stages):
            raise ValueError(f"monitor '{name}': argument 'stage' got {stage!r}; expected 'train', 'val' or both.")
        if every_n_steps is not None and (not isinstance(every_n_steps, int) or every_n_steps < 1):
            raise ValueError(f"monitor '{name}': argument 'every_n_steps' got {every_n_steps!r}; expected an int >= 1.")
        if sample_key is not None and view_key is not None:
            raise ValueError(f"monitor '{name}': got both 'sample_key' and 'view_key'; pass the one the batch holds.")
        self.name = name
        self.input = input
        self.kinds = kinds
        self.sample_key = sample_key
        self.view_key = view_key
        self.stages = stages
        self.every_n_steps = every_n_steps
        self.centered = centered
        self.metrics: dict[str, dict[str, Metric]] = {}
        """Per stage, the monitors by name (built at setup when ``dim`` is given, else at the first batch)."""
        self.train_batches = 0
        """Training batches seen, across epochs: the ``every_n_steps`` windows count them."""
        self._dim = dim
        self._values: dict[str, dict[str, torch.Tensor] | None] = {"train": None, "val": None}
        self._tap_inputs: TapInputs | None = None
        self._group: Any = None
        self._device = torch.device("cpu")
        self._checked = False

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    @override
    def state_dict(self) -> dict[str, Any]:
        # The summed states are rank-local and only rank 0's state is written: a resumed run starts a new epoch's
        # (or window's) sums, keeping only where the windows fall.
        return {"train_batches": self.train_batches}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train_batches = int(state_dict.get("train_batches", 0))

    # --- set-up -------------------------------------------------------------------------------------------------

    def _build(self, dim: int) -> None:
        for stage in self.stages:
            options = {"centered": self.centered}
            self.metrics[stage] = {
                kind: build_monitor(kind, dim, **(options if kind == "rankme" else {})).to(self._device)
                for kind in self.kinds
            }

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._group = data_parallel_group(trainer.strategy)
        self._device = trainer.strategy.root_device
        settle_gloo_workers_at_exit()  # see engine/clean_exit.py
        if self._dim is not None and not self.metrics:
            self._build(self._dim)
        for metrics in self.metrics.values():
            for metric in metrics.values():
                metric.to(self._device)
        self._tap_inputs = TapInputs.of(pl_module)
        self._tap_inputs.request(self, self.input, probe_name=self.name)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._tap_inputs is not None:
            self._tap_inputs.release(self)
            self._tap_inputs = None

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._tap_inputs is not None and "train" in self.stages:
            self._tap_inputs.arm(pl_module)

    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._tap_inputs is not None and "val" in self.stages:
            self._tap_inputs.arm(pl_module)

    # --- reading a step's features ------------------------------------------------------------------------------

    def _read(self, outputs: Any, batch: Any) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        if self._tap_inputs is not None:
            features = self._tap_inputs.read(self.input, outputs, batch, probe_name=self.name)
        else:
            features = lookup(self.input, outputs, batch, probe_name=self.name, argument="input")
        features = whole(features)  # a DTensor (tensor parallelism): the whole batch's features
        sample_ids = view_ids = None
        if self.sample_key is not None:
            sample_ids = lookup(self.sample_key, outputs, batch, probe_name=self.name, argument="sample_key")
        if self.view_key is not None:
            view_ids = lookup(self.view_key, outputs, batch, probe_name=self.name, argument="view_key")
        return features, sample_ids, view_ids

    def _problem(self, features: Any, sample_ids: Any, view_ids: Any) -> str | None:
        """What is wrong with the first batch, or None (shapes only: no host sync)."""
        where = f"monitor '{self.name}': input {self.input!r}"
        if not isinstance(features, torch.Tensor) or not features.is_floating_point():
            return f"{where} is a {type(features).__name__}; expected a floating-point tensor of features."
        if features.ndim not in (2, 3):
            return f"{where} has shape {tuple(features.shape)}; expected (batch, dim) or (batch, views, dim)."
        if self._dim is not None and features.shape[-1] != self._dim:
            return f"{where} has {features.shape[-1]} features; the monitor was built with dim={self._dim}."
        ids = sample_ids if sample_ids is not None else view_ids
        if "lidar" in self.kinds and features.ndim == 2 and ids is None:
            return (
                f"{where} holds (rows, dim) features and LiDAR has no way to group them: pass sample_key (each row's "
                "source-sample id) or view_key (each row's view index), or return (samples, views, dim) features."
            )
        if ids is not None and (not isinstance(ids, torch.Tensor) or ids.numel() != features.shape[0]):
            got = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
            return f"monitor '{self.name}': sample or view ids of shape {got}; expected one per row of {self.input!r}."
        return None

    def _checked_read(self, outputs: Any, batch: Any) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Read the step's tensors; on the first batch, check them collectively across all ranks."""
        if self._checked:
            return self._read(outputs, batch)
        group = world_check_group()
        try:
            read = self._read(outputs, batch)
        except MissingKeyError as err:
            raise_if_any_rank_failed(str(err), group)
            raise AssertionError("unreachable: the call above raises") from err
        raise_if_any_rank_failed(self._problem(*read), group)
        self._checked = True
        return read

    def _update(self, stage: str, outputs: Any, batch: Any, num_valid: int | None = None) -> None:
        features, sample_ids, view_ids = self._checked_read(outputs, batch)
        features = features.detach()
        if not self.metrics:
            self._dim = int(features.shape[-1])
            self._build(self._dim)
        if view_ids is not None:
            sample_ids = occurrence_index(view_ids.to(features.device))
        if num_valid is not None and sample_ids is None:
            features = features[:num_valid]
        elif num_valid is not None and sample_ids is not None:
            keep = sample_ids < num_valid  # a boolean index: one host sync, only on a padded last batch
            features, sample_ids = features[keep], sample_ids[keep]
        for metric in self.metrics[stage].values():
            if isinstance(metric, LiDAR):
                metric.update(features, sample_ids)
            else:
                metric.update(features)

    # --- hooks --------------------------------------------------------------------------------------------------

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if "train" not in self.stages:
            return
        self._update("train", outputs, batch)
        self.train_batches += 1
        monitors = _monitors(trainer, self)
        if monitors[-1] is not self:
            return
        # The last monitor of the step computes every windowed monitor due now: all have their batch by then. The
        # counts are the same on every rank, so every rank joins the same all-reduce.
        due = [m for m in monitors if m.every_n_steps is not None and m.train_batches % m.every_n_steps == 0]
        if not due:
            return
        values = _compute(due, "train")
        for monitor, logged in zip(due, values, strict=True):
            monitor._reset("train")
            with values_already_reduced():
                pl_module.log_dict(logged, on_step=True, on_epoch=False, sync_dist=False)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._values["train"] = None
        if self.every_n_steps is None:
            self._reset("train")

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "train" in self.stages and self.every_n_steps is None:
            self._log_epoch(trainer, pl_module, "train")

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._values["val"] = None
        self._reset("val")

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
        if "val" not in self.stages:
            return
        # Samples a distributed sampler repeats to pad this rank are left out: each sample counts exactly once.
        loader = dataloader_at(trainer.val_dataloaders, dataloader_idx)
        num_valid = None if self.sample_key is not None else _real_samples_in_batch(loader, batch_idx)
        self._update("val", outputs, batch, num_valid)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "val" in self.stages:
            self._log_epoch(trainer, pl_module, "val", log=not trainer.sanity_checking)

    def _log_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, log: bool = True) -> None:
        if self._values[stage] is None:
            members = [m for m in _monitors(trainer, self, stage) if m._values[stage] is None]
            if stage == "train":
                members = [m for m in members if m.every_n_steps is None]
            for member, values in zip(members, _compute(members, stage), strict=True):
                member._values[stage] = values
        values = self._values[stage] or {}
        self._reset(stage)
        if values and log:
            with values_already_reduced():
                pl_module.log_dict(values, on_step=False, on_epoch=True, sync_dist=False)

    def _reset(self, stage: str) -> None:
        for metric in self.metrics.get(stage, {}).values():
            metric.reset()


def _real_samples_in_batch(loader: Any, batch_idx: int) -> int | None:
    """How many leading samples of this validation batch are real; None when all are (every batch but a padded one).

    Host arithmetic only: the batch's own length is not read from the device.
    """
    num_valid = valid_in_loader_batch(loader, batch_idx, 1 << 62)
    batch_size = getattr(loader, "batch_size", None)
    if num_valid is None or (isinstance(batch_size, int) and num_valid >= batch_size):
        return None
    return num_valid


def _monitors(trainer: pl.Trainer, caller: EmbeddingMonitor, stage: str = "train") -> list[EmbeddingMonitor]:
    """The EmbeddingMonitors of ``trainer`` watching ``stage``, in callback order (the same on every rank)."""
    callbacks = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning's callback connector
    found = [cb for cb in callbacks if isinstance(cb, EmbeddingMonitor) and stage in cb.stages]
    return found if caller in found else [*found, caller]


def _compute(monitors: Sequence[EmbeddingMonitor], stage: str) -> list[dict[str, torch.Tensor]]:
    """Each monitor's logged values, with one flat all-reduce per data-parallel group for all of them."""
    by_group: dict[int, list[EmbeddingMonitor]] = {}
    for monitor in monitors:
        by_group.setdefault(id(monitor._group), []).append(monitor)
    values: dict[int, dict[str, torch.Tensor]] = {}
    for members in by_group.values():
        metrics = [(m, kind, metric) for m in members for kind, metric in m.metrics.get(stage, {}).items()]
        computed = compute_metrics_synced([metric for _, _, metric in metrics], members[0]._group)
        for (member, kind, _), value in zip(metrics, computed, strict=True):
            logged = keys.key(keys.LOG_STAGE[stage], member.name, kind)
            values.setdefault(id(member), {})[logged] = value.float()
    return [values.get(id(m), {}) for m in monitors]
