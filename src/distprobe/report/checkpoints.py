"""A bank's head order, read from the run's newest Lightning checkpoint.

``eval/{bank}_best_head`` is the selected head's index in the bank's order (`BankConfig.heads`), which follows the
order of the user's lr and weight-decay lists; the logs keep each head's id but not that order. Each checkpoint holds
the bank's state with its ``head_ids`` in order: reading it maps the index to the head exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from distprobe.report.curves import HeadOrders

log = logging.getLogger(__name__)

#: Checkpoints tried, newest first: all hold the same order (a resumed bank refuses another one).
MAX_CHECKPOINTS_TRIED = 3


def saved_head_orders(run_dir: Path, banks: Sequence[str]) -> HeadOrders:
    """Each bank's head ids in its order, and the checkpoint they were read from; banks not found are left out.

    Only ``weights_only`` loads are made (a run directory's pickles are not run), memory-mapped: the model's weights
    are not read into memory. A checkpoint that does not load is skipped.
    """
    if not banks:
        return {}
    import torch

    checkpoints = sorted((p for p in run_dir.rglob("*.ckpt") if p.is_file()), key=lambda p: p.stat().st_mtime)
    for path in reversed(checkpoints[-MAX_CHECKPOINTS_TRIED:]):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # noqa: BLE001 - an unreadable checkpoint only costs the exact head order
            log.info(
                "distprobe report: %s did not load (%s); trying an older checkpoint for the banks' order", path, err
            )
            continue
        callbacks = state.get("callbacks") if isinstance(state, dict) else None
        orders: dict[str, tuple[Sequence[str], str]] = {}
        for value in (callbacks or {}).values():
            if isinstance(value, dict) and value.get("name") in banks and isinstance(value.get("head_ids"), list):
                orders[value["name"]] = ([str(h) for h in value["head_ids"]], str(path))
        if orders:
            return orders
    return {}
