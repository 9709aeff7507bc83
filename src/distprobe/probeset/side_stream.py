"""Where a `ProbeSet`'s GPU work runs: a side CUDA stream (`distprobe.engine.streams`), made at the first CUDA step.

By default the side stream is on for a single process on CUDA, and off when several processes train: there the probes'
collectives would be issued from the side stream, which no multi-GPU run has checked yet (docs/benchmarks.md, Session
J). ``overlap=True/False``, or ``DISTPROBE_OVERLAP=1/0`` for every set (the Lightning callbacks' included), decides
instead. When it is off, or on a CPU, the work runs on the training's stream.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

from distprobe.engine.streams import SideStream

_ON = ("1", "true", "on", "yes")
_OFF = ("0", "false", "off", "no")


def overlap_from_environment() -> bool | None:
    """``DISTPROBE_OVERLAP``: True or False when set, None when unset; a value that is neither is refused."""
    value = os.environ.get("DISTPROBE_OVERLAP")
    if value is None:
        return None
    word = value.strip().lower()
    if word in _ON or word in _OFF:
        return word in _ON
    raise ValueError(
        f"environment variable DISTPROBE_OVERLAP got {value!r}; expected one of {_ON} (probe work on a side CUDA "
        f"stream) or {_OFF} (on the training's stream), or unset it for the default."
    )


def default_overlap(cuda: bool, processes: int) -> bool:
    """The side stream's default: on for one process on CUDA, off for several (see the module docstring)."""
    return cuda and processes == 1


def _processes() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class LazySideStream:
    """The side stream of one set, made for the device of the first CUDA tensors it sees (else the set's device)."""

    def __init__(self, overlap: bool | None, device: torch.device | str | None) -> None:
        if overlap is not None and not isinstance(overlap, bool):
            raise ValueError(
                f"ProbeSet: argument 'overlap' got {overlap!r}; expected True, False or None (the default: "
                "DISTPROBE_OVERLAP when set, else on for one process on CUDA)."
            )
        # The variable is the switch for Lightning users, who build no set. Read here, at build: a bad value is
        # refused before training starts, never in the middle of it.
        self._overlap = overlap if overlap is not None else overlap_from_environment()
        """True or False as asked; None: the default, decided at the first step (the process group exists then)."""
        self._device = device
        self._side: SideStream | None = None
        """The side CUDA stream of the probe work (`distprobe.engine.streams`), made on the first CUDA step."""

    def wanted(self) -> bool:
        """Whether the probe work goes on a side stream (the default is decided on the first call)."""
        if self._overlap is None:
            # On by default for one process: on an H200 the integrated path gave bitwise the serial probes and left
            # the backbone bitwise alone (tests/callbacks/test_overlap_gpu.py), and cost less on every workload
            # measured (docs/benchmarks.md, "Session J").
            self._overlap = default_overlap(torch.cuda.is_available(), _processes())
        return self._overlap

    def get(self, tensors: Sequence[torch.Tensor] = ()) -> SideStream | None:
        """The side stream, made for the device of ``tensors`` (else the set's device) the first time one is CUDA."""
        if self._side is None and self.wanted():
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
        # Off (and on a machine without CUDA, by default): no walk over the inputs, which runs on every step.
        tensors = list(inputs) if self.wanted() else []
        side = self.get(tensors)
        if side is None:
            yield []
            return
        with side.run(tensors) as outputs:
            yield outputs
