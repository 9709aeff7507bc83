"""The float32 matmul precision of a probe's own maths, set around its steps and restored after.

TF32 matmuls (``"high"``, in ``torch.set_float32_matmul_precision``'s words) make a bank's logits and weight gradient
several times cheaper on a GPU, and change its heads by about 1e-4 relative (docs/benchmarks.md). They are a
per-bank choice, not the process's: a user who set ``"highest"`` for the backbone keeps it there, and one who set
``"high"`` can still ask a bank for IEEE float32. torch has no per-op switch, so the bank sets the process's CUDA
matmul precision around its own forward and backward, and puts back what it found. That is safe because the host
launches the bank's kernels while no backbone kernel is being launched (the probes' step runs after the training
step's backward has been enqueued), and the precision is read at launch, not at run time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal, get_args

import torch

from distprobe.arguments import require_choice

MatmulPrecision = Literal["highest", "high"]
"""``"highest"``: IEEE float32 matmuls. ``"high"``: TF32 (10-bit mantissa products, float32 accumulation) on CUDA."""

_CUDA_PRECISION = {"highest": "ieee", "high": "tf32"}


def check_matmul_precision(owner: str, value: object) -> MatmulPrecision | None:
    """``value`` if it is None or a `MatmulPrecision`; else a ValueError naming ``owner`` and the choices."""
    default = "the head family's default: TF32 for linear heads, the process's own setting for the others"
    return require_choice(owner, "matmul_precision", value, get_args(MatmulPrecision), none_means=default)


@contextlib.contextmanager
def float32_matmuls(precision: MatmulPrecision | None) -> Iterator[None]:
    """CUDA float32 matmuls at ``precision`` inside (forward and backward alike); None leaves the process's setting.

    Only torch's newer per-backend switch (``torch.backends.cuda.matmul.fp32_precision``) is read and written: mixing
    it with the legacy ``allow_tf32`` makes ``torch.get_float32_matmul_precision`` raise, and restoring the exact value
    found keeps a user's later calls of either API working. CPU matmuls are not affected.
    """
    if precision is None:
        yield
        return
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    wanted = _CUDA_PRECISION[precision]
    if before == wanted:
        yield
        return
    matmul.fp32_precision = wanted
    try:
        yield
    finally:
        matmul.fp32_precision = before
