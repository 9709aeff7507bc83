"""One flat sync for the metric states of many probes.

torchmetrics syncs each state of each metric on its own (barrier, size gather, data gather): 8 probes x 3 metrics
cost 288 collectives. Here every state is read from the metric's own declaration (``_reductions``, set by
``add_state(..., dist_reduce_fx=)``) and synced together with the others:

- states reduced by sum / mean / max / min: one flattened ``all_reduce`` per (reduction, dtype);
- cat states (AUROC-like): their shapes ride along in the int64 sum buffer, then one padded ``all_gather`` per dtype.

For 3 classification metrics on any number of probes that is a single all-reduce; adding AUROC adds one gather per
dtype of its states. Metrics with any other reduction (``None``, a custom callable) keep torchmetrics' own sync.

The synced values are set on each metric only while it computes (torchmetrics' sync is turned off for it), then
the local states come back, exactly as torchmetrics' ``sync_context`` does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torchmetrics import Metric, MetricCollection
from torchmetrics.utilities.data import dim_zero_cat, dim_zero_max, dim_zero_mean, dim_zero_min, dim_zero_sum

#: How each torchmetrics reduction is synced: a ReduceOp for flat all-reduces, "cat" for gathers.
REDUCTIONS: dict[Any, Any] = {
    dim_zero_sum: dist.ReduceOp.SUM,
    dim_zero_mean: dist.ReduceOp.SUM,  # then divided by the world size, as torch.mean over ranks does
    dim_zero_max: dist.ReduceOp.MAX,
    dim_zero_min: dist.ReduceOp.MIN,
    dim_zero_cat: "cat",
}
#: Cat states travel as flat buffers; their dtype is sent as an index into this tuple.
_CAT_DTYPES = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
)
#: Per cat state and rank: numel, dtype index + 1 (0: no data), ndim, then up to this many trailing dimensions.
_MAX_TRAILING = 6
_META = 3 + _MAX_TRAILING


def can_flat_sync(metric: Metric) -> bool:
    """Whether every state of ``metric`` reduces in a way the flat sync handles (else torchmetrics syncs it).

    Decided from the metric's declarations only, never from its data, so that every rank decides alike.
    """
    for attr, reduction in metric._reductions.items():
        kind = REDUCTIONS.get(reduction)
        if kind is None:
            return False
        if kind != "cat" and not isinstance(metric._defaults[attr], torch.Tensor):
            return False
    return True


def _local_cat(value: Any) -> torch.Tensor | None:
    """This rank's cat state as one tensor, None when it holds no data."""
    if isinstance(value, torch.Tensor):
        return torch.atleast_1d(value) if value.numel() else None
    parts = [v for v in value if v.numel()]
    return dim_zero_cat(parts) if parts else None


def _key(slot: tuple[Metric, str]) -> tuple[int, str]:
    # By identity: a Metric's __hash__ hashes its states and its __eq__ builds a CompositionalMetric.
    return id(slot[0]), slot[1]


@dataclass
class _Plan:
    """Where each synced state goes, built identically on every rank from the metrics' declarations."""

    reduce_slots: dict[tuple[Any, torch.dtype], list[tuple[Metric, str]]] = field(default_factory=dict)
    cat_slots: list[tuple[Metric, str]] = field(default_factory=list)


def _plan(metrics: Sequence[Metric]) -> _Plan:
    plan = _Plan()
    for metric in metrics:
        for attr, reduction in metric._reductions.items():
            op = REDUCTIONS[reduction]
            if op == "cat":
                plan.cat_slots.append((metric, attr))
            else:
                plan.reduce_slots.setdefault((op, getattr(metric, attr).dtype), []).append((metric, attr))
    return plan


def _cat_metadata(plan: _Plan, rank: int, world: int, device: torch.device) -> torch.Tensor:
    meta = torch.zeros(world, len(plan.cat_slots), _META, dtype=torch.long)
    for i, (metric, attr) in enumerate(plan.cat_slots):
        local = _local_cat(getattr(metric, attr))
        if local is None:
            continue
        trailing = list(local.shape[1:])
        assert len(trailing) <= _MAX_TRAILING, f"cat state {attr!r} has {local.ndim} dimensions"
        row = [local.numel(), _CAT_DTYPES.index(local.dtype) + 1, local.ndim, *trailing]
        meta[rank, i, : len(row)] = torch.tensor(row)
    return meta.flatten().to(device)


def _all_reduce_flat(
    plan: _Plan, group: dist.ProcessGroup | None, world: int, extra_long_sum: torch.Tensor
) -> tuple[dict[tuple[int, str], torch.Tensor], torch.Tensor]:
    """One all-reduce per (reduction, dtype); the int64 sum buffer also carries the cat metadata."""
    synced: dict[tuple[int, str], torch.Tensor] = {}
    keys = list(plan.reduce_slots)
    long_sum = (dist.ReduceOp.SUM, torch.long)
    if extra_long_sum.numel() and long_sum not in keys:
        keys.append(long_sum)
    meta = extra_long_sum
    for op, dtype in keys:
        slots = plan.reduce_slots.get((op, dtype), [])
        tensors = [getattr(m, a) for m, a in slots]
        parts = [t.reshape(-1) for t in tensors]
        device = tensors[0].device if tensors else extra_long_sum.device
        if (op, dtype) == long_sum:
            parts.append(extra_long_sum.to(device))
        flat = torch.cat(parts)
        dist.all_reduce(flat, op=op, group=group)
        offset = 0
        for (metric, attr), tensor in zip(slots, tensors):
            value = flat[offset : offset + tensor.numel()].view_as(tensor)
            offset += tensor.numel()
            if metric._reductions[attr] is dim_zero_mean:
                value = value / world
            synced[(id(metric), attr)] = value
        if (op, dtype) == long_sum:
            meta = flat[offset:]
    return synced, meta


