"""Exact distributed evaluation: which samples of a validation batch are real or padding, and where each one stands.

torch's ``DistributedSampler`` with ``drop_last=False`` (Lightning's default for validation) makes every rank's
share equally long by appending repeats of the first indices to the *end* of the global index list, before
striding it over the ranks. Rank ``r`` therefore receives ``len(range(r, N, world))`` real samples first, then its
padding (if any). Knowing that count and the position of a batch in the rank's stream tells how many of the batch
are real, without reading any tensor: the eval update keeps ``preds[:num_valid]``, which needs no host sync.

This holds with ``shuffle=True`` too (the shuffle happens before the padding), and for Lightning's
``DistributedSamplerWrapper`` around a user's sampler. With ``drop_last=True`` nothing is repeated (samples are
dropped instead). Other samplers and IterableDatasets are counted as they come: all their samples are taken as real.

A sample's position in its validation set (`ValidationPositions`) keys the hashed split that chooses a bank's best
head or a ridge probe's best lambda (`distprobe.bank.selection.selects`): the index the ``DistributedSampler`` dealt
it, so that the same samples choose at any world size, shuffled or not.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils.data import DistributedSampler

#: Where Lightning defines ``DistributedSamplerWrapper`` (the ``lightning`` package, and the standalone
#: ``lightning_fabric``). Looked up among the loaded modules, never imported: this layer imports no Lightning, and a
#: wrapper exists only once its module is loaded.
_WRAPPER_MODULES = ("lightning.fabric.utilities.distributed", "lightning_fabric.utilities.distributed")


def real_samples_on_rank(sampler: Any) -> int | None:
    """How many samples of this rank's share of ``sampler`` are real; None when nothing is padded.

    Args:
        sampler: A DataLoader's sampler.

    Example:
        >>> sampler = DistributedSampler(range(5), num_replicas=2, rank=1, shuffle=False)
        >>> list(sampler), real_samples_on_rank(sampler)
        ([1, 3, 0], 2)
    """
    if not isinstance(sampler, DistributedSampler) or sampler.drop_last:
        return None
    # The padded tail follows the real samples: rank r's real ones are indices r, r + world, ... below N.
    return len(range(sampler.rank, len(sampler.dataset), sampler.num_replicas))  # type: ignore[arg-type]


def valid_in_batch(real_on_rank: int | None, batch_start: int, batch_len: int) -> int | None:
    """How many leading samples of a batch are real.

    Args:
        real_on_rank: `real_samples_on_rank` of the rank's sampler (None: every sample is real).
        batch_start: Position of the batch's first sample in the rank's sample stream.
        batch_len: Number of samples in the batch.

    Returns:
        A count in ``[0, batch_len]``, or None when every sample is real.

    Example:
        >>> valid_in_batch(real_on_rank=2, batch_start=2, batch_len=1)
        0
    """
    if real_on_rank is None:
        return None
    return max(0, min(batch_len, real_on_rank - batch_start))


def dataloader_at(dataloaders: Any, dataloader_idx: int) -> Any:
    """The DataLoader number ``dataloader_idx`` of what ``trainer.val_dataloaders`` holds (one loader or several)."""
    if dataloaders is None:
        return None
    if isinstance(dataloaders, (list, tuple)):
        return dataloaders[dataloader_idx] if dataloader_idx < len(dataloaders) else None
    if isinstance(dataloaders, dict):
        values = list(dataloaders.values())
        return values[dataloader_idx] if dataloader_idx < len(values) else None
    return dataloaders


def valid_in_loader_batch(dataloader: Any, batch_idx: int, batch_len: int) -> int | None:
    """How many leading samples of batch ``batch_idx`` of ``dataloader`` are real; None when all are.

    Batches before ``batch_idx`` are full (``dataloader.batch_size`` samples each), as a DataLoader makes them.
    A DataLoader built on a ``batch_sampler`` has no fixed batch size: its samples are all taken as real.

    Args:
        dataloader: The validation DataLoader the batch came from (``trainer.val_dataloaders``).
        batch_idx: The batch's index within this epoch.
        batch_len: Number of samples in the batch.
    """
    batch_size = getattr(dataloader, "batch_size", None)
    if dataloader is None or not isinstance(batch_size, int):
        return None
    return valid_in_batch(real_samples_on_rank(getattr(dataloader, "sampler", None)), batch_idx * batch_size, batch_len)


def _deals_base_order(sampler: Any) -> bool:
    """Whether ``sampler`` deals `DistributedSampler`'s own order.

    torch's class does, and so does Lightning's wrapper around a user's sampler (positions in that sampler's order). A
    subclass with its own ``__iter__`` may deal another order, unknown here.
    """
    if not isinstance(sampler, DistributedSampler):
        return False
    iterate = type(sampler).__iter__
    wrappers = (getattr(sys.modules.get(m), "DistributedSamplerWrapper", None) for m in _WRAPPER_MODULES)
    return iterate is DistributedSampler.__iter__ or any(w is not None and iterate is w.__iter__ for w in wrappers)


def dealt_order(sampler: Any, device: torch.device) -> torch.Tensor | None:
    """The positions a `DistributedSampler` deals this rank this epoch, in order (padding repeats included).

    A position is an index into the sampler's dataset: the dataset index for torch's sampler, shuffled or not, the
    position in the wrapped sampler's order for Lightning's ``DistributedSamplerWrapper``. None for other samplers.

    Example:
        >>> dealt_order(DistributedSampler(range(5), num_replicas=2, rank=1, shuffle=False), torch.device("cpu"))
        tensor([1, 3, 0])
    """
    if not _deals_base_order(sampler):
        return None
    # The base class's order is a function of (seed, epoch, dataset length) alone; the wrapper's own __iter__ would
    # first redraw the sampler it wraps, from the global RNG, and so change the training's shuffling.
    return torch.tensor(list(DistributedSampler.__iter__(sampler)), dtype=torch.long, device=device)


class ValidationPositions:
    """Each main validation sample's position, for the split that chooses the best head or lambda; per dataloader.

    - Under a `DistributedSampler` (Lightning's validation sampler under DDP, FSDP or DeepSpeed, shuffled or not, and
      its wrapper around a user's sampler): the index the sampler dealt the sample (`dealt_order`), so the same
      samples choose at any world size, and as in one process reading the set in order.
    - Under any other sampler (one process, or ``use_distributed_sampler=False`` with a sampler of one's own):
      the sample's place ``p`` in this rank's stream of the loader, read as ``p * world + rank`` (rank ``r`` holding
      samples ``r, r + N, ...``). In one process that is the place in the loader's order: the dataset index for a
      sequential loader, a new split every epoch for a shuffling one.

    Every validation dataloader counts from 0 at each validation epoch; the batch's place in its loader is the sum
    of that loader's earlier batches (padding included). Exact everywhere only with a sample id, which a batch does
    not carry.

    A Lightning callback calls `reset` as each validation starts, evaluates each main batch inside `reading` (the
    batch's loader) and asks `current` for the batch's positions there; outside it (a callback's own validation
    data) `current` is None, and the engine counts for itself.
    """

    def __init__(self) -> None:
        self._seen: dict[int, int] = {}
        self._orders: dict[int, torch.Tensor | None] = {}
        self._reading: tuple[Any, int] | None = None

    def reset(self) -> None:
        """A new validation epoch: every loader counts from 0 again, and a shuffling sampler deals anew."""
        self._seen.clear()
        self._orders.clear()

    def of_batch(
        self, loader: Any, dataloader_idx: int, batch_len: int, group: Any, device: torch.device
    ) -> torch.Tensor:
        """``(batch_len,)`` the positions of the next batch of ``loader`` (the dataloader number ``dataloader_idx``)."""
        first = self._seen.get(dataloader_idx, 0)
        self._seen[dataloader_idx] = first + batch_len
        if dataloader_idx not in self._orders:  # once per loader and epoch, after the sampler's set_epoch
            self._orders[dataloader_idx] = dealt_order(getattr(loader, "sampler", None), device)
        order = self._orders[dataloader_idx]
        if order is not None and first + batch_len <= order.numel():
            return order[first : first + batch_len]
        # Imported here: the engines import this package (metrics is the layer beneath them).
        from distprobe.bank.selection import running_positions

        return running_positions(first, batch_len, group, device)

    @contextmanager
    def reading(self, dataloaders: Any, dataloader_idx: int) -> Iterator[None]:
        """Within: the batch evaluated is the next of loader ``dataloader_idx`` of ``dataloaders``.

        Args:
            dataloaders: What ``trainer.val_dataloaders`` holds (one loader or several, `dataloader_at`).
            dataloader_idx: The batch's dataloader number (0 with one loader).
        """
        self._reading = (dataloader_at(dataloaders, dataloader_idx), dataloader_idx)
        try:
            yield
        finally:
            self._reading = None

    def current(self, batch_len: int, group: Any, device: torch.device) -> torch.Tensor | None:
        """``(batch_len,)`` the positions of the batch being read (`reading`); None outside (the engine's own count)."""
        if self._reading is None:
            return None
        return self.of_batch(*self._reading, batch_len, group, device)
