"""Extract a dataset's features once, over the job's ranks, into a memory-mapped cache.

Rank ``r`` of ``N`` extracts the samples ``r, r + N, r + 2N, ...``: every sample exactly once, with no padding (the
split a `DistributedSampler` without shuffle makes, minus its repeats). Each rank writes its rows straight into two
files shared by all ranks, ``{split}.features`` (float32, ``(n, dim)``) and ``{split}.labels`` (class indices,
multi-hot vectors or masks, stored compactly: `distprobe.service.targets`), opened with
``torch.from_file(shared=True)``: the page cache holds them, not the process, and training reads them back the same
way. A split is complete when rank 0 has written ``{split}.json`` after every rank's rows (a barrier); a requeued job
reuses a complete split of the same checkpoint and config, and redoes an incomplete one from the start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from distprobe.engine.collectives import world_rank_and_size as rank_and_world
from distprobe.service.targets import CLASS_INDICES, TargetCodec

log = logging.getLogger(__name__)

Forward = Callable[[nn.Module, Any], torch.Tensor]


@dataclass(frozen=True)
class CachedSplit:
    """One split's features and targets, memory-mapped from the cache."""

    features: torch.Tensor
    """``(n, dim)`` float32, memory-mapped."""
    labels: torch.Tensor
    """``(n, *target shape)`` as stored, memory-mapped: int64 class indices, or ``codec``'s compact multi-hot
    vectors or masks (read them through ``codec.decode``)."""
    sample_shape: tuple[int, ...] = ()
    """One sample's features before they were flattened (tokens: ``(N, D)``); ``()``: ``(dim,)``."""
    codec: TargetCodec = CLASS_INDICES
    """The kind of the targets and how they are stored."""

    @property
    def size(self) -> int:
        """Samples in the split."""
        return int(self.labels.shape[0])


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _item_part(item: Any, key: str | int, what: str, split: str) -> Any:
    try:
        return item[key]
    except (KeyError, IndexError, TypeError):
        kind = f"keys {sorted(item)}" if isinstance(item, Mapping) else f"a {type(item).__name__}"
        raise ValueError(
            f"distprobe eval: data.{split} items have {kind}; data.{what}_key={key!r} is not one of them. "
            f"Set data.{what}_key in the config."
        ) from None


def _collate(
    key_input: str | int, key_label: str | int, split: str, codec: TargetCodec
) -> Callable[[list[Any]], tuple[Any, Any]]:
    from torch.utils.data import default_collate

    def collate(items: list[Any]) -> tuple[Any, Any]:
        inputs = [_item_part(item, key_input, "input", split) for item in items]
        labels = [_item_part(item, key_label, "label", split) for item in items]
        return default_collate(inputs), codec.encode(labels, split)

    return collate


