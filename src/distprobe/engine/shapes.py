"""A later training batch of another shape than the first: found on the host, skipped and counted, never a crash.

Only a member's first batch is checked on every rank at once (`distprobe.engine.checks`). A later batch whose
features have another width (or a key missing on one rank) would fail inside the probe step with torch's message, on
that rank alone, while the others wait in the step's all-reduce. So each engine remembers what its first training
batch established, each input's per-sample shape, and compares every later batch with it: a tuple compare on the
host, no device read and no collective. A batch that differs is bad data: the rank trains on an empty batch of the
expected shapes instead (the path a rank with no sample already takes, which joins every collective and skips the
window's step on every rank through the gradient), and the batch is counted in ``bad_batches/wrong_shape``.

Which dimensions must match is the reader's to say (`width_signature` by default: the number of dimensions and the
last one, the feature width; tokens may vary in number).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torchmetrics import MetricCollection

from distprobe import keys
from distprobe.engine.collectives import rank_and_world, sum_over_group, world_rank_and_size
from distprobe.metrics.counters import ReasonCounter, mark_updated

log = logging.getLogger(__name__)

#: The bad-batch reason of a later batch whose shapes differ from the first batch's (logged as
#: ``train/{name}_bad_batches/wrong_shape``).
WRONG_SHAPE = "wrong_shape"

Signature = Callable[[torch.Size], tuple[int, ...]]
"""What of one sample's shape must stay as the first batch had it."""


def width_signature(sample: torch.Size) -> tuple[int, ...]:
    """The number of dimensions of one sample and its last one (the feature width); ``()`` for a scalar sample."""
    return (len(sample), int(sample[-1])) if len(sample) else ()


def ndim_signature(sample: torch.Size) -> tuple[int, ...]:
    """Only the number of dimensions (masks, whose height and width may change from batch to batch)."""
    return (len(sample),)


@dataclass(frozen=True)
class _Expected:
    sample: torch.Size
    dtype: torch.dtype
    signature: tuple[int, ...]


def _shape(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return str(tuple(value.shape))
    return f"a {type(value).__name__}"


class BatchShapes:
    """The per-sample shapes a member's first training batch established, and the counter of batches that differ.

    Args:
        kind: The member's kind in messages (``"probe"``, ``"bank"``).
        name: The member's name.
        labels: One label per input, in the order `conform` takes them (``"input 'embedding'"``, ``"target 'y'"``).
        signatures: Per input, what must match (default: `width_signature`).
        prefix: The counter's key prefix (a probe's logged prefix; none for a bank's relative keys).
    """

    def __init__(
        self,
        kind: str,
        name: str,
        labels: Sequence[str],
        signatures: Sequence[Signature] | None = None,
        prefix: str = "",
    ) -> None:
        self.owner = f"{kind} {name!r}"
        self._logged_key = keys.key(keys.TRAIN, name, keys.bad_batches(WRONG_SHAPE))
        self.labels = list(labels)
        self._signatures = list(signatures) if signatures is not None else [width_signature] * len(self.labels)
        self._expected: list[_Expected] | None = None
        self._warned: set[str] = set()
        self.counts = MetricCollection(
            {keys.BAD_BATCHES: ReasonCounter((WRONG_SHAPE,), key_prefix=keys.bad_batches(""))},
            prefix=prefix,
            compute_groups=False,
        )
        """The run's batches of another shape than the first, on this rank (summed over the group when computed;
        `distprobe.loop.ProbeSet` and the callbacks log it with the bad-data counts)."""
        mark_updated(self._counter)  # a count of 0 is a value: no torchmetrics warning before the first bad batch

    def name(self, labels: Sequence[str]) -> None:
        """Name the inputs as the adapter reads them (their keys), for the warnings."""
        assert len(labels) == len(self.labels), "one label per input"
        self.labels = list(labels)

    @property
    def established(self) -> bool:
        """Whether a first batch has set the shapes."""
        return self._expected is not None

    @property
    def _counter(self) -> ReasonCounter:
        counter = self.counts[keys.BAD_BATCHES]
        assert isinstance(counter, ReasonCounter)
        return counter

    def conform(self, tensors: Sequence[torch.Tensor | None], device: torch.device) -> tuple[list[torch.Tensor], bool]:
        """``tensors`` as they are and False, or empty tensors of the first batch's shapes and True (counted).

        The first call records the shapes. None stands for an input missing from this batch (its reader warned).
        """
        if self._expected is None:
            assert all(isinstance(t, torch.Tensor) for t in tensors), "the first batch is checked before it trains"
            self._expected = [
                _Expected(t.shape[1:], t.dtype, sign(t.shape[1:]))  # type: ignore[union-attr]
                for t, sign in zip(tensors, self._signatures, strict=True)
            ]
            return list(tensors), False  # type: ignore[arg-type]
        differs = None
        for label, tensor, expected, sign in zip(self.labels, tensors, self._expected, self._signatures, strict=True):
            if tensor is None:
                differs = ""  # the reader named what is missing
            elif (
                not isinstance(tensor, torch.Tensor) or tensor.ndim == 0 or sign(tensor.shape[1:]) != expected.signature
            ):
                differs = f"{label} has shape {_shape(tensor)}, expected {self._described(expected)}"
            if differs is not None:
                break
        if differs is None:
            return list(tensors), False  # type: ignore[arg-type]
        if differs:
            self._warn(differs)
        self._counter.counts.add_(1)  # on the device, no sync: only a batch that differs pays this op
        mark_updated(self._counter)
        return [torch.zeros((0, *e.sample), dtype=e.dtype, device=device) for e in self._expected], True

    def _described(self, expected: _Expected) -> str:
        return f"(batch, {', '.join(map(str, expected.sample))})" if expected.sample else "(batch,)"

    def expected(self) -> str:
        """Every input's expected shape, for a reader's message about a missing key."""
        assert self._expected is not None, "after the first batch"
        return ", ".join(f"{label} {self._described(e)}" for label, e in zip(self.labels, self._expected, strict=True))

    def warn_missing(self, detail: str) -> None:
        """Warn (once per ``detail``) that a reader found an input missing from a batch after the first."""
        self._warn(f"{detail} (expected {self.expected()})")

    def _warn(self, what: str) -> None:
        if what in self._warned:
            return
        self._warned.add(what)
        log.warning(
            "%s: on rank %d a training batch after the first differs from it: %s. The batch is skipped as bad data "
            "(the step is skipped on every rank) and training goes on; counted in %s. Warned once for this shape.",
            self.owner,
            world_rank_and_size()[0],
            what,
            self._logged_key,
        )

    def to(self, device: torch.device | str) -> BatchShapes:
        """Move the counter to ``device``."""
        self.counts.to(device)
        return self

    def state_dict(self, group: dist.ProcessGroup | None) -> torch.Tensor:
        """The count summed over ``group`` (a collective), for checkpoints that rank 0 writes."""
        return sum_over_group(self._counter.counts.detach().clone(), group)

    def load_state_dict(self, counts: torch.Tensor | None, group: dist.ProcessGroup | None) -> None:
        """Rank 0 of ``group`` takes the saved sum, the others start from 0 (so the group's sum is what was saved)."""
        counter = self._counter
        counter.reset()
        if counts is not None and rank_and_world(group)[0] == 0:
            counter.counts.copy_(counts)
        mark_updated(counter)
