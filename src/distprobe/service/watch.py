"""`distprobe watch`: evaluate every new checkpoint of a training, once each, through submitit.

The watcher polls the run directory (cluster filesystems such as NFS and Lustre deliver no inotify events), and on
each poll:

1. **finds complete checkpoints** (`distprobe.service.checkpoints.is_complete`: a ``.ckpt`` whose zip directory is
   written, a Distributed Checkpoint whose ``.metadata`` is, a DeepSpeed directory whose ``latest`` is, a preemption
   checkpoint with its ``.complete`` marker). New ones are recorded in the results store in one transaction, as
   ``skipped`` when ``every`` / ``every_steps`` leave them out. The cost is one walk of the run directory and one
   read of the store's known paths, then work for the new checkpoints only. An incomplete one is logged once;
2. **follows the claims in flight** (`distprobe.service.submission`): a claim whose submitter died before it wrote
   the job id is matched with the scheduler's job by name, or released; a job's published result is ingested with
   ``done`` in one transaction; a job that ended without one is submitted again, and after ``max_tries`` attempts
   the checkpoint is ``failed`` with the job's error. Job states come from the scheduler (``squeue``/``sacct``:
   a ``PREEMPTED`` or ``REQUEUED`` job is waited for, not resubmitted) and the store, never from a pickle in the run
   directory. A checkpoint deleted before its turn (the training's retention) is ``missing``. The caches of claims
   that end are deleted;
3. **submits** pending checkpoints, oldest step first, up to ``max_in_flight`` jobs at a time, each under a claim
   taken in the store before ``sbatch`` runs.

A poll that fails (a locked, corrupt or full store; a failing ``sbatch``; the scheduler's commands) is logged in one
line, and the watcher waits longer before the next one (doubling up to `MAX_BACKOFF_S`), then goes on. SIGINT and
SIGTERM stop it between polls; running jobs keep running and publish their results for the next watcher. One
watcher per run directory: a second one exits with an error naming the first one's lock. A watcher started before
its training waits for the run directory to appear (`WatchConfig.wait_for_run_dir_s`).
"""

from __future__ import annotations

import bisect
import fcntl
import logging
import math
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from distprobe.cluster.config import ClusterConfig
from distprobe.service.checkpoints import CheckpointError, detect, is_complete
from distprobe.service.config import EvalConfig
from distprobe.service.job import allow_globals, store_path
from distprobe.service.scheduler import job_state
from distprobe.service.store import FINAL_STATES, SERVICE_DIR, ResultsStore, State
from distprobe.service.submission import ENTRY_POINT, Submitted, Submitter

log = logging.getLogger(__name__)

#: The longest wait between two polls after failing ones.
MAX_BACKOFF_S = 300.0


def check_number(owner: str, name: str, value: Any, *, minimum: float, integer: bool, optional: bool = False) -> None:
    """Raise a ValueError naming ``owner``'s ``name`` unless ``value`` is a finite number (an int) >= ``minimum``."""
    if value is None and optional:
        return
    kind = "an integer" if integer else "a finite number"
    good = isinstance(value, int) if integer else isinstance(value, int | float) and math.isfinite(value)
    if not good or isinstance(value, bool) or value < minimum:
        raise ValueError(
            f"{owner}: {name}={value!r}; expected {kind} >= {minimum:g}" + (" or None" if optional else "")
        )


@dataclass(kw_only=True)
class WatchConfig:
    """What `Watcher` watches and how it submits."""

    run_dir: Path
    """The training's run directory, searched recursively for checkpoints."""
    config_path: Path
    """The evaluation config (YAML) every job runs."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Where the jobs run; each job's folder is ``RUN_DIR/distprobe_eval/jobs/<claim>`` (its ``folder`` is
    replaced)."""
    max_in_flight: int = 2
    """Jobs submitted and not finished, at most."""
    max_tries: int = 3
    """Attempts per checkpoint before it is marked failed."""
    every: int = 1
    """Evaluate every K-th checkpoint by step (1: all)."""
    every_steps: int | None = None
    """Evaluate only checkpoints whose global step is a multiple of this."""
    include_last: bool = False
    """Also evaluate ``last.ckpt``-style files, which the training overwrites in place (off: they change)."""
    poll_s: float = 30.0
    """Seconds between polls."""
    wait_for_run_dir_s: float = 600.0
    """How long a watcher started before its training waits for the run directory to appear (a typo fails then)."""
    store_timeout_s: float = 60.0
    """How long a store access waits for another process's lock before the poll gives up (and backs off)."""

    def __post_init__(self) -> None:
        owner = "distprobe watch"
        for name, minimum in (("max_in_flight", 1), ("max_tries", 1), ("every", 1)):
            check_number(owner, name, getattr(self, name), minimum=minimum, integer=True)
        check_number(owner, "every_steps", self.every_steps, minimum=1, integer=True, optional=True)
        check_number(owner, "poll_s", self.poll_s, minimum=0.01, integer=False)
        check_number(owner, "wait_for_run_dir_s", self.wait_for_run_dir_s, minimum=0, integer=False)
        check_number(owner, "store_timeout_s", self.store_timeout_s, minimum=0, integer=False)
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise ValueError(f"{owner}: run directory {self.run_dir} is a file; expected a directory")