def _autocast(device: torch.device, autocast: str) -> contextlib.AbstractContextManager[Any]:
    if autocast == "none" or (autocast == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    dtype = torch.float16 if autocast == "float16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def _to(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device, non_blocking=True)
    if isinstance(inputs, Mapping):
        return {k: _to(v, device) for k, v in inputs.items()}
    if isinstance(inputs, list | tuple):
        return type(inputs)(_to(v, device) for v in inputs)
    return inputs


def _features(backbone: nn.Module, forward: Forward | None, inputs: Any, device: torch.device, autocast: str) -> Any:
    """One batch's features: ``forward(backbone, inputs)``, or ``backbone(inputs)``, under the extraction's autocast."""
    with _autocast(device, autocast):
        inputs = _to(inputs, device)
        return forward(backbone, inputs) if forward is not None else backbone(inputs)


def _mapped(path: Path, numel: int, dtype: torch.dtype) -> torch.Tensor:
    # shared=True: writes go to the file (and so to every rank); the file is grown to numel elements if smaller.
    return torch.from_file(str(path), shared=True, size=numel, dtype=dtype)


class CacheSpaceError(OSError):
    """The feature cache's files could not be reserved: the message names the folder and the bytes needed."""


def reserve(cache: Path, sizes: Mapping[str, int]) -> str | None:
    """Create the cache's files at their full size, with their blocks allocated; an error message, or None.

    The cache is memory-mapped: without a reservation, a disk that fills up during extraction kills the job with
    SIGBUS when a page is written back, and says nothing. ``posix_fallocate`` asks for every block up front, so a
    full disk is an error here, before any work, naming the folder and the bytes.
    """
    needed = sum(sizes.values())
    try:
        cache.mkdir(parents=True, exist_ok=True)
        for name, size in sizes.items():
            fd = os.open(cache / name, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if size > 0:
                    os.posix_fallocate(fd, 0, size)
            finally:
                os.close(fd)
    except OSError as err:
        for name in sizes:
            (cache / name).unlink(missing_ok=True)
        try:
            free = f"{shutil.disk_usage(cache if cache.exists() else cache.parent).free} bytes free"
        except OSError:
            free = "free space unknown"
        return (
            f"distprobe eval: the feature cache needs {needed} bytes in {cache} ({free}): {err.strerror or err}; "
            "fix: free space there, or set features.cache_dir to a disk with room"
        )
    return None


def _agree(ok: bool, device: torch.device) -> bool:
    """Whether every rank is ``ok`` (one all-reduce; True at once without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return ok
    flag = torch.tensor([1 if ok else 0], device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def load_split(
    cache: Path, split: str, stamp: Mapping[str, Any], codec: TargetCodec = CLASS_INDICES
) -> CachedSplit | None:
    """The cached split, if it is complete and was extracted for the same ``stamp`` (checkpoint and config)."""
    marker = cache / f"{split}.json"
    if not marker.is_file():
        return None
    try:
        meta = json.loads(marker.read_text())
        targets = meta.get("targets", {"kind": "class", "shape": []})  # caches written before: class indices
        if meta.get("stamp") != dict(stamp) or targets["kind"] != codec.kind:
            return None
        n, dim = int(meta["size"]), int(meta["dim"])
        shape = tuple(int(s) for s in meta.get("shape", [dim]))  # caches written before the shape was kept: (dim,)
        target_shape = tuple(int(s) for s in targets["shape"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # not a marker this module wrote: redo
        log.warning("The %s cache's marker %s is not one this service wrote: extracting it again", split, marker)
        return None
    per_target = math.prod(target_shape)
    # Mapping grows a short file with zeros: a truncated or deleted file would pass for rows of zero features.
    expected = {"features": n * dim * 4, "labels": n * per_target * codec.dtype.itemsize}
    for suffix, size in expected.items():
        path = cache / f"{split}.{suffix}"
        found = path.stat().st_size if path.is_file() else None
        if found != size:
            log.warning("The %s cache's %s holds %s bytes, not %d: extracting it again", split, path, found, size)
            return None
    features = _mapped(cache / f"{split}.features", n * dim, torch.float32).view(n, dim)
    labels = _mapped(cache / f"{split}.labels", n * per_target, codec.dtype).view(n, *target_shape)
    return CachedSplit(features=features, labels=labels, sample_shape=shape, codec=codec)


class _HostCopies:
    """Device-to-host copies of the features, written into the cache one batch late.

    On CUDA a batch's features go to a pinned buffer with a non-blocking copy, and are written into the cache only
    after the next batch's forward is queued: the GPU never waits for the host's writes, as a ``.cpu()`` per batch
    would make it. On the CPU the rows are written at once.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]] = []

    def push(self, rows: torch.Tensor, index: torch.Tensor, targets: torch.Tensor) -> None:
        if self.device.type != "cuda":
            self.pending.append((rows, index, targets, None))
            return
        host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
        host.copy_(rows, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.pending.append((host, index, targets, event))

    def write_ready(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Write every batch but the newest (on CUDA), so the newest's copy overlaps the next forward."""
        keep = 1 if self.device.type == "cuda" else 0
        while len(self.pending) > keep:
            self._write(self.pending.pop(0), features, labels)

    def write_all(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        while self.pending:
            self._write(self.pending.pop(0), features, labels)

    @staticmethod
    def _write(
        item: tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any], features: torch.Tensor, labels: torch.Tensor
    ) -> None:
        rows, index, targets, event = item
        if event is not None:
            event.synchronize()
        features[index] = rows
        labels[index] = targets


@torch.no_grad()
def extract_split(
    backbone: nn.Module,
    dataset: Dataset[Any],
    *,
    split: str,
    cache: Path,
    stamp: Mapping[str, Any],
    forward: Forward | None,
    input_key: str | int,
    label_key: str | int,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    autocast: str = "auto",
    targets: TargetCodec = CLASS_INDICES,
) -> CachedSplit:
    """Extract ``dataset``'s features on every rank (each sample once) into ``cache``; a collective.

    The backbone runs in eval mode under ``no_grad`` (and bf16 autocast on CUDA by default); features are flattened to
    ``(batch, dim)`` and stored in float32; ``targets`` says what the labels are and how they are stored. A label of
    the wrong shape raises ValueError on every rank (one all-reduce decides), never on one rank alone.
    """
    cached = load_split(cache, split, stamp, targets)
    if cached is not None:
        log.info("Reusing the complete %s features in %s", split, cache)
        return cached
    rank, world = rank_and_world()
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError(f"distprobe eval: data.{split} is empty; it must hold at least one labeled sample")
    cache.mkdir(parents=True, exist_ok=True)
    (cache / f"{split}.json").unlink(missing_ok=True)
    loader = DataLoader(
        Subset(dataset, range(rank, n, world)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate(input_key, label_key, split, targets),
        pin_memory=device.type == "cuda",
    )
    backbone.eval()
    shape, target_shape = _feature_shape(backbone, Subset(dataset, [0]), loader, forward, device, autocast, split)
    dim, per_target = math.prod(shape), math.prod(target_shape)
    error = None
    if rank == 0:  # a stale cache (another attempt, another config) must not leave rows of a larger file behind
        for suffix in ("features", "labels"):
            (cache / f"{split}.{suffix}").unlink(missing_ok=True)
        label_bytes = n * per_target * targets.dtype.itemsize
        error = reserve(cache, {f"{split}.features": n * dim * 4, f"{split}.labels": label_bytes})
    if not _agree(error is None, device):  # every rank raises, none waits for the others at a barrier
        raise CacheSpaceError(error or f"distprobe eval: rank 0 could not reserve the {split} cache in {cache}")
    features = _mapped(cache / f"{split}.features", n * dim, torch.float32).view(n, dim)
    labels = _mapped(cache / f"{split}.labels", n * per_target, targets.dtype).view(n, *target_shape)
    problem = _extract_rows(backbone, loader, forward, device, autocast, features, labels, split)
    del features, labels  # unmapped: every write is in the page cache before the barrier
    if not _agree(problem is None, device):
        raise ValueError(problem or f"distprobe eval: another rank of the job could not extract data.{split}")
    _barrier()
    if rank == 0:
        meta = {
            "size": n,
            "dim": dim,
            "shape": list(shape),
            "targets": {"kind": targets.kind, "shape": list(target_shape)},
            "world": world,
            "stamp": dict(stamp),
        }
        tmp = cache / f"{split}.json.tmp"
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, cache / f"{split}.json")  # atomic: a reader sees no marker or a whole one
    _barrier()
    done = load_split(cache, split, stamp, targets)
    assert done is not None, f"the {split} cache in {cache} is incomplete after extraction"
    return done


def _extract_rows(
    backbone: nn.Module,
    loader: DataLoader[Any],
    forward: Forward | None,
    device: torch.device,
    autocast: str,
    features: torch.Tensor,
    labels: torch.Tensor,
    split: str,
) -> str | None:
    """Write this rank's rows into the mapped cache; a label problem's message (the caller decides with all ranks)."""
    position, world = rank_and_world()  # this rank's first sample
    copies = _HostCopies(device)
    try:
        for inputs, targets in loader:
            if targets.shape[1:] != labels.shape[1:]:
                return (
                    f"distprobe eval: data.{split} has targets of shape {tuple(targets.shape[1:])} per sample after "
                    f"the first sample's {tuple(labels.shape[1:])}; the cache holds one size; fix: give every sample "
                    "targets of one size (resize or crop masks in the dataset)"
                )
            out = _features(backbone, forward, inputs, device, autocast)
            count = out.shape[0]
            index = torch.arange(position, position + count * world, world)
            copies.push(out.detach().flatten(1).float(), index, targets)
            position += count * world
            copies.write_ready(features, labels)
    except ValueError as err:  # a label of the wrong shape or kind (`TargetCodec.encode`)
        return str(err)
    copies.write_all(features, labels)
    return None


def _feature_shape(
    backbone: nn.Module,
    first: Dataset[Any],
    loader: DataLoader[Any],
    forward: Forward | None,
    device: torch.device,
    autocast: str,
    split: str,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """One sample's feature and target shapes, from the split's first sample on every rank.

    (A rank may have no sample of its own.)
    """
    inputs, targets = next(iter(DataLoader(first, batch_size=1, collate_fn=loader.collate_fn)))
    out = _features(backbone, forward, inputs, device, autocast)
    if not isinstance(out, torch.Tensor):
        raise ValueError(
            f"distprobe eval: the backbone returned a {type(out).__name__} on data.{split}; expected a tensor of "
            "features. Set features.forward to a function (backbone, inputs) -> features."
        )
    return tuple(int(s) for s in out.shape[1:]), tuple(int(s) for s in targets.shape[1:])
