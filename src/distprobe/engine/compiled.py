"""Small maths compiled into one kernel on CUDA (``torch.compile``), and the same function run eagerly elsewhere.

The bank's per-step maths outside its matmuls is memory-bound: eager, each elementwise op and each reduction is a
pass over its tensors (the SGD update over the whole bank, the top-k count over the ``(B, K, C)`` logits).
Compiled, a function reads its inputs once and writes its outputs once. CPU runs (CI) keep the eager function, which
the GPU tests compare the compiled one against. A compiler that fails (no C compiler, an old Triton) leaves the
eager function in place for the rest of the process, so a probe never takes the training down for a kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

import torch

R = TypeVar("R")


class CudaCompiled(Generic[R]):
    """``fn`` compiled (one full graph) when its tensors are on CUDA; ``fn`` itself otherwise.

    ``dynamic`` is torch.compile's: False specialises every shape (the bank's parameters, whose shapes are fixed);
    None (torch's default) recompiles once with symbolic sizes when a second shape comes (batch sizes: a training
    batch, an epoch's last one, validation's), so that torch's cap on recompilations is never reached.

    Example:
        >>> double = CudaCompiled(lambda x: x * 2)
        >>> double(torch.ones(2), on_cuda=False)
        tensor([2., 2.])
    """

    def __init__(self, fn: Callable[..., R], *, dynamic: bool | None = False) -> None:
        self.fn = fn
        self.dynamic = dynamic
        self._compiled: Callable[..., R] | None = None
        self.broken = False
        """Set once compilation failed in this process: the eager function runs from then on."""

    def available(self) -> bool:
        """Whether a call with CUDA tensors would run compiled (torch.compile importable, CUDA present, no failure)."""
        return torch.cuda.is_available() and not self.broken and self._compiler() is not None

    def __call__(self, *args: Any, on_cuda: bool, compiled: bool = True) -> R:
        """``fn(*args)``, compiled when ``on_cuda`` and ``compiled`` (the tests pass False for the eager maths)."""
        fn = self._compiler() if compiled and on_cuda and not self.broken else None
        if fn is not None:
            try:
                return fn(*args)
            except Exception:  # noqa: BLE001 - the compiler failed: the eager maths from now on
                self.broken = True
        return self.fn(*args)

    def _compiler(self) -> Callable[..., R] | None:
        if self._compiled is None and not self.broken:
            try:
                self._compiled = torch.compile(self.fn, fullgraph=True, dynamic=self.dynamic)
            except Exception:  # noqa: BLE001 - an unusable compiler leaves the eager function in place
                self.broken = True
        return self._compiled
