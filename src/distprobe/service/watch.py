"""`distprobe watch`: evaluate every new checkpoint of a training, once each, through submitit.

The watcher polls the run directory (cluster filesystems such as NFS and Lustre deliver no inotify events), and on
each poll:

1. **finds complete checkpoints** (`distprobe.service.checkpoints.is_complete`: a ``.ckpt`` whose zip directory is
   written, a Distributed Checkpoint whose ``.metadata`` is, a DeepSpeed directory whose ``latest`` is, a preemption
   checkpoint with its ``.complete`` marker). One it has not seen is recorded in the results store, as ``skipped``
   when ``every`` / ``every_steps`` leave it out;
2. **follows the jobs in flight**: a job that recorded its results made the checkpoint ``done``; a job that ended
   without (failed, cancelled, killed) is submitted again, and after ``max_tries`` attempts the checkpoint is marked
   ``failed`` with the job's log path. A job preempted on Slurm requeues itself (submitit's checkpointing) and keeps
   its id. A checkpoint deleted before its turn (the training's retention) is marked ``missing``;
3. **submits** new checkpoints, oldest step first, up to ``max_in_flight`` jobs at a time.

Everything it knows is in the store, so a restarted watcher submits no duplicate: it picks up the jobs in flight by
their ids. SIGINT and SIGTERM stop it between polls; running jobs keep running and record their own results. One
watcher per run directory: a second one exits with an error naming the first one's lock.
"""

from __future__ import annotations

import fcntl
import logging
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
from distprobe.service.job import allow_globals, default_jobs_folder, store_path
from distprobe.service.store import FINAL_STATES, SERVICE_DIR, CheckpointRecord, ResultsStore

log = logging.getLogger(__name__)

JobState = Literal["running", "succeeded", "failed"]
ENTRY_POINT = "distprobe.service.job:evaluate_checkpoint"


