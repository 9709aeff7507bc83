"""`EmbeddingMonitor`: label-free monitors (RankMe, LiDAR) of a model's features, logged from Lightning."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torchmetrics import Metric
from typing_extensions import override

from distprobe import keys
from distprobe.callbacks.base import ProbeCallback, Stage, require_keys
from distprobe.callbacks.cadence import log_reduced
from distprobe.features.dtensor import whole
from distprobe.features.lookup import lookup
from distprobe.metrics.exact import valid_in_loader_batch
from distprobe.metrics.flat_sync import compute_metrics_synced
from distprobe.monitors.functional import occurrence_index
from distprobe.monitors.metrics import MONITORS, LiDAR, build_monitor
from distprobe.strategies.groups import data_parallel_group


class EmbeddingMonitor(ProbeCallback):
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

    in_probe_set = False

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
        require_keys("monitor", name, input=input)
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
        super().__init__(name, [input], None, None)
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
        self._group: Any = None
        self._device = torch.device("cpu")

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
    def set_up(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._group = data_parallel_group(trainer.strategy)
        self._device = trainer.strategy.root_device
        if self._dim is not None and not self.metrics:
            self._build(self._dim)
        for metrics in self.metrics.values():
            for metric in metrics.values():
                metric.to(self._device)

    @override
    def watches(self, stage: Stage) -> bool:
        return stage in self.stages

    # --- reading a step's features ------------------------------------------------------------------------------

    def _read(self, outputs: Any, batch: Any) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        assert self._source is not None, "read after setup"
        features = whole(self._source.read(outputs, batch)[0][0])  # a DTensor (tensor parallelism): the whole batch
        sample_ids = view_ids = None
        if self.sample_key is not None:
            sample_ids = lookup(self.sample_key, outputs, batch, probe_name=self.name, argument="sample_key")
        if self.view_key is not None:
            view_ids = lookup(self.view_key, outputs, batch, probe_name=self.name, argument="view_key")
        return features, sample_ids, view_ids

    @override
    def read_batch(self, outputs: Any, batch: Any) -> Any:
        return self._read(outputs, batch)

    @override
    def first_batch_problem(self, read: Any) -> str | None:
        return self._problem(*read)

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

    def _update(self, stage: str, read: Any, num_valid: int | None = None) -> None:
        features, sample_ids, view_ids = read
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
    def train_alone(self, read: Any) -> Any:
        self._update("train", read)
        self.train_batches += 1

    @override
    def window_due(self) -> bool:
        # The counts are the same on every rank, so every rank joins the same all-reduce.
        n = self.every_n_steps
        return n is not None and "train" in self.stages and self.train_batches > 0 and self.train_batches % n == 0

    @staticmethod
    @override
    def values_together(members: Sequence[ProbeCallback], stage: Stage) -> dict[str, dict[str, torch.Tensor]]:
        monitors = [m for m in members if isinstance(m, EmbeddingMonitor)]
        return {m.name: values for m, values in zip(monitors, _compute(monitors, stage), strict=True)}

    @override
    def takes_part(self, trainer: pl.Trainer, stage: Stage) -> bool:
        return stage in self.stages and (stage == "val" or self.every_n_steps is None)

    @override
    def after_train_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch_idx: int, out: Any) -> None:
        if out:  # a window closed: its values
            self._reset("train")
            log_reduced(pl_module, out, on_step=True)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if self.every_n_steps is None:
            self._reset("train")

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_epoch_start(trainer, pl_module)
        self._reset("val")

    @override
    def evaluates(self, trainer: pl.Trainer) -> bool:
        return "val" in self.stages

    @override
    def eval_read(self, trainer: pl.Trainer, outputs: Any, batch: Any) -> Any:
        if self.checked_first_batch:
            return self._read(outputs, batch)
        # A validation batch before any training batch (the sanity check): checked on every rank at once.
        assert self._coordinator is not None, "validation after setup"
        return self._coordinator.checked_read(trainer, self, lambda: self._read(outputs, batch))

    @override
    def valid_samples(self, loader: Any, batch_idx: int, read: Any) -> int | None:
        return None if self.sample_key is not None else _real_samples_in_batch(loader, batch_idx)

    @override
    def eval_step(self, read: Any, num_valid: int | None) -> torch.Tensor | None:
        self._update("val", read, num_valid)
        return None

    @override
    def reset_epoch(self, stage: Stage) -> None:
        self._reset(stage)

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
