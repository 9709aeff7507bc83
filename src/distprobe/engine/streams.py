"""Probe work on a side CUDA stream, so that it overlaps the backbone's own kernels instead of queueing behind them.

A probe step reads detached features and writes only the probe's own tensors, so it needs to wait for nothing but
the features. On the training's stream it would also wait for everything queued before it (the backward, the main
optimizer step) and delay everything queued after it. On a side stream:

- `SideStream.mark` records an event on the training's stream where the features are ready (an adapter calls it
  right after the forward, e.g. Lightning's ``on_before_backward``); the side stream waits for that event only;
- the probe's kernels are enqueued on the side stream (`SideStream.launch`), and its inputs are kept alive for it
  with ``record_stream``, since the training's allocator may otherwise hand their memory out again;
- whatever the training's stream later reads (logged values, evaluations, checkpoints) waits on the side stream's
  last event first (`SideStream.join`): a device-side wait, never a host sync.

On a CPU, or when disabled, every method is a no-op and the work runs where it always did: the eager path the tests
compare against. Kernels run in the same order on the side stream as they would on the main one, so a step gives
bitwise the same result there.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch


class SideStream:
    """One side CUDA stream for a probe (or a bank) on ``device``; inactive on a CPU or when ``enabled`` is False.

    Example:
        >>> side = SideStream(torch.device("cpu"))
        >>> with side.launch([torch.ones(2)]):
        ...     y = torch.ones(2) * 2
        >>> side.join([y]); side.active
        False
    """

    def __init__(self, device: torch.device | str, enabled: bool = True) -> None:
        device = torch.device(device)
        self.active = enabled and device.type == "cuda" and torch.cuda.is_available()
        self.device = device
        self.stream = torch.cuda.Stream(device=device) if self.active else None
        self._features: torch.cuda.Event | None = None
        """Recorded on the training's stream where the features are ready (None: wait for the whole stream)."""
        self._done: torch.cuda.Event | None = None
        """Recorded on the side stream after its last launch; what the training's stream waits on."""

    def mark(self) -> None:
        """Record, on the current stream, the point after which the next launch's inputs are ready."""
        if not self.active:
            return
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self._features = event

    @contextlib.contextmanager
    def launch(self, inputs: Iterable[torch.Tensor]) -> Iterator[None]:
        """Enqueue the body's kernels on the side stream, after the marked point of the training's stream.

        ``inputs`` are tensors made on the training's stream that the body reads: their memory stays reserved until
        the side stream is done with them. Tensors the body allocates belong to the side stream's pool.
        """
        if not self.active:
            yield
            return
        assert self.stream is not None
        if self.in_use():  # nested (the coordinator's reads, then ProbeSet.train): already on the side stream
            yield
            return
        main = torch.cuda.current_stream(self.device)
        if self._features is not None:
            self.stream.wait_event(self._features)
            self._features = None
        else:  # no mark: the features may be anything queued so far
            self.stream.wait_stream(main)
        for tensor in inputs:
            if tensor.device.type == "cuda":
                tensor.record_stream(self.stream)
        with torch.cuda.stream(self.stream):
            yield
            done = torch.cuda.Event()
            done.record(self.stream)
        self._done = done

    def in_use(self) -> bool:
        """Whether the current stream is this side stream (inside a `launch`)."""
        return self.active and torch.cuda.current_stream(self.device) == self.stream

    def forget_mark(self) -> None:
        """Make the next launch wait for everything queued on the training's stream so far, not the marked point.

        For a step whose inputs are computed after the mark (a probe's own labeled batch, run through the model in
        the batch-end hook): they, and the optimizer step that changes the model, come after it.
        """
        self._features = None

    @contextlib.contextmanager
    def run(self, inputs: Iterable[torch.Tensor]) -> Iterator[list[Any]]:
        """`launch` the body, then `join` at its end: the training's stream waits for the body's kernels.

        The body appends what it returns to the yielded list; every tensor in it (through dataclasses, mappings and
        sequences) is kept for the training's stream, which reads it next (logging, predictions in the batch).
        """
        outputs: list[Any] = []
        nested = self.in_use()
        with self.launch(inputs):
            yield outputs
        if not nested:
            self.join(tensors_in(outputs))

    def join(self, outputs: Iterable[torch.Tensor] = ()) -> None:
        """Make the current stream wait for the side stream's last launch (on the device; the host goes on).

        ``outputs`` are side-stream tensors the current stream will read: their memory is kept for that stream too.
        """
        if not self.active or self._done is None:
            return
        current = torch.cuda.current_stream(self.device)
        current.wait_event(self._done)
        for tensor in outputs:
            if tensor.device.type == "cuda":
                tensor.record_stream(current)


def tensors_in(value: Any, depth: int = 4) -> Iterator[torch.Tensor]:
    """The tensors held by ``value``: itself, or inside its dataclass fields, mapping values and sequence items."""
    if isinstance(value, torch.Tensor):
        yield value
    elif depth == 0 or value is None or isinstance(value, (str, bytes, int, float, bool)):
        return
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            yield from tensors_in(getattr(value, field.name), depth - 1)
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from tensors_in(item, depth - 1)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_in(item, depth - 1)
