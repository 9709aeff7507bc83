"""Write a checkpoint's probe results into the training's own log, at the checkpoint's global step.

So that the probe curves line up with the training curves in the tools the run already uses:

- **TensorBoard**: a new event file in the training's log directory (TensorBoard reads every event file of a
  directory), written with ``torch.utils.tensorboard`` or, without the ``tensorboard`` package, ``tensorboardX``
  (Lightning's TensorBoardLogger uses either).
- **CSV** (Lightning's CSVLogger): ``distprobe_eval.csv`` beside its ``metrics.csv``, one ``step,key,value,checkpoint``
  row per number. The training may still be writing ``metrics.csv`` (CSVLogger rewrites it whole when a new key
  appears), so the service never touches that file; appends to its own file hold an exclusive lock.

Keys are those of the online probes with the stage ``ckpt``: ``ckpt/{bank}_best_top1``, ``ckpt/{bank}/{head}_top1``,
``ckpt/{knn}_k20_top1``.
"""

from __future__ import annotations

import csv
import fcntl
import io
import logging
from collections.abc import Iterable
from pathlib import Path

from distprobe import keys
from distprobe.service.store import ResultRow

log = logging.getLogger(__name__)

CSV_NAME = "distprobe_eval.csv"
#: The suffix of the service's own TensorBoard event files (the report reads them apart from the training's).
EVENTS_SUFFIX = ".distprobe"


def logged_key(row: ResultRow) -> str:
    """The key a result row is logged under (`distprobe.keys`, stage `distprobe.keys.CHECKPOINT`)."""
    return keys.key(keys.CHECKPOINT, row.probe, row.metric, head=row.head)


def find_log_dir(run_dir: Path) -> tuple[str, Path] | None:
    """The newest directory under ``run_dir`` holding TensorBoard event files or a ``metrics.csv``, and its kind."""
    found: list[tuple[float, str, Path]] = []
    for events in run_dir.rglob("events.out.tfevents.*"):
        found.append((events.stat().st_mtime, "tensorboard", events.parent))
    for metrics in run_dir.rglob("metrics.csv"):
        found.append((metrics.stat().st_mtime, "csv", metrics.parent))
    if not found:
        return None
    _, kind, directory = max(found)
    return kind, directory


def write_tensorboard(directory: Path, step: int, rows: Iterable[ResultRow]) -> Path:
    """One new event file (``*.distprobe``) of scalars at ``step`` in ``directory``; returns the directory."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        try:
            from tensorboardX import SummaryWriter  # type: ignore[no-redef]
        except ImportError:
            raise ImportError(
                f"distprobe eval: {directory} holds TensorBoard logs, but neither tensorboard nor tensorboardX is "
                "installed; pip install tensorboard, or set results.logger: csv or none"
            ) from None
    writer = SummaryWriter(log_dir=str(directory), filename_suffix=EVENTS_SUFFIX)
    try:
        for row in rows:
            if row.metric != keys.SELECTED:
                writer.add_scalar(logged_key(row), row.value, global_step=step)
    finally:
        writer.close()
    return directory


def write_csv(directory: Path, step: int, checkpoint: str, rows: Iterable[ResultRow]) -> Path:
    """Append ``step,key,value,checkpoint`` rows to ``directory/distprobe_eval.csv`` (under an exclusive lock)."""
    path = directory / CSV_NAME
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    for row in rows:
        if row.metric != keys.SELECTED:
            writer.writerow([step, logged_key(row), repr(row.value), checkpoint])
    with path.open("a", newline="") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        if handle.tell() == 0:
            handle.write("step,key,value,checkpoint\n")
        handle.write(buffer.getvalue())
    return path


def write_training_log(
    kind: str, run_dir: Path, log_dir: str | None, step: int | None, checkpoint: str, rows: list[ResultRow]
) -> Path | None:
    """Write the rows where ``kind`` (``auto``, ``tensorboard``, ``csv``, ``none``) says; the path written, if any."""
    if kind == "none":
        return None
    if step is None:
        log.warning("%s has no global step: its results are not written to the training's log", checkpoint)
        return None
    if log_dir is not None:
        directory = Path(log_dir)
        if kind == "auto":
            kind = "tensorboard" if any(directory.glob("events.out.tfevents.*")) else "csv"
    else:
        found = find_log_dir(run_dir)
        if found is None:
            log.warning("No TensorBoard or CSV log under %s: results go to the store only", run_dir)
            return None
        found_kind, directory = found
        kind = found_kind if kind == "auto" else kind
    directory.mkdir(parents=True, exist_ok=True)
    if kind == "tensorboard":
        return write_tensorboard(directory, step, rows)
    return write_csv(directory, step, checkpoint, rows)
