"""What a job publishes in its own folder, and how the store's writer reads it back: JSON, never a pickle.

A job never writes the results store (it may run on another machine, over NFS or Lustre, where SQLite's locks are
not to be trusted). Rank 0 writes ``result.json`` (or ``error.json`` when the evaluation raised) into the job's
folder atomically: a temporary file, ``fsync``, ``rename``, then ``fsync`` of the folder, so a reader sees no file
or a whole one, even after a crash. The watcher (or the ``eval`` command that submitted the job) ingests the file
into the store in one transaction. JSON is read with size and type checks and never runs code, so a file planted in
the run directory can at worst claim wrong numbers for a checkpoint, never act as the watcher's user.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distprobe.service.store import ResultRow

RESULT_NAME = "result.json"
ERROR_NAME = "error.json"
FORMAT = 1
_MAX_BYTES = 64 * 2**20  # a result file is a few KB per probe; anything larger is not one of ours


@dataclass(frozen=True)
class PublishedResult:
    """One job's published numbers."""

    checkpoint: str
    step: int | None
    config_hash: str
    claim: str | None
    rows: list[ResultRow]


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader, or a crash, sees the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not keep a partial file (and its blocks) in the job folder
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself reaches the disk
    finally:
        os.close(folder)


def publish_result(job_dir: Path, result: PublishedResult) -> Path:
    """Write the job's ``result.json``; returns its path."""
    payload = {
        "format": FORMAT,
        "checkpoint": result.checkpoint,
        "step": result.step,
        "config_hash": result.config_hash,
        "claim": result.claim,
        "rows": [_row(r) for r in result.rows],
    }
    path = job_dir / RESULT_NAME
    job_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(payload))
    return path


def _row(row: ResultRow) -> list[str | float]:
    """A row as JSON: ``[probe, head, metric, value]``, then ``low, high`` when it has an interval."""
    out: list[str | float] = [row.probe, row.head, row.metric, float(row.value)]
    if row.ends is not None:
        out += [float(end) for end in row.ends]
    return out


def finite_rows(rows: list[ResultRow]) -> tuple[list[ResultRow], list[str]]:
    """``rows`` that can be published, and the names (``probe/head/metric``) of the numbers left out.

    A value that is not finite has no place in the store (a reader refuses the whole file that holds one, which lost
    every other number of the job): its row is left out. An interval with an end that is not finite is dropped from
    an otherwise finite row. The best head of a validation set too small for its selection share scores NaN.
    """
    kept, left_out = [], []
    for row in rows:
        if not _number(row.value):
            left_out.append(f"{row.probe}/{row.head}/{row.metric}={row.value}")
            continue
        ends = row.ends
        if ends is not None and not all(_number(end) for end in ends):
            row = dataclasses.replace(row, low=None, high=None)
        kept.append(row)
    return kept, left_out


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def publish_error(job_dir: Path, error: BaseException) -> Path:
    """Write the job's ``error.json`` (the exception's type and message): read by the watcher instead of a log."""
    path = job_dir / ERROR_NAME
    job_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps({"format": FORMAT, "error": f"{type(error).__name__}: {error}"[:4000]}))
    return path


class PublishedFileError(ValueError):
    """A job folder's file that is not a result this service wrote."""


def _read_json(path: Path) -> Any:
    if path.stat().st_size > _MAX_BYTES:
        raise PublishedFileError(f"{path}: {path.stat().st_size} bytes; a result file is far smaller")
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as err:
        raise PublishedFileError(f"{path}: not JSON ({err})") from None


def _require(condition: bool) -> None:
    if not condition:
        raise ValueError("unexpected content")


def read_result(job_dir: Path) -> PublishedResult | None:
    """The job's published result, or None if it has published none (yet).

    Raises:
        PublishedFileError: the file is not a result of this service's format.
    """
    path = job_dir / RESULT_NAME
    if not path.is_file():
        return None
    data = _read_json(path)
    try:
        _require(isinstance(data, dict) and data.get("format") == FORMAT)
        checkpoint, step, config_hash, claim = data["checkpoint"], data["step"], data["config_hash"], data["claim"]
        _require(isinstance(checkpoint, str) and isinstance(config_hash, str))
        _require(step is None or (isinstance(step, int) and not isinstance(step, bool)))
        _require(claim is None or isinstance(claim, str))
        rows = []
        for row in data["rows"]:
            _require(isinstance(row, list) and len(row) in (4, 6))
            probe, head, metric, *numbers = row
            _require(isinstance(probe, str) and isinstance(head, str) and isinstance(metric, str))
            _require(all(_number(v) for v in numbers))
            value, *ends = (float(v) for v in numbers)
            low, high = ends or (None, None)
            rows.append(ResultRow(probe, head, metric, value, low=low, high=high))
    except (KeyError, TypeError, ValueError):
        raise PublishedFileError(f"{path}: not a distprobe result file (format {FORMAT})") from None
    # The store keeps one number per (probe, head, metric): a file with two would fail every ingestion of the store.
    counts = Counter((r.probe, r.head, r.metric) for r in rows)
    twice = sorted(key for key, count in counts.items() if count > 1)[:3]
    if twice:
        raise PublishedFileError(
            f"{path}: the same (probe, head, metric) given twice, e.g. {twice}: two probes of one name, or a value "
            "listed twice in the config"
        )
    return PublishedResult(checkpoint=checkpoint, step=step, config_hash=config_hash, claim=claim, rows=rows)


def read_error(job_dir: Path) -> str | None:
    """The error a job published, if any."""
    path = job_dir / ERROR_NAME
    if not path.is_file():
        return None
    try:
        data = _read_json(path)
    except PublishedFileError as err:
        return str(err)
    error = data.get("error") if isinstance(data, dict) else None
    return error if isinstance(error, str) else f"{path}: not a distprobe error file"
