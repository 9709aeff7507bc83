"""When and how the Lightning adapters log: Lightning's own cadence, values already reduced, warnings once."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any, cast

import lightning.pytorch as pl
import torch
import torch.distributed as dist

from distprobe import keys
from distprobe.engine import Probe
from distprobe.engine.bad_data import REASONS
from distprobe.metrics.counters import ReasonCounter

log = logging.getLogger(__name__)


def logs_this_step(trainer: pl.Trainer, batch_idx: int) -> bool:
    """Whether per-step values of this training batch are logged: when Lightning writes them, and each epoch's last.

    Lightning writes step values by its own rule (``LoggerConnector.should_update_logs``): every
    ``log_every_n_steps`` optimizer steps, counted across epochs, and not on an accumulation micro-batch under
    automatic optimization. Lightning's ``log`` costs far more host time than the probe's step (measured on an H100:
    61% of the callback), so per-step values are logged only then. The epoch's last batch logs as well, so that
    ``trainer.callback_metrics`` holds a recent value even when an epoch is shorter than ``log_every_n_steps``;
    Lightning does not write that one to its loggers unless it is a logging step.
    """
    if int(getattr(trainer, "log_every_n_steps", 1)) <= 0:  # Trainer(barebones=True) forbids logging
        return False
    if trainer.fit_loop._should_accumulate() and trainer.lightning_module.automatic_optimization:
        return False
    last_batch = trainer.num_training_batches
    if isinstance(last_batch, int) and batch_idx + 1 == last_batch:
        return True
    return bool(trainer._logger_connector.should_update_logs or getattr(trainer, "fast_dev_run", False))


def lightning_writes_this_step(trainer: pl.Trainer) -> bool:
    """Whether Lightning writes this training batch's step values to its loggers (its rule, as `logs_this_step`)."""
    if int(getattr(trainer, "log_every_n_steps", 1)) <= 0:
        return False
    if trainer.fit_loop._should_accumulate() and trainer.lightning_module.automatic_optimization:
        return False
    return bool(trainer._logger_connector.should_update_logs or getattr(trainer, "fast_dev_run", False))


def forget_step_values(trainer: pl.Trainer, names: Iterable[str], hook: str = "on_train_batch_end") -> None:
    """Stop Lightning from writing step values logged from ``hook`` at an earlier batch again.

    Lightning keeps a step value until the epoch ends and writes it at every later logging step, so a value logged
    every few batches (a monitor's window) would be written again at each logging step until the next one, under
    the later steps. Reset here, it is not written again; ``trainer.callback_metrics`` keeps it. Lightning's result
    collection is private: without it (another Lightning), nothing changes.
    """
    results = getattr(trainer, "_results", None)
    for name in names:
        value = results.get(f"{hook}.{name}") if isinstance(results, Mapping) else None
        if value is not None and not getattr(value, "has_reset", True):
            value.reset()


class StepValues:
    """A callback's step values that are not logged at every logging step: each written by Lightning once.

    A probe on its own data trains every ``every_n_steps`` batches and a monitor closes a window every
    ``every_n_steps``; between them they log nothing, and Lightning would write their last values again at each
    logging step (`forget_step_values`). Call `logged` when the values are logged, `skipped` on the other batches.
    """

    def __init__(self) -> None:
        self._names: list[str] = []
        self._written = False

    def logged(self, trainer: pl.Trainer, names: Iterable[str]) -> None:
        """The values of ``names`` were logged at this batch."""
        self._names, self._written = list(names), lightning_writes_this_step(trainer)

    def skipped(self, trainer: pl.Trainer) -> None:
        """Nothing was logged at this batch: once Lightning has written the last values, forget them."""
        if self._written:
            forget_step_values(trainer, self._names)
            self._names, self._written = [], False
        elif self._names:
            self._written = lightning_writes_this_step(trainer)


def log_reduced(pl_module: pl.LightningModule, values: dict[str, torch.Tensor], *, on_step: bool) -> None:
    """Log values that distprobe already reduced over the data-parallel group: the same on every rank.

    Reducing them again would cost one collective per value and change nothing. Lightning warns about epoch values
    logged without ``sync_dist=True`` under torch.distributed; ``sync_dist=True`` with ``rank_zero_only=True`` says
    what is true here: the value is synced (no advice needed) and Lightning need not sync it (its reduction is a
    no-op under ``rank_zero_only``, `lightning.pytorch.trainer.connectors.logger_connector.result._Sync`). Every
    rank still logs it, so ``trainer.callback_metrics`` holds it on every rank and checkpoint or early-stopping
    monitors work everywhere.
    """
    pl_module.log_dict(values, on_step=on_step, on_epoch=not on_step, sync_dist=True, rank_zero_only=True)


class BadDataWarnings:
    """Warns once per reason, naming the probe, the reason and the rank, when a probe skipped bad data.

    The counts live on the probe's device. Reading them must not stall the host (a sync per logging step costs
    several percent on a GPU), so on CUDA a logging step copies them to pinned host memory without blocking, and a
    later logging step reads that copy once its event says it has landed: the warning comes at the first logging
    step after the bad batch whose copy is complete.
    """

    def __init__(self) -> None:
        self._warned: set[str] = set()
        self._pending: tuple[torch.Tensor, Any] | None = None

    def check(self, probe: Probe) -> None:
        """Warn about reasons seen for the first time in this rank's counts, without a host sync."""
        if len(self._warned) == len(REASONS):
            return
        probe.fold_metrics()
        counter = cast(ReasonCounter, probe.metrics.bad_batches[keys.BAD_BATCHES])
        counts = counter.counts
        if counts.device.type != "cuda":
            self._warn(probe, counter.reasons, counts.tolist())
            return
        if self._pending is not None and self._pending[1].query():
            self._warn(probe, counter.reasons, self._pending[0].tolist())
            self._pending = None
        if self._pending is None:
            host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
            host.copy_(counts, non_blocking=True)
            landed = torch.cuda.Event()
            landed.record()
            self._pending = (host, landed)

    def _warn(self, probe: Probe, reasons: tuple[str, ...], counts: list[int]) -> None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        for reason, count in zip(reasons, counts, strict=True):
            if count and reason not in self._warned:
                self._warned.add(reason)
                log.warning(
                    "probe '%s': rank %d skipped %d micro-batch(es) with bad data (%s); the probe's step was skipped "
                    "on every rank and training goes on. Counted in %s and %s.",
                    probe.name,
                    rank,
                    count,
                    reason.replace("_", " "),
                    keys.key(keys.TRAIN, probe.name, keys.bad_batches(reason)),
                    keys.key(keys.TRAIN, probe.name, keys.SKIPPED_STEPS),
                )
