"""Which validation samples choose the best head, and which report it.

A head chosen and reported on the same samples is biased upwards: with 64 heads, the maximum of 64 noisy estimates.
So a fixed share of the samples (by their global position, hashed) only chooses, and the rest only reports. The
split depends on a sample's position in the validation set alone: the same every epoch, the same for any batch size,
and the same on N ranks as in one process when ranks take every N-th sample (`DistributedSampler` without shuffle).
"""

from __future__ import annotations

import torch

#: Knuth's multiplicative hash: consecutive positions land far apart, so a sorted set (all of class 0 first)
#: still gives the selection share of every class.
_GOLDEN = 2654435761
_SPAN = 2**32


def global_positions(first: int, batch_size: int, rank: int, world_size: int, device: torch.device) -> torch.Tensor:
    """The validation-set positions of a rank's samples ``first .. first + batch_size - 1`` (its own count).

    `DistributedSampler` (shuffle off, the validation default) gives rank ``r`` the samples ``r, r + N, r + 2N...``.
    """
    local = torch.arange(first, first + batch_size, device=device, dtype=torch.long)
    return local * world_size + rank


def selects(positions: torch.Tensor, fraction: float) -> torch.Tensor:
    """``(B,)`` bool: the samples (by global position) that choose the best head."""
    return (positions * _GOLDEN) % _SPAN < int(fraction * _SPAN)
