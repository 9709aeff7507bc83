"""Exact distributed evaluation: which samples of a validation batch are real, and which are sampler padding.

torch's ``DistributedSampler`` with ``drop_last=False`` (Lightning's default for validation) makes every rank's
share equally long by appending repeats of the first indices to the *end* of the global index list, before
striding it over the ranks. Rank ``r`` therefore receives ``len(range(r, N, world))`` real samples first, then its
padding (if any). Knowing that count and the position of a batch in the rank's stream tells how many of the batch
are real, without reading any tensor: the eval update keeps ``preds[:num_valid]``, which needs no host sync.

This holds with ``shuffle=True`` too (the shuffle happens before the padding), and for Lightning's
``DistributedSamplerWrapper`` around a user's sampler. With ``drop_last=True`` nothing is repeated (samples are
dropped instead). Other samplers and IterableDatasets are counted as they come: all their samples are taken as real.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import DistributedSampler


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
