"""Read a run's logs into one set of scalar curves and one list of checkpoint evaluations.

Three sources, found anywhere under the run directory:

- Lightning's CSVLogger: ``metrics.csv`` (wide: ``epoch``, ``step`` and one sparse column per key).
- TensorBoard: ``events.out.tfevents.*`` files, read with the ``tensorboard`` package when it is installed.
- The probing service: its store ``distprobe_eval/results.sqlite`` and the ``distprobe_eval.csv`` (or TensorBoard
  ``ckpt/*`` scalars) it writes beside the training's log. When the store holds results, it alone is read for them:
  the CSV and ``ckpt/*`` scalars carry the same numbers, and reading both would count each twice.

A run directory logged to more than once holds several Lightning ``version_N`` folders side by side. The newest is
read, and an older one only as far as the newer one resumed it (its steps before the newer one's first step); an older
folder that starts where the newer one starts is an earlier, separate run and is skipped with a note.
"""

from __future__ import annotations

import csv
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from distprobe.report.service_logs import (
    CHECKPOINT_PREFIX,
    CheckpointResult,
    read_service_csv,
    read_stores,
    results_of_key,
    unique,
)

# The probing service's names, imported rather than copied.
from distprobe.service.store import SERVICE_DIR, STORE_NAME
from distprobe.service.training_log import CSV_NAME as SERVICE_CSV
from distprobe.service.training_log import EVENTS_SUFFIX as SERVICE_EVENTS_SUFFIX

log = logging.getLogger(__name__)

Point = tuple[int, float]
"""``(step, value)``."""
Series = tuple[Point, ...]
"""Points sorted by step, one per step."""

METRICS_CSV = "metrics.csv"
EVENTS_GLOB = "events.out.tfevents.*"

_VERSION = re.compile(r"^version_(\d+)$")


class NoLogsError(ValueError):
    """The run directory holds no log the report can read."""


class TensorBoardUnavailableError(ImportError):
    """The run logged to TensorBoard, and the ``tensorboard`` package that reads its event files is not installed."""


@dataclass(frozen=True)
class RunLogs:
    """Everything read from one run directory."""

    run_dir: Path
    """The directory searched."""
    scalars: dict[str, Series]
    """Every logged key (``ckpt/*`` keys excluded) and its points."""
    checkpoint_results: tuple[CheckpointResult, ...]
    """The probing service's numbers, by step."""
    sources: tuple[tuple[Path, str], ...]
    """Each file read and its kind (``csv``, ``tensorboard``, ``store``, ``service csv``)."""
    notes: tuple[str, ...] = field(default=())
    """What was skipped, and why."""


@dataclass
class _Segment:
    """One log folder's scalars (a CSVLogger or TensorBoardLogger version)."""

    folder: Path
    kind: str
    files: list[Path]
    scalars: dict[str, dict[int, float]]

    @property
    def first_step(self) -> int | None:
        # The service's ``ckpt/*`` numbers sit at checkpoints' steps, which say nothing of where this log starts.
        steps = [min(p) for key, p in self.scalars.items() if p and not key.startswith(CHECKPOINT_PREFIX)]
        return min(steps) if steps else None


