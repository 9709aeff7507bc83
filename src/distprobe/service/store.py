"""The results store: one SQLite file per run directory, shared by the watcher and its evaluation jobs.

Two tables:

- ``checkpoints``: one row per checkpoint the watcher has seen, with its state (``pending``, ``submitted``, ``done``,
  ``failed``, ``missing``, ``skipped``), its tries, the job it runs as and that job's log. Only the evaluation job
  moves a checkpoint to ``done``; the watcher makes every other move.
- ``results``: one row per (checkpoint, config hash, probe, head, metric) with its value and the checkpoint's step.

A job writes all its rows and its ``done`` state in one transaction, so a job killed mid-write leaves no
half-written result, and a job that runs twice (a requeue after its write) replaces its rows instead of doubling
them: evaluation is exactly once from the store's point of view. Writers take SQLite's write lock up front
(``BEGIN IMMEDIATE``) and wait for it; the default rollback journal is kept because SQLite's WAL mode needs shared
memory that network filesystems (NFS, Lustre) do not provide.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

SERVICE_DIR = "distprobe_eval"
"""Everything the service writes in a run directory goes under this folder."""
STORE_NAME = "results.sqlite"
"""The store's file name in `SERVICE_DIR`."""


def default_store_path(run_dir: Path) -> Path:
    """Where a run directory's results store is, unless the config names another."""
    return run_dir / SERVICE_DIR / STORE_NAME


State = Literal["pending", "submitted", "done", "failed", "missing", "skipped"]
#: States after which the watcher never submits the checkpoint again.
FINAL_STATES: tuple[State, ...] = ("done", "failed", "missing", "skipped")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS checkpoints (
    path TEXT PRIMARY KEY,
    step INTEGER,
    state TEXT NOT NULL,
    tries INTEGER NOT NULL DEFAULT 0,
    job_id TEXT,
    log_path TEXT,
    config_hash TEXT,
    error TEXT,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS results (
    checkpoint TEXT NOT NULL,
    step INTEGER,
    probe TEXT NOT NULL,
    head TEXT NOT NULL,
    metric TEXT NOT NULL,
    value REAL NOT NULL,
    config_hash TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (checkpoint, config_hash, probe, head, metric)
);
"""


@dataclass(frozen=True)
class ResultRow:
    """One number of one evaluation."""

    probe: str
    """The probe's name (a bank's or a kNN's)."""
    head: str
    """The head's id in a bank, ``k{K}`` for a kNN, ``best`` for the bank's selected head."""
    metric: str
    """``top1``, ``top5``... (for ``best``: also ``head_index``)."""
    value: float


@dataclass(frozen=True)
class CheckpointRecord:
    """What the store knows of one checkpoint."""

    path: str
    step: int | None
    state: State
    tries: int
    job_id: str | None
    log_path: str | None
    config_hash: str | None
    error: str | None


class ResultsStore:
    """The SQLite results store of one run directory (created on first use)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connection() as db:
            db.executescript(_SCHEMA)

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        # A long timeout: the watcher and several jobs may wait for each other's short write transactions.
        db = sqlite3.connect(self.path, timeout=120.0, isolation_level=None)
        try:
            yield db
        finally:
            db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._connection() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # --- the evaluation job's side -----------------------------------------------------------------------------

    def record_results(self, checkpoint: str, step: int | None, config_hash: str, rows: Iterable[ResultRow]) -> int:
        """Replace this (checkpoint, config) evaluation's rows and mark the checkpoint done, in one transaction."""
        rows = list(rows)
        now = time.time()
        with self._write() as db:
            db.execute("DELETE FROM results WHERE checkpoint = ? AND config_hash = ?", (checkpoint, config_hash))
            db.executemany(
                "INSERT INTO results VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(checkpoint, step, r.probe, r.head, r.metric, float(r.value), config_hash, now) for r in rows],
            )
            db.execute(
                "INSERT INTO checkpoints (path, step, state, tries, config_hash, updated)"
                " VALUES (?, ?, 'done', 1, ?, ?)"
                " ON CONFLICT(path) DO UPDATE SET state = 'done', step = excluded.step, error = NULL,"
                " config_hash = excluded.config_hash, updated = excluded.updated",
                (checkpoint, step, config_hash, now),
            )
        return len(rows)

    # --- the watcher's side ------------------------------------------------------------------------------------

    def mark(self, checkpoint: str, state: State, *, step: int | None = None, **fields: str | int | None) -> None:
        """Set a checkpoint's state (and ``tries``, ``job_id``, ``log_path``, ``config_hash``, ``error``)."""
        allowed = {"tries", "job_id", "log_path", "config_hash", "error"}
        unknown = set(fields) - allowed
        assert not unknown, f"unknown checkpoint fields {unknown}"
        now = time.time()
        with self._write() as db:
            db.execute(
                "INSERT INTO checkpoints (path, step, state, updated) VALUES (?, ?, ?, ?)"
                " ON CONFLICT(path) DO UPDATE SET state = excluded.state, updated = excluded.updated,"
                " step = COALESCE(excluded.step, checkpoints.step)",
                (checkpoint, step, state, now),
            )
            for name, value in fields.items():  # names checked above: never user text in the SQL
                db.execute(f"UPDATE checkpoints SET {name} = ? WHERE path = ?", (value, checkpoint))

    def checkpoint(self, path: str) -> CheckpointRecord | None:
        """The record of one checkpoint, or None if the store has never seen it."""
        records = self.checkpoints(where="path = ?", args=(path,))
        return records[0] if records else None

    def checkpoints(self, where: str = "1", args: Sequence[object] = ()) -> list[CheckpointRecord]:
        """Every checkpoint record (optionally filtered), by step then path."""
        with self._connection() as db:
            rows = db.execute(
                "SELECT path, step, state, tries, job_id, log_path, config_hash, error FROM checkpoints"
                f" WHERE {where} ORDER BY step IS NULL, step, path",
                tuple(args),
            ).fetchall()
        return [CheckpointRecord(*row) for row in rows]

    def results(self, checkpoint: str | None = None) -> list[tuple[str, int | None, str, str, str, float, str]]:
        """``(checkpoint, step, probe, head, metric, value, config_hash)`` rows, by step."""
        query = "SELECT checkpoint, step, probe, head, metric, value, config_hash FROM results"
        args: tuple[object, ...] = ()
        if checkpoint is not None:
            query += " WHERE checkpoint = ?"
            args = (checkpoint,)
        with self._connection() as db:
            return db.execute(query + " ORDER BY step IS NULL, step, checkpoint, probe, head, metric", args).fetchall()
