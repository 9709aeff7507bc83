"""The results store: one SQLite file per run directory, written only by the commands a user runs.

Two tables:

- ``evaluations``: one row per (checkpoint, config hash) with its state, its tries, its current claim and the job
  that runs it. States: ``pending``; ``claimed`` (a claim is taken and the job is being submitted: the job id is not
  known yet); ``submitted`` (the claim holds the job id); then ``done``, ``failed``, ``missing`` or ``skipped``.
- ``results``: one row per (checkpoint, config hash, probe, head, metric) with its value and the checkpoint's step.

**One writer per machine, never a job.** The watcher (or ``distprobe eval`` / ``retry`` without one) writes the
store; evaluation jobs on compute nodes never open it. A job publishes its numbers as a JSON file in its own job
folder (`distprobe.service.published`), and the writer ingests that file: its rows and the ``done`` state in one
transaction, and only for the claim the job ran under. SQLite's locks over NFS or Lustre are then never relied on
between machines. Every write takes SQLite's write lock up front (``BEGIN IMMEDIATE``); the default rollback journal
is kept because WAL needs shared memory that network filesystems do not provide.

**Exactly once.** A claim is taken in one transaction before anything is submitted, and only for a checkpoint that
no live claim holds, so two submitters (a watcher and a user's ``eval``, or a restarted watcher) can never both
submit it. The claim's name is the job's folder and its scheduler job name, so a claim whose ``sbatch`` answered but
whose job id was never written (the submitter was killed in between) is found again from the scheduler.
"""

from __future__ import annotations

import math
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

SERVICE_DIR = "distprobe_eval"
"""Everything the service writes in a run directory goes under this folder."""
STORE_NAME = "results.sqlite"
"""The store's file name in `SERVICE_DIR`."""
JOBS_DIR = "jobs"
"""The jobs' folders (one per claim) in `SERVICE_DIR`."""


def default_store_path(run_dir: Path) -> Path:
    """Where a run directory's results store is, unless the config names another."""
    return run_dir / SERVICE_DIR / STORE_NAME


State = Literal["pending", "claimed", "submitted", "done", "failed", "missing", "skipped"]
#: States after which the watcher never submits the checkpoint again (``distprobe retry`` puts them back).
FINAL_STATES: tuple[State, ...] = ("done", "failed", "missing", "skipped")
#: States of a live claim: a job is being submitted or runs.
IN_FLIGHT: tuple[State, ...] = ("claimed", "submitted")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS evaluations (
    checkpoint TEXT NOT NULL,
    config_hash TEXT NOT NULL,
    step INTEGER,
    state TEXT NOT NULL,
    tries INTEGER NOT NULL DEFAULT 0,
    claim TEXT,
    owner TEXT,
    job_dir TEXT,
    job_name TEXT,
    job_id TEXT,
    log_path TEXT,
    error TEXT,
    updated REAL NOT NULL,
    PRIMARY KEY (checkpoint, config_hash)
);
CREATE INDEX IF NOT EXISTS evaluations_state ON evaluations (state);
CREATE TABLE IF NOT EXISTS results (
    checkpoint TEXT NOT NULL,
    step INTEGER,
    probe TEXT NOT NULL,
    head TEXT NOT NULL,
    metric TEXT NOT NULL,
    value REAL NOT NULL,
    config_hash TEXT NOT NULL,
    created REAL NOT NULL,
    low REAL,
    high REAL,
    PRIMARY KEY (checkpoint, config_hash, probe, head, metric)
);
"""
#: Columns added to ``results`` after its first release: a store written before gets them, null, when opened.
_ADDED_RESULT_COLUMNS = {"low": "REAL", "high": "REAL"}
_COLUMNS = (
    "checkpoint, step, state, tries, job_id, log_path, config_hash, error, claim, owner, job_dir, job_name, updated"
)


class StoreError(RuntimeError):
    """The store cannot be used: corrupt, locked for too long, or on a full disk. The message says what to do."""


@dataclass(frozen=True, kw_only=True)
class BootstrapEnds:
    """A number's bootstrap interval over the validation samples, as the store keeps it: both ends, or neither.

    Keyword-only, so that a subclass's own fields come first in its constructor.
    """

    low: float | None = None
    """The interval's lower end; None: no interval."""
    high: float | None = None
    """Its upper end."""

    @property
    def ends(self) -> tuple[float, float] | None:
        """``(low, high)``, or None without an interval."""
        if self.low is None or self.high is None:
            return None
        return self.low, self.high