def read_run(run_dir: str | Path) -> RunLogs:
    """Read every log under ``run_dir``.

    Raises:
        NoLogsError: ``run_dir`` is not a directory, or holds no log this module reads.
        TensorBoardUnavailableError: it holds TensorBoard event files and ``tensorboard`` is not installed.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise NoLogsError(
            f"distprobe report: argument 'run_dir' got '{run}', which is not a directory; expected a training's run "
            "directory (the Trainer's default_root_dir or its logger's save_dir)."
        )
    results, stores = read_stores(run)
    sources: list[tuple[Path, str]] = [(path, "store") for path in stores]
    skip_service_logs = bool(results)
    segments = _read_segments(run, skip_service_logs)
    kept, notes = _resolve_versions(segments)
    scalars: dict[str, dict[int, float]] = {}
    logged_results: list[CheckpointResult] = []
    for segment in kept:
        sources += [(path, segment.kind) for path in segment.files]
        for key, points in segment.scalars.items():
            if key.startswith(CHECKPOINT_PREFIX):
                if not skip_service_logs:
                    logged_results += results_of_key(key, points, checkpoint="")
                continue
            scalars.setdefault(key, {}).update(points)
    if not skip_service_logs:
        for path in sorted(run.rglob(SERVICE_CSV)):
            logged_results += read_service_csv(path)
            sources.append((path, "service csv"))
        results = unique(logged_results)
    if not sources:
        raise NoLogsError(
            f"distprobe report: no logs under '{run}': expected a Lightning CSVLogger '{METRICS_CSV}', TensorBoard "
            f"'{EVENTS_GLOB}' files, or the probing service's '{SERVICE_DIR}/{STORE_NAME}'; pass the training's run "
            "directory (the Trainer's default_root_dir or its logger's save_dir)."
        )
    return RunLogs(
        run_dir=run,
        scalars={key: tuple(sorted(points.items())) for key, points in sorted(scalars.items())},
        checkpoint_results=tuple(sorted(results, key=lambda r: (r.step, r.checkpoint, r.probe, r.head, r.metric))),
        sources=tuple(sources),
        notes=tuple(notes),
    )


# --- the training's own logs ------------------------------------------------------------------------------------


def _read_segments(run: Path, skip_service_logs: bool) -> list[_Segment]:
    segments = [_Segment(p.parent, "csv", [p], _read_metrics_csv(p)) for p in sorted(run.rglob(METRICS_CSV))]
    by_folder: dict[Path, list[Path]] = {}
    for events in sorted(run.rglob(EVENTS_GLOB)):
        if skip_service_logs and events.name.endswith(SERVICE_EVENTS_SUFFIX):
            continue  # the store's numbers, again
        by_folder.setdefault(events.parent, []).append(events)
    for folder, files in by_folder.items():
        scalars: dict[str, dict[int, float]] = {}
        for events in files:
            for key, points in read_tensorboard(events).items():
                scalars.setdefault(key, {}).update(points)
        segments.append(_Segment(folder, "tensorboard", files, scalars))
    return segments


def _read_metrics_csv(path: Path) -> dict[str, dict[int, float]]:
    scalars: dict[str, dict[int, float]] = {}
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or "step" not in reader.fieldnames:
            log.warning("%s has no 'step' column: not a Lightning CSVLogger file; left out", path)
            return scalars
        for row in reader:
            step = _number(row.get("step"))
            if step is None or not math.isfinite(step):
                continue
            for key, text in row.items():
                value = _number(text)
                if key in ("step", "epoch") or key is None or value is None:
                    continue
                scalars.setdefault(key, {})[int(step)] = value
    return scalars


def _number(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def read_tensorboard(path: Path) -> dict[str, dict[int, float]]:
    """Every scalar of one TensorBoard event file, as ``{tag: {step: value}}``.

    Raises:
        TensorBoardUnavailableError: the ``tensorboard`` package is not installed.
    """
    try:
        from tensorboard.backend.event_processing.event_accumulator import (
            SCALARS,
            TENSORS,
            EventAccumulator,
        )
        from tensorboard.util import tensor_util
    except ImportError as err:
        raise TensorBoardUnavailableError(
            f"distprobe report: '{path}' is a TensorBoard event file, and reading it needs the 'tensorboard' package, "
            "which is not installed; pip install tensorboard (or log with Lightning's CSVLogger)."
        ) from err
    # 0 keeps every event: the default keeps a random sample of 10,000 scalars per tag.
    accumulator = EventAccumulator(str(path), size_guidance={SCALARS: 0, TENSORS: 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    out: dict[str, dict[int, float]] = {}
    for tag in tags.get(SCALARS, []):
        if tag != "epoch":  # Lightning's epoch counter, a column of its own in metrics.csv
            out[tag] = {int(e.step): float(e.value) for e in accumulator.Scalars(tag)}
    # Writers of TF2-style summaries store a scalar as a one-element tensor, not as a simple value.
    for tag in tags.get(TENSORS, []):
        if tag == "epoch":
            continue
        points: dict[int, float] = {}
        for event in accumulator.Tensors(tag):
            array = tensor_util.make_ndarray(event.tensor_proto)
            if array.size == 1 and array.dtype.kind in "fiub":
                points[int(event.step)] = float(array.reshape(-1)[0])
        if points:
            out.setdefault(tag, {}).update(points)
    return out


def _resolve_versions(segments: list[_Segment]) -> tuple[list[_Segment], list[str]]:
    """The segments to read: in each folder of ``version_N`` siblings, the newest and what it resumed."""
    groups: dict[tuple[str, Path], list[tuple[int, _Segment]]] = {}
    kept: list[_Segment] = []
    for segment in segments:
        match = _VERSION.match(segment.folder.name)
        if match is None:
            kept.append(segment)
        else:
            groups.setdefault((segment.kind, segment.folder.parent), []).append((int(match[1]), segment))
    notes: list[str] = []
    for versions in groups.values():
        versions.sort(key=lambda item: item[0])
        newest = versions[-1][1]
        kept.append(newest)
        start = newest.first_step
        for _, older in reversed(versions[:-1]):
            first = older.first_step
            if start is None or first is None or first >= start:
                notes.append(
                    f"skipped {older.folder}: its steps start at {first}, not before step {start} where the later "
                    f"logs of {newest.folder.parent} take over; an earlier, separate run"
                )
                continue
            # Resumed at `start`: what the older version logged from there on was redone by the newer one.
            older.scalars = {
                key: {s: v for s, v in points.items() if s < start} for key, points in older.scalars.items()
            }
            kept.append(older)
            start = first
    for note in notes:
        log.info("distprobe report: %s", note)
    return kept, notes
