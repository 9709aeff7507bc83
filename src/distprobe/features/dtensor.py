"""Tensor-parallel features: a DTensor output is gathered whole before any probe, kNN or monitor reads it."""

from __future__ import annotations

import torch

__all__ = ["whole"]


def whole(features: torch.Tensor) -> torch.Tensor:
    """``features`` as a plain local tensor: a DTensor (a tensor-parallel backbone's output) is gathered first.

    ``full_tensor()`` is a collective over the DTensor's mesh: every rank of that mesh must call it.
    """
    full_tensor = getattr(features, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else features