@dataclass(frozen=True)
class ResultRow(BootstrapEnds):
    """One number of one evaluation, and its bootstrap interval where it has one."""

    probe: str
    """The probe's name (a bank's or a kNN's)."""
    head: str
    """The head's id in a bank, ``k{K}`` for a kNN, ``best`` for the bank's selected head."""
    metric: str
    """``top1``, ``top5``... (for ``best``: also ``head_index``; ``selected``: the selected head, in ``head``)."""
    value: float


@dataclass(frozen=True)
class CheckpointRecord:
    """What the store knows of one checkpoint under one config."""

    path: str
    step: int | None
    state: State
    tries: int
    job_id: str | None
    log_path: str | None
    config_hash: str
    error: str | None
    claim: str | None = None
    """The live (or last) claim's name: the job's folder under ``jobs/`` and its scheduler job name's suffix."""
    owner: str | None = None
    """``host:pid`` of the process that took the claim."""
    job_dir: str | None = None
    """The claim's job folder (its logs and its published result)."""
    job_name: str | None = None
    """The claim's scheduler job name (how its job is found again when its id was never written)."""
    updated: float = 0.0
    """When the row last changed (seconds since the epoch)."""


def explain(path: Path, err: sqlite3.Error) -> StoreError:
    """One line that says what is wrong with the store at ``path`` and what to do."""
    text = str(err)
    if isinstance(err, sqlite3.DatabaseError) and ("not a database" in text or "malformed" in text):
        return StoreError(
            f"the results store {path} is corrupt ({text}); move it aside (mv {path} {path}.corrupt) and start the "
            "watcher again: it rebuilds the store and evaluates the checkpoints again"
        )
    if "locked" in text or "busy" in text:
        return StoreError(
            f"the results store {path} is locked by another process ({text}); a watcher or an eval may be writing "
            "it: try again in a moment, or find the holder with fuser"
        )
    if "disk is full" in text or "disk I/O error" in text:
        return StoreError(
            f"the results store {path} cannot be written: its disk is full ({text}); free space on "
            f"{path.parent} (or set results.store to another disk) and try again"
        )
    return StoreError(f"the results store {path}: {type(err).__name__}: {text}")


