"""`EmbeddingMonitor`: label-free monitors (RankMe, LiDAR) of a model's features, logged from Lightning."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torchmetrics import Metric
from typing_extensions import override

from distprobe.callbacks.base import ProbeCallback, Stage, config_from_arguments, require_keys
from distprobe.callbacks.cadence import StepValues, log_reduced
from distprobe.features.dtensor import whole
from distprobe.features.lookup import lookup
from distprobe.metrics.exact import valid_in_loader_batch
from distprobe.monitors.member import EmbeddingMonitorEngine, MonitorConfig, MonitorRead
from distprobe.strategies.groups import data_parallel_group


class EmbeddingMonitor(ProbeCallback):
    """Log label-free measures of an embedding: RankMe and LiDAR, exact over every rank, with no feature gathered.

    Features are read as `OnlineProbe` reads them (a key of the step's outputs, of the batch, or a submodule tap)
    and summed on their device with no host sync. At each epoch's end (or every ``every_n_steps`` training
    batches) the monitors of every `EmbeddingMonitor` of the trainer are computed with one flat all-reduce. The
    engine (`distprobe.monitors.member.EmbeddingMonitorEngine`) is a member of the Trainer's `distprobe.loop.ProbeSet`,
    the one a torchrun loop builds with ``ProbeSet.build(monitors=...)``.

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
        require_keys("monitor", name, input=input)
        config = config_from_arguments(MonitorConfig, locals())
        super().__init__(name, [input], None, None)
        self.input = input
        self.config = config
        # The engine exists from the start: its metrics are built from ``dim`` or the first batch, on the device
        # `set_up` gives it.
        self._engine = EmbeddingMonitorEngine(config)
        self._window_values = StepValues()
        """The last window's values, written by Lightning once."""

    @property
    def monitor(self) -> EmbeddingMonitorEngine:
        """The engine: a member of the Trainer's `distprobe.loop.ProbeSet` from ``setup`` on."""
        engine: EmbeddingMonitorEngine = self._engine
        return engine

    @property
    def metrics(self) -> dict[str, dict[str, Metric]]:
        """Per stage, the monitors by name (built at setup when ``dim`` is given, else at the first batch)."""
        return self.monitor.metrics

    @property
    def train_batches(self) -> int:
        """Training batches seen, across epochs: the ``every_n_steps`` windows count them."""
        return self.monitor.train_batches

    # --- set-up -------------------------------------------------------------------------------------------------

    @override
    def set_up(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.monitor.place(data_parallel_group(trainer.strategy), trainer.strategy.root_device)

    @override
    def add_to(self, probe_set: Any) -> None:
        probe_set.add_monitor(self.monitor)

    @override
    def watches(self, stage: Stage) -> bool:
        return self.monitor.watches(stage)

    # --- reading a step's features ------------------------------------------------------------------------------

    def _read(self, outputs: Any, batch: Any) -> MonitorRead:
        assert self._source is not None, "read after setup"
        features = whole(self._source.read(outputs, batch)[0][0])  # a DTensor (tensor parallelism): the whole batch
        sample_ids = view_ids = None
        if self.config.sample_key is not None:
            sample_ids = lookup(self.config.sample_key, outputs, batch, probe_name=self.name, argument="sample_key")
        if self.config.view_key is not None:
            view_ids = lookup(self.config.view_key, outputs, batch, probe_name=self.name, argument="view_key")
        return features, sample_ids, view_ids

    @override
    def read_batch(self, outputs: Any, batch: Any) -> Any:
        return self._read(outputs, batch)

    @override
    def as_read(self, features: list[torch.Tensor], targets: torch.Tensor | None) -> Any:
        # Only a batch that lacked the monitor's keys is built this way (`read_after_first`): no ids either.
        return features[0], None, None

    @override
    def first_batch_problem(self, read: Any) -> str | None:
        return self.monitor.problem(*read, input_key=self.input)

    # --- training: the coordinator's probe set updates the metrics and closes the windows -----------------------

    @override
    def takes_part(self, trainer: pl.Trainer, stage: Stage) -> bool:
        return self.monitor.per_epoch(stage)

    @override
    def after_train_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch_idx: int, out: Any) -> None:
        if out:  # a window closed: its values (the probe set has started the next window's sums)
            log_reduced(pl_module, out, on_step=True)
            self._window_values.logged(trainer, out)
        else:
            self._window_values.skipped(trainer)

    @override
    def new_train_epoch(self) -> None:
        # A new epoch's sums (a resume inside the epoch its checkpoint saved keeps them); windows run across epochs.
        if self.config.every_n_steps is None:
            self.monitor.reset("train")

    # --- validation ---------------------------------------------------------------------------------------------

    @override
    def start_eval_epoch(self) -> None:
        self.monitor.reset("val")

    @override
    def evaluates(self, trainer: pl.Trainer) -> bool:
        return self.monitor.watches("val")

    @override
    def eval_read(self, trainer: pl.Trainer, outputs: Any, batch: Any) -> Any:
        if self.checked_first_batch:
            return self._read(outputs, batch)
        # A validation batch before any training batch (the sanity check): checked on every rank at once.
        assert self._coordinator is not None, "validation after setup"
        return self._coordinator.checked_read(trainer, self, lambda: self._read(outputs, batch))

    @override
    def valid_samples(self, loader: Any, batch_idx: int, read: Any) -> int | None:
        return None if self.config.sample_key is not None else _real_samples_in_batch(loader, batch_idx)

    @override
    def eval_step(self, read: Any, num_valid: int | None) -> torch.Tensor | None:
        features, sample_ids, view_ids = read
        self.monitor.update("val", features, sample_ids, view_ids, num_valid=num_valid)
        return None

    @override
    def reset_epoch(self, stage: Stage) -> None:
        self.monitor.reset(stage)


def _real_samples_in_batch(loader: Any, batch_idx: int) -> int | None:
    """How many leading samples of this validation batch are real; None when all are (every batch but a padded one).

    Host arithmetic only: the batch's own length is not read from the device.
    """
    num_valid = valid_in_loader_batch(loader, batch_idx, 1 << 62)
    batch_size = getattr(loader, "batch_size", None)
    if num_valid is None or (isinstance(batch_size, int) and num_valid >= batch_size):
        return None
    return num_valid
