"""`distprobe results RUN_DIR`: the results store as a table, JSON or CSV, one row per checkpoint and config.

- ``table``: for a bank, the selected head's accuracy on the report split (``best``) and which head it is; for a
  kNN, each k's accuracy; the config hash of each row. Checkpoints that failed or went missing are listed with why,
  and a trend line per config says how the first metric moved from the first evaluated checkpoint to the last.
- ``json``: a list of rows ``{"checkpoint", "step", "state", "config_hash", "values", "selected"}``; ``values`` maps
  each logged key (``ckpt/bank_best_top1``...) to its number, ``selected`` each bank to its selected head.
- ``csv``: the same rows, one column per logged key.

Rows of several configs are never mixed: each row carries its config hash, and ``config_hash`` picks one.
"""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

from distprobe.keys import CHECKPOINT, SELECTED, parse, parse_head_id
from distprobe.service.store import CheckpointRecord, ResultRow, ResultsStore
from distprobe.service.training_log import logged_key

Format = Literal["table", "json", "csv"]
FORMATS: tuple[Format, ...] = ("table", "json", "csv")
_HASH_SHOWN = 8  # characters of the config hash in the table (the JSON and CSV hold it whole)


def rows_of(store: ResultsStore, config_hash: str | None = None) -> list[dict[str, Any]]:
    """One dict per (checkpoint, config): its path, step, state, config hash, values, selected heads, tries, error."""
    values: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    selected: dict[tuple[str, str], dict[str, str]] = defaultdict(dict)
    for checkpoint, _, probe, head, metric, value, hash_ in store.results(config_hash=config_hash):
        if metric == SELECTED:
            selected[(checkpoint, hash_)][probe] = head
        else:
            values[(checkpoint, hash_)][logged_key(ResultRow(probe, head, metric, value))] = value
    rows = []
    for record in store.checkpoints(config_hash=config_hash):
        key = (record.path, record.config_hash)
        rows.append(
            {
                "checkpoint": record.path,
                "step": record.step,
                "state": record.state,
                "config_hash": record.config_hash,
                "values": values.get(key, {}),
                "selected": selected.get(key, {}),
                "tries": record.tries,
                "error": record.error,
            }
        )
    return rows


def render(store: ResultsStore, fmt: Format = "table", full_paths: bool = False, config_hash: str | None = None) -> str:
    """The store's rows in ``fmt``, as text."""
    rows = rows_of(store, config_hash)
    if fmt == "json":
        return json.dumps(rows, indent=1) + "\n"
    if fmt == "csv":
        return _csv(rows)
    if not rows:
        return f"no checkpoints recorded in {store.path}" + (f" for config {config_hash}" if config_hash else "") + "\n"
    return _table(rows, full_paths, store.checkpoints(config_hash=config_hash))


def _value_keys(rows: list[dict[str, Any]]) -> list[str]:
    return sorted({key for row in rows for key in row["values"]})


def _csv(rows: list[dict[str, Any]]) -> str:
    keys = _value_keys(rows)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["checkpoint", "step", "state", "config_hash", *keys])
    for row in rows:
        step = "" if row["step"] is None else row["step"]
        cells = [repr(row["values"][k]) if k in row["values"] else "" for k in keys]
        writer.writerow([row["checkpoint"], step, row["state"], row["config_hash"], *cells])
    return buffer.getvalue()


def _shown(key: str) -> bool:
    """The table shows each bank's best head and each kNN's k (the JSON and CSV show every key)."""
    parsed = parse(key)
    return parsed is None or parsed.head is None or parse_head_id(parsed.head) is None


def _table(rows: list[dict[str, Any]], full_paths: bool, records: list[CheckpointRecord]) -> str:
    keys = [k for k in _value_keys(rows) if _shown(k)]
    banks = sorted({bank for row in rows for bank in row["selected"]})
    header = ["step", "checkpoint", "config", "state"] + [k.removeprefix(f"{CHECKPOINT}/") for k in keys]
    header += [f"{bank} head" for bank in banks]
    lines = [header]
    for row in rows:
        name = row["checkpoint"] if full_paths else Path(row["checkpoint"]).name
        line = ["-" if row["step"] is None else str(row["step"]), name, row["config_hash"][:_HASH_SHOWN], row["state"]]
        line += [f"{row['values'][k]:.4f}" if k in row["values"] else "" for k in keys]
        line += [row["selected"].get(bank, "") for bank in banks]
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines) + "\n"
    for record in records:
        if record.state in ("failed", "missing"):
            text += f"{record.state}: {record.path} after {record.tries} tr{'y' if record.tries == 1 else 'ies'}"
            text += f" ({record.error})" if record.error else ""
            text += f"; log {record.log_path}\n" if record.log_path else "\n"
    for config_hash in sorted({row["config_hash"] for row in rows}):
        text += _trend([row for row in rows if row["config_hash"] == config_hash], keys)
    return text


def _trend(rows: list[dict[str, Any]], keys: list[str]) -> str:
    first = next((k for k in keys if any(k in row["values"] for row in rows)), None)
    if first is None:
        return ""
    series = [
        (row["step"], Path(row["checkpoint"]).name, row["values"][first]) for row in rows if first in row["values"]
    ]
    (step0, _, v0), (step1, _, v1) = series[0], series[-1]
    peak = max(series, key=lambda s: s[2])
    name = first.removeprefix(f"{CHECKPOINT}/")
    return (
        f"trend {name} (config {rows[0]['config_hash'][:_HASH_SHOWN]}): {v0:.4f} at step "
        f"{step0} -> {v1:.4f} at step {step1} ({v1 - v0:+.4f} over {len(series)} checkpoint(s)); best {peak[2]:.4f} "
        f"at step {peak[0]} ({peak[1]})\n"
    )