class ResultsStore:
    """The SQLite results store of one run directory (created on first use).

    Args:
        path: the SQLite file.
        timeout_s: how long a statement waits for another process's lock before it fails with `StoreError`.
    """

    def __init__(self, path: str | Path, timeout_s: float = 60.0) -> None:
        if not (isinstance(timeout_s, int | float) and math.isfinite(timeout_s) and timeout_s >= 0):
            raise ValueError(f"ResultsStore: timeout_s={timeout_s!r}; expected a finite number of seconds >= 0")
        self.path = Path(path)
        self.timeout_s = float(timeout_s)
        self._ready = False

    def _ensure_schema(self) -> None:
        if self._ready:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None)
        try:
            db.executescript(_SCHEMA)
            present = {row[1] for row in db.execute("PRAGMA table_info(results)")}
            for column, kind in _ADDED_RESULT_COLUMNS.items():
                if column not in present:  # a store of an older release: its rows keep null intervals
                    db.execute(f"ALTER TABLE results ADD COLUMN {column} {kind}")
        finally:
            db.close()
        self._ready = True

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        try:
            self._ensure_schema()
            db = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None)
        except sqlite3.Error as err:
            raise explain(self.path, err) from err
        try:
            yield db
        except sqlite3.Error as err:
            raise explain(self.path, err) from err
        finally:
            db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._connection() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                if db.in_transaction:  # SQLite rolls back by itself on some errors (a full disk): keep the first error
                    db.execute("ROLLBACK")
                raise
            try:
                db.execute("COMMIT")
            except sqlite3.Error:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    # --- reading -----------------------------------------------------------------------------------------------

    def checkpoints(
        self, where: str = "1", args: Sequence[object] = (), config_hash: str | None = None
    ) -> list[CheckpointRecord]:
        """Every record (optionally filtered, and of one config), by step then path."""
        if config_hash is not None:
            where, args = f"({where}) AND config_hash = ?", (*args, config_hash)
        with self._connection() as db:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM evaluations WHERE {where}"
                " ORDER BY step IS NULL, step, checkpoint, config_hash",
                tuple(args),
            ).fetchall()
        return [CheckpointRecord(*row) for row in rows]

    def checkpoint(self, path: str, config_hash: str | None = None) -> CheckpointRecord | None:
        """The record of one checkpoint (under ``config_hash``, else its newest), or None if never seen."""
        records = self.checkpoints(where="checkpoint = ?", args=(path,), config_hash=config_hash)
        return max(records, key=lambda r: r.updated) if records else None

    def known(self, config_hash: str) -> tuple[set[str], list[int | None]]:
        """The checkpoints recorded under ``config_hash`` and their steps: one query, for discovery."""
        with self._connection() as db:
            rows = db.execute("SELECT checkpoint, step FROM evaluations WHERE config_hash = ?", (config_hash,))
            paths, steps = set(), []
            for path, step in rows:
                paths.add(path)
                steps.append(step)
        return paths, steps

    def results(
        self, checkpoint: str | None = None, config_hash: str | None = None
    ) -> list[tuple[str, int | None, str, str, str, float, str]]:
        """``(checkpoint, step, probe, head, metric, value, config_hash)`` rows, by step."""
        return self._select_results(
            "checkpoint, step, probe, head, metric, value, config_hash", checkpoint, config_hash
        )

    def result_rows(
        self, checkpoint: str | None = None, config_hash: str | None = None
    ) -> list[tuple[str, int | None, str, ResultRow]]:
        """``(checkpoint, step, config_hash, row)`` with each row's interval (None where there is none), by step."""
        columns = "checkpoint, step, config_hash, probe, head, metric, value, low, high"
        found = self._select_results(columns, checkpoint, config_hash)
        return [
            (path, step, hash_, ResultRow(probe, head, metric, value, low=low, high=high))
            for path, step, hash_, probe, head, metric, value, low, high in found
        ]

    def _select_results(self, columns: str, checkpoint: str | None, config_hash: str | None) -> list[Any]:
        """``columns`` of the results of one checkpoint and/or config (all when None), by step."""
        query = f"SELECT {columns} FROM results WHERE 1"
        args: list[object] = []
        if checkpoint is not None:
            query += " AND checkpoint = ?"
            args.append(checkpoint)
        if config_hash is not None:
            query += " AND config_hash = ?"
            args.append(config_hash)
        with self._connection() as db:
            return db.execute(
                query + " ORDER BY step IS NULL, step, checkpoint, config_hash, probe, head, metric", args
            ).fetchall()

    # --- writing: discovery and claims -------------------------------------------------------------------------

    def add(self, config_hash: str, found: Iterable[tuple[str, int | None, State, str | None]]) -> int:
        """Record new checkpoints ``(path, step, state, error)`` in one transaction; known ones are left alone."""
        now = time.time()
        rows = [(path, config_hash, step, state, error, now) for path, step, state, error in found]
        if not rows:
            return 0
        with self._write() as db:
            db.executemany(
                "INSERT OR IGNORE INTO evaluations (checkpoint, config_hash, step, state, error, updated)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
        return len(rows)

    def claim(
        self,
        checkpoint: str,
        config_hash: str,
        step: int | None,
        *,
        claim: str,
        owner: str,
        job_dir: str,
        job_name: str,
        allow_final: bool,
    ) -> CheckpointRecord | None:
        """Take a claim on one evaluation, in one transaction; None if taken, else the record that stands in the way.

        A live claim (``claimed`` or ``submitted``) always stands in the way; a final state does unless
        ``allow_final`` (a user's explicit ``eval`` evaluates a checkpoint again; the watcher does not).
        """
        now = time.time()
        with self._write() as db:
            row = db.execute(
                f"SELECT {_COLUMNS} FROM evaluations WHERE checkpoint = ? AND config_hash = ?",
                (checkpoint, config_hash),
            ).fetchone()
            if row is not None:
                record = CheckpointRecord(*row)
                if record.state in IN_FLIGHT or (record.state in FINAL_STATES and not allow_final):
                    return record
            db.execute(
                "INSERT INTO evaluations"
                " (checkpoint, config_hash, step, state, claim, owner, job_dir, job_name, updated) VALUES"
                " (?, ?, ?, 'claimed', ?, ?, ?, ?, ?)"
                " ON CONFLICT(checkpoint, config_hash) DO UPDATE SET state = 'claimed', claim = excluded.claim,"
                " owner = excluded.owner, job_dir = excluded.job_dir, job_name = excluded.job_name, job_id = NULL,"
                " log_path = NULL, updated = excluded.updated, step = COALESCE(excluded.step, evaluations.step)",
                (checkpoint, config_hash, step, claim, owner, job_dir, job_name, now),
            )
        return None

    def set_job(self, checkpoint: str, config_hash: str, claim: str, job_id: str, log_path: str) -> bool:
        """The claim's job id, once the scheduler answered (counts a try); False if the claim is not live."""
        changes = "state = 'submitted', job_id = ?, log_path = ?, tries = tries + 1"
        return self._update_live_claim(checkpoint, config_hash, claim, changes, (job_id, log_path))

    def release(self, checkpoint: str, config_hash: str, claim: str, state: State, error: str | None) -> bool:
        """End a live claim without results (``pending`` to try again, ``failed``, ``missing``)."""
        assert state not in IN_FLIGHT and state != "done", state
        return self._update_live_claim(checkpoint, config_hash, claim, "state = ?, error = ?", (state, error))

    def _update_live_claim(
        self, checkpoint: str, config_hash: str, claim: str, changes: str, values: tuple[object, ...]
    ) -> bool:
        """Apply ``changes`` (SQL ``SET`` terms, ``values`` their parameters) while ``claim`` is live; False if not."""
        with self._write() as db:
            cursor = db.execute(
                f"UPDATE evaluations SET {changes}, updated = ? WHERE checkpoint = ? AND config_hash = ?"
                " AND claim = ? AND state IN ('claimed', 'submitted')",
                (*values, time.time(), checkpoint, config_hash, claim),
            )
            return cursor.rowcount == 1

    def mark(self, checkpoint: str, config_hash: str, state: State, error: str | None = None) -> None:
        """Set the state of a checkpoint that no claim holds (``missing`` before its turn, say)."""
        assert state not in IN_FLIGHT, state
        with self._write() as db:
            db.execute(
                "UPDATE evaluations SET state = ?, error = ?, updated = ? WHERE checkpoint = ? AND config_hash = ?"
                " AND state NOT IN ('claimed', 'submitted')",
                (state, error, time.time(), checkpoint, config_hash),
            )

    def ingest(
        self, checkpoint: str, config_hash: str, claim: str | None, step: int | None, rows: Iterable[ResultRow]
    ) -> bool:
        """Replace this evaluation's rows and mark it ``done``, in one transaction.

        With a ``claim``, only while that claim is live (a job of an older, released claim is ignored, so a number
        is never recorded twice or by a job nobody waits for); None records unconditionally (an in-process call).
        """
        rows = list(rows)
        now = time.time()
        with self._write() as db:
            if claim is not None:
                live = db.execute(
                    "SELECT 1 FROM evaluations WHERE checkpoint = ? AND config_hash = ? AND claim = ?"
                    " AND state IN ('claimed', 'submitted')",
                    (checkpoint, config_hash, claim),
                ).fetchone()
                if live is None:
                    return False
            db.execute("DELETE FROM results WHERE checkpoint = ? AND config_hash = ?", (checkpoint, config_hash))
            db.executemany(
                "INSERT INTO results (checkpoint, step, probe, head, metric, value, config_hash, created, low, high)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (checkpoint, step, r.probe, r.head, r.metric, float(r.value), config_hash, now, r.low, r.high)
                    for r in rows
                ],
            )
            db.execute(
                "INSERT INTO evaluations (checkpoint, config_hash, step, state, tries, updated)"
                " VALUES (?, ?, ?, 'done', 1, ?)"
                " ON CONFLICT(checkpoint, config_hash) DO UPDATE SET state = 'done', step = excluded.step,"
                " error = NULL, updated = excluded.updated",
                (checkpoint, config_hash, step, now),
            )
        return True

    def record_results(self, checkpoint: str, step: int | None, config_hash: str, rows: Iterable[ResultRow]) -> int:
        """Record an in-process evaluation's rows and its ``done`` state in one transaction (no claim)."""
        rows = list(rows)
        self.ingest(checkpoint, config_hash, None, step, rows)
        return len(rows)

    def retry(self, *, failed: bool, checkpoint: str | None, config_hash: str | None) -> list[CheckpointRecord]:
        """Put checkpoints back to ``pending`` with no tries: every ``failed`` one, and/or one path (not in flight)."""
        clauses, args = [], []
        if failed:
            clauses.append("state = 'failed'")
        if checkpoint is not None:
            clauses.append("(checkpoint = ? AND state NOT IN ('claimed', 'submitted'))")
            args.append(checkpoint)
        if not clauses:
            return []
        where = " OR ".join(clauses)
        if config_hash is not None:
            where = f"({where}) AND config_hash = ?"
            args.append(config_hash)
        with self._write() as db:
            rows = db.execute(f"SELECT {_COLUMNS} FROM evaluations WHERE {where}", args).fetchall()
            db.execute(
                f"UPDATE evaluations SET state = 'pending', tries = 0, error = NULL, updated = ? WHERE {where}",
                (time.time(), *args),
            )
        return [CheckpointRecord(*row) for row in rows]