def candidates(run_dir: Path, include_last: bool = False) -> Iterator[Path]:
    """Every path under ``run_dir`` that looks like a checkpoint (complete or not), outside the service's folder."""
    for root, dirs, files in os.walk(run_dir):
        here = Path(root)
        dirs[:] = [d for d in dirs if d != SERVICE_DIR]
        for name in list(dirs):
            path = here / name
            if (path / ".metadata").exists() or (path / "latest").exists() or name.endswith(".ckpt"):
                dirs.remove(name)  # a checkpoint directory is one checkpoint, not a tree to search
                yield path
        for name in files:
            if name.endswith(".ckpt") and (include_last or not name.startswith("last")):
                yield here / name


class Watcher:
    """Polls a run directory and evaluates each new complete checkpoint once (see the module docstring)."""

    def __init__(self, config: WatchConfig) -> None:
        self.config = config
        self.eval_config = EvalConfig.load(config.config_path)  # a bad config fails here, before any submission
        allow_globals(self.eval_config.weights.safe_globals, self.eval_config.source)  # detect() reads checkpoints
        self.run_dir = config.run_dir.resolve()
        self.store = ResultsStore(store_path(self.eval_config, self.run_dir), timeout_s=config.store_timeout_s)
        self.cluster = config.cluster
        self.config_hash = self.eval_config.fingerprint
        self.submitter = Submitter(
            self.store, self.eval_config, config.config_path, self.run_dir, self.cluster, config.max_tries
        )
        self._stop = False
        self._lock: Any = None
        self._reported: set[str] = set()  # incomplete checkpoints already logged

    # --- the loop ----------------------------------------------------------------------------------------------

    def run(self, max_polls: int | None = None, until_idle: bool = False) -> int:
        """Poll until SIGINT/SIGTERM (or `max_polls` polls, or nothing in flight and nothing new if `until_idle`).

        Raises:
            ValueError: the run directory did not appear within ``wait_for_run_dir_s``.
            RuntimeError: another watcher holds this run directory's lock.
        """
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        polls = 0
        try:
            if not self._wait_for_run_dir():
                return 0  # stopped by a signal while waiting
            self._take_lock()
            failures = 0
            while not self._stop:
                try:
                    in_flight, submitted = self.poll()
                    failures = 0
                except Exception as err:  # noqa: BLE001 - one poll's failure is logged; the next poll may work
                    failures += 1
                    in_flight, submitted = -1, -1
                    log.error(
                        "Poll failed (%s: %s); trying again in %.1f s", type(err).__name__, err, self._backoff(failures)
                    )
                    log.debug("The failed poll's traceback", exc_info=True)
                polls += 1
                if (max_polls is not None and polls >= max_polls) or (until_idle and in_flight == 0 and submitted == 0):
                    break
                self._sleep(self._backoff(failures))
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._release_lock()
        log.info("Watcher stopped after %d poll(s); jobs in flight keep running", polls)
        return 0

    def _backoff(self, failures: int) -> float:
        if failures == 0:
            return self.config.poll_s
        return min(self.config.poll_s * 2 ** min(failures, 20), max(MAX_BACKOFF_S, self.config.poll_s))

    def _wait_for_run_dir(self) -> bool:
        if self.run_dir.is_dir():
            return True
        limit = self.config.wait_for_run_dir_s
        log.info("Waiting for the run directory %s to appear (up to %.0f s: --wait-for-run-dir-s)", self.run_dir, limit)
        deadline = time.monotonic() + limit
        while not self._stop and not self.run_dir.is_dir():
            if time.monotonic() >= deadline:
                raise ValueError(
                    f"distprobe watch: run directory {self.run_dir} did not appear in {limit:g} s; check the path, or "
                    "raise --wait-for-run-dir-s"
                )
            self._sleep(min(self.config.poll_s, 1.0))
        return not self._stop

    def _on_signal(self, signum: int, _frame: Any) -> None:
        log.info("Signal %d: stopping after this poll", signum)
        self._stop = True

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stop and time.monotonic() < deadline:
            time.sleep(min(0.2, seconds))

    def _take_lock(self) -> None:
        path = self.run_dir / SERVICE_DIR / "watch.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            raise RuntimeError(
                f"distprobe watch: another watcher (pid {holder}) holds {path}; stop it first, or wait for it to exit"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._lock = handle

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # --- one poll ----------------------------------------------------------------------------------------------

    def poll(self) -> tuple[int, int]:
        """Discover, follow and submit once; returns (jobs in flight, jobs submitted now)."""
        self.discover()
        in_flight = self.follow()
        submitted = 0
        for record in self.store.checkpoints(where="state = 'pending'", config_hash=self.config_hash):
            if in_flight + submitted >= self.config.max_in_flight or self._stop:
                break
            if self.submit(record.path, record.step):
                submitted += 1
        return in_flight + submitted, submitted

    def discover(self) -> int:
        """Record each complete checkpoint not yet in the store, as pending or skipped; returns how many."""
        known, known_steps = self.store.known(self.config_hash)
        found: list[tuple[int, str]] = []
        unreadable: list[tuple[str, int | None, State, str | None]] = []
        for path in candidates(self.run_dir, self.config.include_last):
            key = str(path)  # under the resolved run directory: resolving each path again would cost a walk
            if key in known:
                continue
            if not is_complete(path):
                if key not in self._reported:
                    self._reported.add(key)
                    log.warning(
                        "%s is not a complete checkpoint (still being written, or truncated); it is "
                        "evaluated once it is whole",
                        key,
                    )
                continue
            try:
                info = detect(path)
            except CheckpointError as err:  # complete on disk but unreadable: report once, never submit
                log.error("%s", err)
                unreadable.append((key, None, "failed", str(err)))
                continue
            found.append((info.step if info.step is not None else -1, key))
        found.sort()
        # Every K-th by step, counted over the known and the new ones: sorted steps and a bisection, no store query
        # per checkpoint (discovery stays linear in the new checkpoints).
        steps = sorted(-1 if s is None else s for s in known_steps)
        new_steps = [step for step, _ in found]
        rows: list[tuple[str, int | None, State, str | None]] = []
        for step, key in found:
            earlier = bisect.bisect_left(steps, step) + bisect.bisect_left(new_steps, step)
            rows.append((key, step if step >= 0 else None, self._selected(step, earlier), None))
        self.store.add(self.config_hash, unreadable + rows)
        return len(rows)

    def _selected(self, step: int, earlier: int) -> Literal["pending", "skipped"]:
        if self.config.every_steps is not None and (step < 0 or step % self.config.every_steps):
            return "skipped"
        if self.config.every > 1:
            return "pending" if earlier % self.config.every == 0 else "skipped"
        return "pending"

    def follow(self) -> int:
        """Reconcile, ingest and end this config's claims; returns how many jobs still run."""
        running = 0
        for record in self.store.checkpoints(where="state IN ('claimed', 'submitted')", config_hash=self.config_hash):
            if record.state == "claimed":
                self.submitter.reconcile(record)
                running += 1  # counted this poll either way: a picked-up job runs, a released one waits a poll
            elif self.submitter.follow(record):
                running += 1
        return running

    def submit(self, path: str, step: int | None) -> bool:
        """Claim and submit one pending checkpoint's evaluation; False if it vanished first or a claim holds it."""
        if not Path(path).exists():
            log.warning("%s was deleted before its turn (the training's checkpoint retention?)", path)
            self.store.mark(path, self.config_hash, "missing", "deleted before its evaluation was submitted")
            return False
        outcome = self.submitter.submit(path, step, allow_final=False)
        if not isinstance(outcome, Submitted):
            return False
        log.info("Submitted job %s for %s (step %s); folder %s", outcome.job_id, path, step, outcome.job_dir)
        return True


__all__ = ["ENTRY_POINT", "FINAL_STATES", "WatchConfig", "Watcher", "candidates", "check_number", "job_state"]