def _all_gather_cats(
    plan: _Plan, meta: torch.Tensor, group: dist.ProcessGroup | None, world: int
) -> dict[tuple[int, str], Any]:
    """One padded all-gather per dtype of the cat states; pieces are reassembled in rank order, as torchmetrics."""
    table = meta.view(world, len(plan.cat_slots), _META).cpu().tolist()
    synced: dict[tuple[int, str], Any] = {}
    dtype_of = {}
    for i in range(len(plan.cat_slots)):
        codes = {table[r][i][1] for r in range(world)} - {0}
        assert len(codes) <= 1, f"cat state {plan.cat_slots[i][1]!r} has different dtypes across ranks"
        if codes:
            dtype_of[i] = _CAT_DTYPES[codes.pop() - 1]
        else:
            synced[_key(plan.cat_slots[i])] = []  # no rank holds data: the state stays empty, as on one process
    for dtype in dict.fromkeys(dtype_of.values()):
        slots = [i for i, d in dtype_of.items() if d == dtype]
        device = plan.cat_slots[slots[0]][0].device
        lengths = [sum(table[r][i][0] for i in slots) for r in range(world)]
        local_parts = [_local_cat(getattr(*plan.cat_slots[i])) for i in slots]
        local = [p.reshape(-1).to(device) for p in local_parts if p is not None]
        buffer = torch.zeros(max(lengths), dtype=dtype, device=device)
        if local:
            mine = torch.cat(local)
            buffer[: mine.numel()] = mine
        gathered = [torch.empty_like(buffer) for _ in range(world)]
        dist.all_gather(gathered, buffer, group=group)
        pieces: dict[int, list[torch.Tensor]] = {i: [] for i in slots}
        for r in range(world):
            offset = 0
            for i in slots:
                numel, _, ndim, *trailing = table[r][i]
                if numel:
                    shape = [-1, *trailing[: ndim - 1]]
                    pieces[i].append(gathered[r][offset : offset + numel].view(shape))
                offset += numel
        for i in slots:
            synced[_key(plan.cat_slots[i])] = torch.cat(pieces[i])
    return synced


def flat_sync(metrics: Sequence[Metric], group: dist.ProcessGroup | None = None) -> dict[tuple[int, str], Any]:
    """Every state of ``metrics`` reduced over ``group``, with one collective per reduction type and dtype.

    A collective: every rank of ``group`` must call it with the same metrics in the same order (their local states
    may differ, and may be empty). All metrics must pass `can_flat_sync`.

    Args:
        metrics: The metrics whose states to sync.
        group: The data-parallel process group (None: the world).

    Returns:
        The synced value of each ``(id(metric), state name)``; the metrics themselves are left untouched.
    """
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    plan = _plan(metrics)
    device = metrics[0].device if metrics else torch.device("cpu")
    meta = _cat_metadata(plan, rank, world, device) if plan.cat_slots else torch.zeros(0, dtype=torch.long)
    synced, meta = _all_reduce_flat(plan, group, world, meta)
    if plan.cat_slots:
        synced.update(_all_gather_cats(plan, meta, group, world))
    return synced


@contextlib.contextmanager
def _with_states(metrics: Sequence[Metric], synced: dict[tuple[int, str], Any]) -> Iterator[None]:
    """Compute ``metrics`` on the synced states without torchmetrics syncing again; then restore local states."""
    saved = []
    for metric in metrics:
        saved.append(({a: getattr(metric, a) for a in metric._defaults}, metric._to_sync))
        for attr in metric._defaults:
            if (id(metric), attr) in synced:
                setattr(metric, attr, synced[(id(metric), attr)])
        metric._to_sync = False
        metric._computed = None
    try:
        yield
    finally:
        for metric, (states, to_sync) in zip(metrics, saved):
            for attr, value in states.items():
                setattr(metric, attr, value)
            metric._to_sync = to_sync
            metric._computed = None


def compute_synced(
    collections: Sequence[MetricCollection], group: dist.ProcessGroup | None = None
) -> list[dict[str, torch.Tensor]]:
    """Compute every collection over ``group`` with one flat sync for all of them.

    A collective when torch.distributed is initialized: every rank of ``group`` calls it with the same collections
    in the same order. Local states are kept (call ``reset`` to start a new epoch). Metrics that `can_flat_sync`
    rejects are synced by torchmetrics, after the flat sync, in collection order.

    Args:
        collections: The probes' eval collections; their keys already carry the logged prefixes.
        group: The data-parallel process group (None: the world).

    Returns:
        Each collection's ``compute()``, in order.

    Example:
        >>> from torchmetrics.classification import MulticlassAccuracy
        >>> top1 = MetricCollection({"top1": MulticlassAccuracy(3, average="micro")}, prefix="eval/linear_")
        >>> top1.update(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1]))
        >>> compute_synced([top1])[0]["eval/linear_top1"]
        tensor(0.6667)
    """
    metrics = [m for c in collections for m in c.values(copy_state=False)]
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return [c.compute() for c in collections]
    flat = [m for m in metrics if can_flat_sync(m)]
    synced = flat_sync(flat, group)
    with _with_states(flat, synced):
        return [c.compute() for c in collections]


def compute_metrics_synced(metrics: Sequence[Metric], group: dist.ProcessGroup | None = None) -> list[Any]:
    """``[m.compute() for m in metrics]`` over ``group``, with one flat sync for all of them (a collective).

    For metrics outside collections (a bank's per-head states); every metric must pass `can_flat_sync`.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return [m.compute() for m in metrics]
    synced = flat_sync(metrics, group)
    with _with_states(metrics, synced):
        return [m.compute() for m in metrics]