@dataclass(kw_only=True)
class WatchConfig:
    """What `Watcher` watches and how it submits."""

    run_dir: Path
    """The training's run directory, searched recursively for checkpoints."""
    config_path: Path
    """The evaluation config (YAML) every job runs."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Where the jobs run; its ``folder`` defaults to ``RUN_DIR/distprobe_eval/jobs/%j``."""
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

    def __post_init__(self) -> None:
        for name, minimum in (("max_in_flight", 1), ("max_tries", 1), ("every", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < minimum:
                raise ValueError(f"distprobe watch: {name}={value!r}; expected an integer >= {minimum}")
        if self.every_steps is not None and (not isinstance(self.every_steps, int) or self.every_steps < 1):
            raise ValueError(f"distprobe watch: every_steps={self.every_steps!r}; expected an integer >= 1 or None")
        if self.poll_s <= 0:
            raise ValueError(f"distprobe watch: poll_s={self.poll_s!r}; expected a positive number of seconds")
        if not self.run_dir.is_dir():
            raise ValueError(f"distprobe watch: run directory {self.run_dir} does not exist")


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


def job_state(cluster: str, folder: Path, job_id: str) -> JobState:
    """Where a submitted job stands, from its result file, else its scheduler (or, locally, its process)."""
    from submitit.core.utils import JobPaths, pickle_load

    result = JobPaths(folder, job_id=job_id, task_id=0).result_pickle
    if result.exists():
        try:
            outcome, _ = pickle_load(result)
        except Exception:  # noqa: BLE001 - a result still being written: look again next poll
            return "running"
        return "succeeded" if outcome == "success" else "failed"
    if cluster == "slurm":
        import submitit

        state = submitit.SlurmJob(folder=folder, job_id=job_id).state
        # UNKNOWN: sacct has not caught up with a fresh job yet.
        running = ("PENDING", "RUNNING", "REQUEUED", "COMPLETING", "CONFIGURING", "SUSPENDED", "RESIZING", "UNKNOWN")
        if state in running:
            return "running"
        return "succeeded" if state == "COMPLETED" else "failed"
    # The local executor's job id is its process id.
    try:
        os.kill(int(job_id), 0)
    except (ProcessLookupError, ValueError):
        return "failed"
    except PermissionError:
        return "running"
    return "running"


def _error_of(folder: Path, job_id: str) -> str:
    from submitit.core.utils import JobPaths, pickle_load

    paths = JobPaths(folder, job_id=job_id, task_id=0)
    if paths.result_pickle.exists():
        try:
            outcome, value = pickle_load(paths.result_pickle)
            if outcome != "success":
                return str(value).strip().splitlines()[-1][:500]
        except Exception:  # noqa: BLE001 - fall back to the log
            pass
    for log_file in (paths.stderr, paths.stdout):
        if log_file.exists():
            lines = [line for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
            if lines:
                return lines[-1][:500]
    return "the job ended without a result or a log line"


class Watcher:
    """Polls a run directory and evaluates each new complete checkpoint once (see the module docstring)."""

    def __init__(self, config: WatchConfig) -> None:
        self.config = config
        self.eval_config = EvalConfig.load(config.config_path)  # a bad config fails here, before any submission
        allow_globals(self.eval_config.weights.safe_globals, self.eval_config.source)  # detect() reads checkpoints
        self.run_dir = config.run_dir.resolve()
        self.store = ResultsStore(store_path(self.eval_config, self.run_dir))
        cluster = config.cluster
        if cluster.folder == ClusterConfig().folder:  # the default: the jobs' logs live with the results
            cluster = ClusterConfig.from_dict(
                {
                    **{f: getattr(cluster, f) for f in ClusterConfig.field_names()},
                    "folder": default_jobs_folder(self.run_dir),
                }
            )
        self.cluster = cluster
        self._stop = False
        self._lock: Any = None

    # --- the loop ----------------------------------------------------------------------------------------------

    def run(self, max_polls: int | None = None, until_idle: bool = False) -> int:
        """Poll until SIGINT/SIGTERM (or `max_polls` polls, or nothing in flight and nothing new if `until_idle`)."""
        self._take_lock()
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        polls = 0
        try:
            while not self._stop:
                in_flight, submitted = self.poll()
                polls += 1
                if (max_polls is not None and polls >= max_polls) or (until_idle and not in_flight and not submitted):
                    break
                self._sleep(self.config.poll_s)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._release_lock()
        log.info("Watcher stopped after %d poll(s); jobs in flight keep running", polls)
        return 0

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
        for record in self.store.checkpoints(where="state = 'pending'"):
            if in_flight + submitted >= self.config.max_in_flight or self._stop:
                break
            if self.submit(record):
                submitted += 1
        return in_flight + submitted, submitted

    def discover(self) -> None:
        """Record each complete checkpoint not yet in the store, as pending or skipped."""
        known = {r.path for r in self.store.checkpoints()}
        found = []
        for path in candidates(self.run_dir, self.config.include_last):
            key = str(path.resolve())
            if key in known or not is_complete(path):
                continue
            try:
                info = detect(path)
            except CheckpointError as err:  # complete on disk but unreadable: report once, never submit
                self.store.mark(key, "failed", error=str(err))
                log.error("%s", err)
                continue
            found.append((info.step if info.step is not None else -1, key))
        for step, key in sorted(found):
            self.store.mark(key, self._selected(step), step=step if step >= 0 else None)

    def _selected(self, step: int) -> Literal["pending", "skipped"]:
        if self.config.every_steps is not None and (step < 0 or step % self.config.every_steps):
            return "skipped"
        if self.config.every > 1:
            earlier = len(self.store.checkpoints(where="step < ? OR step IS NULL", args=(step,)))
            return "pending" if earlier % self.config.every == 0 else "skipped"
        return "pending"

    def follow(self) -> int:
        """Update the jobs in flight; returns how many are still running."""
        running = 0
        for record in self.store.checkpoints(where="state = 'submitted'"):
            assert record.job_id is not None and record.log_path is not None
            state = job_state(self.cluster.cluster, Path(record.log_path).parent, record.job_id)
            if state == "running":
                running += 1
                continue
            done = self.store.checkpoint(record.path)
            if done is not None and done.state == "done":  # recorded between the two reads
                continue
            self._retry_or_fail(record, _error_of(Path(record.log_path).parent, record.job_id))
        return running

    def _retry_or_fail(self, record: CheckpointRecord, error: str) -> None:
        if not Path(record.path).exists():
            log.warning("%s was deleted before its evaluation finished (retention?)", record.path)
            self.store.mark(record.path, "missing", error=f"deleted before evaluation; last job said: {error}")
        elif record.tries >= self.config.max_tries:
            log.error("%s failed %d times; last log %s: %s", record.path, record.tries, record.log_path, error)
            self.store.mark(record.path, "failed", error=error)
        else:
            log.warning("Job %s for %s ended without results (%s); submitting again", record.job_id, record.path, error)
            self.store.mark(record.path, "pending", error=error)

    def submit(self, record: CheckpointRecord) -> bool:
        """Submit one pending checkpoint's evaluation; False if it vanished first."""
        from distprobe.cluster.submitit_launcher import submit

        if not Path(record.path).exists():
            log.warning("%s was deleted before its turn (the training's checkpoint retention?)", record.path)
            self.store.mark(record.path, "missing", error="deleted before its evaluation was submitted")
            return False
        # Positional: submit's own second parameter is called config.
        job = submit(ENTRY_POINT, self.cluster, record.path, str(self.config.config_path.resolve()), str(self.run_dir))
        log.info("Submitted job %s for %s (step %s, try %d)", job.job_id, record.path, record.step, record.tries + 1)
        self.store.mark(
            record.path,
            "submitted",
            tries=record.tries + 1,
            job_id=str(job.job_id),
            log_path=str(job.paths.stdout),
            config_hash=self.eval_config.fingerprint,
        )
        if self.cluster.cluster == "debug":  # the debug executor runs the job in this process, when asked for it
            try:
                job.result()
            except Exception as err:  # noqa: BLE001 - any failure of the evaluation is this checkpoint's, not ours
                latest = self.store.checkpoint(record.path)
                assert latest is not None
                self._retry_or_fail(latest, f"{type(err).__name__}: {err}")
        return True


__all__ = ["FINAL_STATES", "WatchConfig", "Watcher", "candidates", "job_state"]
