"""The probing service's numbers: its results store, and the copies it writes into the training's log.

The store (`distprobe.service.store.ResultsStore`) has every number and the head each bank selected; the service
also writes ``distprobe_eval.csv`` beside a CSVLogger's ``metrics.csv`` and ``ckpt/*`` scalars into TensorBoard
(`distprobe.service.training_log`), with the same numbers under the keys ``ckpt/{bank}_best_top1``,
``ckpt/{bank}/{head}_top1`` and ``ckpt/{knn}_k20_top1``.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from distprobe import keys
from distprobe.service.store import SERVICE_DIR, STORE_NAME, ResultRow  # the service's names, imported, not copied

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = f"{keys.CHECKPOINT}/"


@dataclass(frozen=True, kw_only=True)
class CheckpointResult(ResultRow):
    """One number of one checkpoint's evaluation by the probing service: the store's `ResultRow` and where it stands.

    Read from TensorBoard or the CSV copy, ``low`` and ``high`` are None (only the store keeps intervals); with
    several evaluation configs of one run, ``probe`` is ``{name}@{config hash}``.
    """

    checkpoint: str
    """The checkpoint's path (empty when only its step is known, from TensorBoard)."""
    step: int
    """The training's global step at the checkpoint."""


def read_stores(run: Path) -> tuple[list[CheckpointResult], list[Path]]:
    """Every result of every ``distprobe_eval/results.sqlite`` under ``run``, and the stores read."""
    from distprobe.service.store import ResultsStore, StoreError

    results: list[CheckpointResult] = []
    stores = sorted(p for p in run.rglob(STORE_NAME) if p.parent.name == SERVICE_DIR and p.is_file())
    read = []
    for path in stores:
        try:
            rows = ResultsStore(path).result_rows()
        except StoreError as err:  # corrupt, or locked too long: the training's own logs still make a report
            log.warning("%s; the report leaves its results out", err)
            continue
        read.append(path)
        hashes = {row[2] for row in rows}
        for checkpoint, step, config_hash, result in rows:
            if step is None:
                log.warning(
                    "%s: checkpoint %s has no global step; its results are left out of the plot", path, checkpoint
                )
                continue
            # Two evaluation configs of one checkpoint are two different probes: keep them apart.
            name = result.probe if len(hashes) == 1 else f"{result.probe}@{config_hash[:8]}"
            results.append(
                CheckpointResult(
                    name,
                    result.head,
                    result.metric,
                    result.value,
                    low=result.low,
                    high=result.high,
                    checkpoint=checkpoint,
                    step=int(step),
                )
            )
    return results, read


def results_of_key(key: str, points: Mapping[int, float], checkpoint: str) -> list[CheckpointResult]:
    """The results a ``ckpt/*`` key's points stand for (none, with a warning, for a key of another form).

    Every key the service writes names a head (`distprobe.service.training_log.logged_key`): `keys.BEST`, a kNN's
    ``k{K}`` or a bank head's id.
    """
    parsed = keys.parse(key)
    if parsed is None or parsed.stage != keys.CHECKPOINT or parsed.head is None:
        log.warning("Checkpoint key %r is not one the probing service writes; left out", key)
        return []
    return [
        CheckpointResult(
            probe=parsed.probe, head=parsed.head, metric=parsed.metric, value=value, checkpoint=checkpoint, step=step
        )
        for step, value in points.items()
    ]


def read_service_csv(path: Path) -> list[CheckpointResult]:
    """The results in one ``distprobe_eval.csv`` (``step,key,value,checkpoint`` rows)."""
    out: list[CheckpointResult] = []
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            try:
                step, value = int(row["step"]), float(row["value"])
            except (KeyError, TypeError, ValueError):
                log.warning("%s: row %s is not 'step,key,value,checkpoint'; left out", path, row)
                continue
            out += results_of_key(row.get("key") or "", {step: value}, checkpoint=row.get("checkpoint") or "")
    return out


def unique(results: Iterable[CheckpointResult]) -> list[CheckpointResult]:
    """One number per (step, probe, head, metric); a named checkpoint wins over a TensorBoard step."""
    kept: dict[tuple[int, str, str, str], CheckpointResult] = {}
    for result in results:
        key = (result.step, result.probe, result.head, result.metric)
        if key not in kept or (result.checkpoint and not kept[key].checkpoint):
            kept[key] = result
    return list(kept.values())
