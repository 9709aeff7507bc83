"""Which validation samples choose the best head, and which report it.

A head chosen and reported on the same samples is biased upwards: with 64 heads, the maximum of 64 noisy estimates.
So a fixed share of the samples (by their global position, hashed) only chooses, and the rest only reports. The
split depends on a sample's position in the validation set alone: the same every epoch, the same for any batch size,
and the same on N ranks as in one process. The Lightning callbacks take a sample's position as its loader's
`DistributedSampler` dealt it, shuffled or not, counted per loader (`distprobe.metrics.exact.ValidationPositions`);
`ProbeSet.evaluate(positions=)` takes the indices a torchrun script passes; without them, a running count of the
samples seen, which matches one process when ranks take every N-th sample of one unshuffled set.

A selection split that counted no sample (a validation set of a handful of samples, or one whose selection share
holds only unlabeled ones) scores every head NaN. The best head is then chosen on every counted sample (the report
split's, the only ones there are), with a warning: those samples also report it, so its values are biased upwards.
With no counted sample at all, no head is chosen and its values are NaN. The scores are synced values, so every rank
makes the same choice.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from distprobe import keys
from distprobe.engine.collectives import rank_and_world

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


def running_positions(first: int, batch_size: int, group: Any, device: torch.device) -> torch.Tensor:
    """`global_positions` of this rank's samples ``first .. first + batch_size - 1`` in ``group`` (None: the world).

    The positions an engine or adapter falls back to when it is given none: its own running count, read as
    `DistributedSampler` without shuffle deals the samples.
    """
    rank, world = rank_and_world(group)
    return global_positions(first, batch_size, rank, world, device)


def selects(positions: torch.Tensor, fraction: float) -> torch.Tensor:
    """``(B,)`` bool: the samples (by global position) that choose the best head."""
    return (positions * _GOLDEN) % _SPAN < int(fraction * _SPAN)


def choose_best(selection: torch.Tensor, whole: torch.Tensor) -> tuple[torch.Tensor | None, bool]:
    """The best head's index (0-d) by its ``(K,)`` ``selection`` scores, and whether it was chosen on ``whole``.

    ``selection`` holds every head's score on the selection split, ``whole`` on every counted sample; NaN is a score
    on no sample. When no head has a selection score (the split counted no sample), the head is chosen on ``whole``
    (True is returned with it); when no head has a score there either, None. Reads the device once (an epoch end).

    Example:
        >>> nan = float("nan")
        >>> choose_best(torch.tensor([0.2, 0.7]), torch.tensor([0.9, 0.1]))
        (tensor(1), False)
        >>> choose_best(torch.tensor([nan, nan]), torch.tensor([0.9, 0.1]))
        (tensor(0), True)
        >>> choose_best(torch.tensor([nan, nan]), torch.tensor([nan, nan]))
        (None, True)
    """
    unscored = torch.stack([selection.isnan().all(), whole.isnan().all()]).tolist()
    if unscored[0] and unscored[1]:
        return None, True
    scores = whole if unscored[0] else selection
    return scores.nan_to_num(-1.0).argmax(), bool(unscored[0])


def best_values(
    names: Sequence[str],
    best: torch.Tensor | None,
    at_best: Callable[[torch.Tensor], Mapping[str, torch.Tensor]],
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """The relative keys ``best_{metric}`` of ``names`` and ``best_head``.

    ``at_best(best)`` gives the report split's value of each name at the best head; with no head chosen (None) every
    value is NaN, never head 0's.
    """
    nan = torch.tensor(math.nan, device=device)
    values = at_best(best) if best is not None else dict.fromkeys(names, nan)
    out = {keys.relative_key(name, head=keys.BEST): values[name] for name in names}
    out[keys.BEST_HEAD] = best.float() if best is not None else nan
    return out
