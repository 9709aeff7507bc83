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

A validation batch is held to what training established too (`BatchShapes.conform_eval`): one that differs is skipped,
its samples not counted, and counted in `BatchShapes.eval_counts` (``eval/{name}_bad_batches/wrong_shape``); the engine
still joins any per-batch collective with an empty batch. A skipped batch's predictions stand in for its rows as NaN
(-1 for class indices, `stand_in_preds`), so that users who index predictions by batch row still find one per sample.
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


def numel_signature(sample: torch.Size) -> tuple[int, ...]:
    """The number of elements of one sample: what an engine that flattens each sample reads (kNN, ridge)."""
    return (int(sample.numel()),)


def flat_input_shapes(kind: str, config: Any) -> BatchShapes:
    """The shapes of an engine that reads one input's samples flattened (kNN, ridge): their size, and the targets'.

    ``config`` gives the member's ``name`` and ``input`` key; its targets are named by role.
    """
    source = getattr(config, "input", None)
    return BatchShapes(
        kind,
        config.name,
        [f"input {source or 'features'!r}", "target 'targets'"],
        [numel_signature, width_signature],
        eval_prefix=keys.stage_prefix(keys.EVAL, config.name),
        logged_stages=(),
    )


def batch_rows(tensors: Sequence[Any]) -> int | None:
    """A batch's number of samples, from its first tensor with a batch dimension (None: no tensor says)."""
    return next((int(t.shape[0]) for t in tensors if isinstance(t, torch.Tensor) and t.ndim), None)


