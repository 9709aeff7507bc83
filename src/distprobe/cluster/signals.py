"""The preemption flag and the checkpoint folder, without Lightning (the launcher imports this in every task).

See `distprobe.cluster.preemption` for the whole mechanism.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

logger = logging.getLogger(__name__)

CHECKPOINT_DIR_ENV = "DISTPROBE_CHECKPOINT_DIR"
"""Set by the launcher in every task: the job's folder for preemption checkpoints."""

CHECKPOINT_NAME = re.compile(r"^preempt-(\d+)\.ckpt$")
"""A preemption checkpoint's file name (its group: the step); the probing service matches it too."""
COMPLETE_SUFFIX = ".complete"


def _preemption_signum() -> int:
    # submitit reads the signal name from SUBMITIT_PREEMPT_SIGNAL (default USR2); follow it so both agree.
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    signum = getattr(signal, f"SIG{name}", None)
    if not isinstance(signum, int):
        raise ValueError(f"SUBMITIT_PREEMPT_SIGNAL={name!r} is not a signal name; expected e.g. 'USR2'")
    return signum


class PreemptionSignal:
    """Turns the preemption signal into a flag that every rank reads at a step boundary.

    `install` puts a handler on the signal that only sets `received`; the handler found there before (submitit's,
    under the launcher) is kept and called later by `requeue_and_exit`, on global rank 0, once every rank has saved.
    While no consumer (a `PreemptionCheckpoint`) is attached, the signal goes straight to the previous handler, so a
    training that does not use distprobe's checkpointing is requeued exactly as plain submitit would do.
    """

    def __init__(self, signum: int | None = None) -> None:
        self.signum = _preemption_signum() if signum is None else signum
        self._received = threading.Event()
        self._previous: Any = None
        self._installed = False
        self._consumers = 0
        self._leaving = False

    @property
    def leaving(self) -> bool:
        """Whether this process is leaving for a requeue (`requeue_and_exit` ran): its `SystemExit` is the job's."""
        return self._leaving

    @property
    def received(self) -> bool:
        """Whether the signal arrived in this process (this rank only; decide across ranks with a collective)."""
        return self._received.is_set()

    @property
    def installed(self) -> bool:
        """Whether `install` is in effect."""
        return self._installed

    def install(self) -> bool:
        """Install the flag-setting handler; returns False if it was already installed."""
        if self._installed:
            return False
        self._previous = signal.getsignal(self.signum)
        signal.signal(self.signum, self._on_signal)
        self._installed = True
        return True

    def uninstall(self) -> None:
        """Put back the handler that was there before `install`, and clear the flag."""
        if not self._installed:
            return
        signal.signal(self.signum, self._previous if self._previous is not None else signal.SIG_DFL)
        self._installed = False
        self._previous = None
        self._received.clear()
        self._leaving = False

    def attach(self) -> None:
        """Register a consumer that will save and requeue at a step boundary."""
        self._consumers += 1

    def detach(self) -> None:
        """Unregister a consumer."""
        self._consumers = max(0, self._consumers - 1)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._received.set()
        logger.warning("Received %s: a preemption checkpoint is due at the next step", signal.Signals(signum).name)
        if self._consumers == 0 and callable(self._previous):
            # Nobody will checkpoint at a step boundary: behave as if we were not here.
            self._previous(signum, frame)

    def requeue_and_exit(self, is_global_zero: bool) -> NoReturn:
        """After every rank saved: rank 0 lets the launcher requeue the job; every rank exits.

        Under submitit, rank 0 calls submitit's handler, which dumps the resubmission, runs ``scontrol requeue``
        (or, for the local executor, exits with its requeue code) and raises `SystemExit`; that exception is
        re-raised here so the launcher sees the exit it expects. Other ranks exit with status 0. Without a launcher
        handler (sbatch templates) every rank exits with status 0 and the batch script requeues.

        Raises:
            SystemExit: always (it is how the job ends); an exception from the launcher's handler (e.g. submitit's
                ``UncompletedJobError`` when the job timed out too many times) propagates instead.
        """
        # The job is leaving: a SIGTERM now (Slurm sends one to every task once `scontrol requeue` cancels this run)
        # carries nothing new, and Lightning's SIGTERM handler would broadcast to ranks that already exited, turning
        # this exit into a gloo "connection closed by peer" error that submitit reports as a failed job.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        self._leaving = True
        if is_global_zero and callable(self._previous):
            try:
                self._previous(self.signum, None)
            except SystemExit:
                logger.info("Preemption checkpoint saved; the job was handed back to the launcher for requeue")
                raise
            logger.warning("The launcher's signal handler returned without requeueing the job")
        raise SystemExit(0)


_process_signal: PreemptionSignal | None = None


def preemption_signal() -> PreemptionSignal:
    """The process-wide `PreemptionSignal` (signal handlers are per process, so there is one)."""
    global _process_signal
    if _process_signal is None:
        _process_signal = PreemptionSignal()
    return _process_signal


def checkpoint_dir() -> Path | None:
    """The folder the launcher chose for this job's preemption checkpoints, or None outside the launcher."""
    value = os.environ.get(CHECKPOINT_DIR_ENV)
    return Path(value) if value else None


def checkpoint_path(dirpath: str | Path, step: int) -> Path:
    """Where the preemption checkpoint of optimizer step `step` goes."""
    return Path(dirpath) / f"preempt-{step:09d}.ckpt"


def last_checkpoint(dirpath: str | Path | None = None) -> str | None:
    """The newest complete preemption checkpoint, to pass as ``trainer.fit(..., ckpt_path=...)``.

    A checkpoint counts once rank 0 marked it complete (after every rank's save), so a save that a second signal
    interrupted is never resumed from.

    Args:
        dirpath: the checkpoint folder; by default the one the launcher set (``$DISTPROBE_CHECKPOINT_DIR``).

    Returns:
        The checkpoint's path, or None when there is none (a first run).

    Example:
        >>> last_checkpoint("/nonexistent") is None
        True
    """
    folder = Path(dirpath) if dirpath is not None else checkpoint_dir()
    if folder is None or not folder.is_dir():
        return None
    steps = []
    for path in folder.iterdir():
        match = CHECKPOINT_NAME.match(path.name)
        if match and (folder / (path.name + COMPLETE_SUFFIX)).exists():
            steps.append(int(match.group(1)))
    if not steps:
        return None
    return str(checkpoint_path(folder, max(steps)))
