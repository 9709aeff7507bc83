"""Undo torchmetrics' squeeze of one-element results, for metrics whose result has one value per head, k or class.

torchmetrics' ``Metric.compute`` wrapper squeezes any one-element tensor to 0-d. A ``(K,)`` result then loses its
dimension when ``K == 1`` (one head, one ``k``), and indexing it fails only then, at the end of the first
validation epoch. Every per-row result goes through `per_row` before it is indexed.
"""

from __future__ import annotations

import torch


def per_row(value: torch.Tensor, rows: int) -> torch.Tensor:
    """``value`` as a ``(rows,)`` tensor, whether torchmetrics squeezed it to 0-d or not.

    Example:
        >>> per_row(torch.tensor(0.5), 1)
        tensor([0.5000])
    """
    assert value.numel() == rows, f"expected {rows} values, got shape {tuple(value.shape)}"
    return value.reshape(rows)
