"""Where a `ProbeSet`'s GPU work runs: a side CUDA stream (`distprobe.engine.streams`), made at the first CUDA step.

The side stream is on by default on CUDA; ``overlap=False`` (or ``DISTPROBE_OVERLAP=0`` for every set, the Lightning
callbacks' included) turns it off. When it is off, or on a CPU, the work runs on the training's stream.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from distprobe.engine.streams import SideStream


class LazySideStream:
    """The side stream of one set, made for the device of the first CUDA tensors it sees (else the set's device)."""

    def __init__(self, overlap: bool | None, device: torch.device | str | None) -> None:
        if overlap is None:
            # On by default: on an H200 the integrated path gave bitwise the serial probes and left the backbone
            # bitwise alone (tests/callbacks/test_overlap_gpu.py), and cost less on every workload measured
            # (docs/benchmarks.md, "Session J"). The variable is the switch for Lightning users, who build no set.
            overlap = os.environ.get("DISTPROBE_OVERLAP", "1") != "0"
        self._overlap = overlap
        self._device = device
        self._side: SideStream | None = None
        """The side CUDA stream of the probe work (`distprobe.engine.streams`), made on the first CUDA step."""

    def get(self, tensors: Sequence[torch.Tensor] = ()) -> SideStream | None:
        """The side stream, made for the device of ``tensors`` (else the set's device) the first time one is CUDA."""
        if self._side is None and self._overlap:
            device = next((t.device for t in tensors if t.is_cuda), None)
            if device is None and self._device is not None and torch.device(self._device).type == "cuda":
                device = torch.device(self._device)
            if device is not None:
                self._side = SideStream(device)
        return self._side

    def mark(self) -> None:
        """Mark where this step's features are ready (see `ProbeSet.mark`)."""
        side = self.get()
        if side is not None:
            side.mark()

    def forget_mark(self) -> None:
        """Drop the mark (see `SideStream.forget_mark`)."""
        if self._side is not None:
            self._side.forget_mark()

    @contextlib.contextmanager
    def overlapped(self, inputs: Iterable[torch.Tensor] = ()) -> Iterator[list[Any]]:
        """Run the body on the side stream when there is one (see `ProbeSet.overlapped`)."""
        # Off: no walk over the inputs, which runs on every step.
        tensors = list(inputs) if self._overlap else []
        side = self.get(tensors)
        if side is None:
            yield []
            return
        with side.run(tensors) as outputs:
            yield outputs
