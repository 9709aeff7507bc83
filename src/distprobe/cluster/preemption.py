"""Preemption that works for sharded checkpoints: a signal sets a flag, every rank saves at the next step.

Slurm sends a signal (USR2 here, as submitit expects) before a timeout or a preemption. submitit's own handler calls
`checkpoint()` on global rank 0 only, inside the signal handler; a FSDP or DeepSpeed save is a collective, so a
rank-0-only save would hang. Instead:

1. `PreemptionSignal` replaces the handler in every task with one that only sets a flag.
2. `PreemptionCheckpoint`, a Lightning callback, reads the flag at each optimizer-step boundary and decides with a
   collective (any rank), so all ranks agree on the step. The collective is an `AsyncFlag`: a CPU all-reduce over
   gloo, posted at one check and read at the next, so it never syncs the host with the GPU (the save comes one
   check later, well within the signal's lead time).
3. Every rank calls `trainer.save_checkpoint`; rank 0 then marks the checkpoint complete.
4. Rank 0 hands the signal to the handler that was there before (submitit's: it requeues the job); every rank exits.
5. The requeued job's entry point calls `last_checkpoint()` and passes it as ``ckpt_path`` to ``trainer.fit``.

Outside submitit (the sbatch templates), step 4 only exits: the batch script requeues the job itself.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.environments import SLURMEnvironment
from typing_extensions import override

from distprobe.arguments import require_count
from distprobe.cluster.async_flag import AsyncFlag
from distprobe.cluster.signals import (
    CHECKPOINT_DIR_ENV,
    COMPLETE_SUFFIX,
    PreemptionSignal,
    checkpoint_dir,
    checkpoint_path,
    last_checkpoint,
    preemption_signal,
)

__all__ = [
    "CHECKPOINT_DIR_ENV",
    "PreemptionCheckpoint",
    "PreemptionSetupError",
    "PreemptionSignal",
    "checkpoint_dir",
    "checkpoint_path",
    "last_checkpoint",
    "lightning_plugins",
    "preemption_signal",
]

logger = logging.getLogger(__name__)


class PreemptionSetupError(RuntimeError):
    """The training is configured so that preemption would not work (e.g. two requeue mechanisms)."""


def lightning_plugins() -> list[Any]:
    """Lightning plug-ins for a job started by the launcher: SLURM's environment without Lightning's auto-requeue.

    Lightning's SLURM auto-requeue (USR1, rank-0 save, ``scontrol requeue``) would compete with the preemption
    checkpoint. Pass the result as ``Trainer(plugins=lightning_plugins())``; outside Slurm it is empty.
    """
    if SLURMEnvironment.detect():
        return [SLURMEnvironment(auto_requeue=False)]
    return []


class PreemptionCheckpoint(Callback):
    """Save a checkpoint on every rank at the next step after a preemption signal, then requeue.

    Args:
        dirpath: where checkpoints go; default: the launcher's job folder (``$DISTPROBE_CHECKPOINT_DIR``), else
            ``<default_root_dir>/preemption``.
        check_every_n_steps: how often the ranks agree on the flag. Each check reads the CPU all-reduce (gloo)
            posted at the previous one and posts the next, so it never waits for the GPU, and the save comes one
            check after the signal; the signal comes ``signal_delay_s`` before the end, so a few steps of delay
            cost nothing.
        requeue: after saving, requeue and exit (True), or only stop training (False, for tests and notebooks).
        preemption: the signal to watch; default: the process-wide one (`preemption_signal()`).

    Example:
        >>> callback = PreemptionCheckpoint(check_every_n_steps=10)
        >>> trainer = pl.Trainer(callbacks=[callback], plugins=lightning_plugins())  # doctest: +SKIP
        >>> trainer.fit(model, ckpt_path=last_checkpoint())  # doctest: +SKIP
    """

    def __init__(
        self,
        dirpath: str | Path | None = None,
        *,
        check_every_n_steps: int = 1,
        requeue: bool = True,
        preemption: PreemptionSignal | None = None,
    ) -> None:
        require_count("PreemptionCheckpoint", "check_every_n_steps", check_every_n_steps)
        self._dirpath_arg = Path(dirpath) if dirpath is not None else None
        self.dirpath: Path | None = None
        self.check_every_n_steps = check_every_n_steps
        self.requeue = requeue
        self.preemption = preemption if preemption is not None else preemption_signal()
        self.saved_path: Path | None = None
        self._installed_here = False
        self._last_checked_step = -1
        self._flag = AsyncFlag()

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        environment = getattr(trainer.strategy, "cluster_environment", None)
        if isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
            raise PreemptionSetupError(
                "PreemptionCheckpoint: Lightning's SLURM auto-requeue is on, so two mechanisms would requeue this "
                "job. Pass Trainer(plugins=distprobe.cluster.lightning_plugins()) or "
                "plugins=[SLURMEnvironment(auto_requeue=False)]."
            )
        self.dirpath = self._dirpath_arg or checkpoint_dir() or Path(trainer.default_root_dir) / "preemption"
        # Under NCCL this creates a gloo group: a collective that every rank makes here, at setup.
        self._flag = AsyncFlag.build()
        self._last_checked_step = -1
        self._installed_here = self.preemption.install()
        self.preemption.attach()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._flag.close()
        self.preemption.detach()
        if self._installed_here:
            self.preemption.uninstall()
            self._installed_here = False

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        # Only at optimizer-step boundaries (not between accumulation micro-batches), and every rank sees the same
        # global_step, so every rank takes part in the same collectives.
        if step == self._last_checked_step or step % self.check_every_n_steps != 0:
            return
        self._last_checked_step = step
        if not self._flag.poll(self.preemption.received):
            return
        self._save(trainer, step)
        if self.requeue:
            self.preemption.requeue_and_exit(trainer.is_global_zero)
        trainer.should_stop = True

    def _save(self, trainer: pl.Trainer, step: int) -> None:
        assert self.dirpath is not None, "setup() sets dirpath before training starts"
        path = checkpoint_path(self.dirpath, step)
        if trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
        trainer.strategy.barrier("PreemptionCheckpoint.mkdir")
        # A collective under FSDP and DeepSpeed: every rank is here, at the same step.
        trainer.save_checkpoint(path)
        trainer.strategy.barrier("PreemptionCheckpoint.saved")
        if trainer.is_global_zero:
            Path(str(path) + COMPLETE_SUFFIX).touch()
            logger.warning("Preemption checkpoint at step %d saved to %s", step, path)
        self.saved_path = path