def stand_in_preds(preds: torch.Tensor, rows: int | None) -> torch.Tensor:
    """Predictions for the ``rows`` samples of a batch skipped for its shape: NaN, or -1 for class indices.

    ``preds`` are the engine's predictions of the empty batch it ran instead (their per-sample shape and dtype). With
    ``rows`` unknown (every input of the batch missing) they are returned as they are.
    """
    if rows is None:
        return preds
    return preds.new_full((rows, *preds.shape[1:]), float("nan") if preds.is_floating_point() else -1)


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
        eval_prefix: The validation counter's key prefix, likewise.
        logged_stages: The stages whose count the member logs (``train`` for probes and banks, whose counts ride in
            `distprobe.probeset.values.train_values`'s sync); the others' counts stay on the engine, and the warning
            says so rather than name a key that is never logged.
    """

    def __init__(
        self,
        kind: str,
        name: str,
        labels: Sequence[str],
        signatures: Sequence[Signature] | None = None,
        prefix: str = "",
        eval_prefix: str = "",
        logged_stages: Sequence[str] = (keys.TRAIN,),
    ) -> None:
        self.owner = f"{kind} {name!r}"
        self._counted_in = {
            stage: keys.key(stage, name, keys.bad_batches(WRONG_SHAPE))
            if stage in logged_stages
            else f"the {kind}'s batch_shapes.{'counts' if stage == keys.TRAIN else 'eval_counts'} (not logged)"
            for stage in (keys.TRAIN, keys.EVAL)
        }
        self.labels = list(labels)
        self._signatures = list(signatures) if signatures is not None else [width_signature] * len(self.labels)
        self._expected: list[_Expected] | None = None
        self._warned: set[tuple[str, str]] = set()
        self.counts = _counter_collection(prefix)
        """The run's batches of another shape than the first, on this rank (summed over the group when computed;
        `distprobe.loop.ProbeSet` and the callbacks log it with the bad-data counts)."""
        self.eval_counts = _counter_collection(eval_prefix)
        """The run's validation batches of other shapes than training established, on this rank (summed over the
        group when computed), like `counts`."""

    def name(self, labels: Sequence[str]) -> None:
        """Name the inputs as the adapter reads them (their keys), for the warnings."""
        assert len(labels) == len(self.labels), "one label per input"
        self.labels = list(labels)

    @property
    def established(self) -> bool:
        """Whether a first batch has set the shapes."""
        return self._expected is not None

    @property
    def counter(self) -> ReasonCounter:
        """The metric of `counts` (its ``counts`` state: this rank's training batches skipped for their shapes)."""
        return _reason_counter(self.counts)

    @property
    def eval_counter(self) -> ReasonCounter:
        """The metric of `eval_counts` (its ``counts``: this rank's validation batches skipped for their shapes)."""
        return _reason_counter(self.eval_counts)

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
        return self._conform(tensors, device, keys.TRAIN)

    def conform_eval(
        self, tensors: Sequence[torch.Tensor | None], device: torch.device
    ) -> tuple[list[torch.Tensor], bool]:
        """As `conform`, for a validation batch: compared with what training established (nothing before it).

        A batch that differs is counted in `eval_counts`; the engine evaluates the empty batch instead, so that it
        still joins a per-batch collective, and counts none of the batch's samples.
        """
        if self._expected is None:  # validation before any training batch: the first-batch checks apply
            return list(tensors), False  # type: ignore[arg-type]
        return self._conform(tensors, device, keys.EVAL)

    def _conform(
        self, tensors: Sequence[torch.Tensor | None], device: torch.device, stage: str
    ) -> tuple[list[torch.Tensor], bool]:
        assert self._expected is not None, "after the first batch"
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
            self._warn(differs, stage)
        counter = _reason_counter(self.counts if stage == keys.TRAIN else self.eval_counts)
        counter.counts.add_(1)  # on the device, no sync: only a batch that differs pays this op
        mark_updated(counter)
        return [torch.zeros((0, *e.sample), dtype=e.dtype, device=device) for e in self._expected], True

    def _described(self, expected: _Expected) -> str:
        return f"(batch, {', '.join(map(str, expected.sample))})" if expected.sample else "(batch,)"

    def expected(self) -> str:
        """Every input's expected shape, for a reader's message about a missing key."""
        assert self._expected is not None, "after the first batch"
        return ", ".join(f"{label} {self._described(e)}" for label, e in zip(self.labels, self._expected, strict=True))

    def warn_missing(self, detail: str, stage: str = keys.TRAIN) -> None:
        """Warn (once per ``detail``) that a reader found an input missing from a ``stage`` batch after the first."""
        self._warn(f"{detail} (expected {self.expected()})", stage)

    def _warn(self, what: str, stage: str = keys.TRAIN) -> None:
        if (stage, what) in self._warned:
            return
        self._warned.add((stage, what))
        template = (
            "%s: on rank %d a training batch after the first differs from it: %s. The batch is skipped as bad data "
            "(the step is skipped on every rank) and training goes on; counted in %s. Warned once for this shape."
            if stage == keys.TRAIN
            else "%s: on rank %d a validation batch differs from the shapes training established: %s. The batch is "
            "skipped (none of its samples is counted; its predictions are NaN, or -1 for class indices) and validation "
            "goes on; counted in "
            "%s. Warned once for this shape."
        )
        log.warning(template, self.owner, world_rank_and_size()[0], what, self._counted_in[stage])

    def to(self, device: torch.device | str) -> BatchShapes:
        """Move the counters to ``device``."""
        self.counts.to(device)
        self.eval_counts.to(device)
        return self

    def state_dict(self, group: dist.ProcessGroup | None) -> torch.Tensor:
        """The count summed over ``group`` (a collective), for checkpoints that rank 0 writes."""
        return sum_over_group(self.counter.counts.detach().clone(), group)

    def load_state_dict(self, counts: torch.Tensor | None, group: dist.ProcessGroup | None) -> None:
        """Rank 0 of ``group`` takes the saved sum, the others start from 0 (so the group's sum is what was saved)."""
        counter = self.counter
        counter.reset()
        if counts is not None and rank_and_world(group)[0] == 0:
            counter.counts.copy_(counts)
        mark_updated(counter)


def _counter_collection(prefix: str) -> MetricCollection:
    counts = MetricCollection(
        {keys.BAD_BATCHES: ReasonCounter((WRONG_SHAPE,), key_prefix=keys.bad_batches(""))},
        prefix=prefix,
        compute_groups=False,
    )
    mark_updated(_reason_counter(counts))  # a count of 0 is a value: no torchmetrics warning before the first one
    return counts


def _reason_counter(counts: MetricCollection) -> ReasonCounter:
    counter = counts[keys.BAD_BATCHES]
    assert isinstance(counter, ReasonCounter)
    return counter
