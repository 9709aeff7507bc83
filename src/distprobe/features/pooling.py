"""Token pooling of a tapped module's output: pure functions over tensors (torch only).

A transformer block's output is ``(B, N, D)``: token 0 is the CLS token, tokens ``1 .. prefix_tokens - 1`` are
register tokens, the rest are patch tokens. The pools follow DINOv2's linear evaluation (``create_linear_input``):
the CLS token, the mean patch token, their concatenation, and the CLS tokens of the last blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

TokenPool = Literal["cls", "mean", "cls+mean", "patch"]
"""Pools of one module's output (``last{n}`` combines several modules' ``cls``, and the last one's ``mean``;
``patch`` keeps the patch tokens unpooled, for dense heads)."""


def first_tensor(output: Any) -> torch.Tensor:
    """The tensor a module returned: the output itself, or the first element of a tuple or list.

    Raises:
        TypeError: when there is no tensor there.
    """
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"the module returned a {type(output).__name__}; expected a tensor or a tuple of them")
    return output


def token_problem(x: torch.Tensor, prefix_tokens: int) -> str | None:
    """Describe why ``x`` cannot be token-pooled with ``prefix_tokens`` leading tokens, or return None."""
    if x.ndim != 3:
        return f"token pooling needs a (batch, tokens, dim) output, got shape {tuple(x.shape)}"
    if x.shape[1] <= prefix_tokens:
        return (
            f"the output has {x.shape[1]} tokens but {prefix_tokens} prefix (CLS and register) tokens are set aside: "
            "no patch token is left to average"
        )
    return None


def cls_token(x: torch.Tensor) -> torch.Tensor:
    """Token 0 of a ``(B, N, D)`` output, as a new ``(B, D)`` tensor (not a view that keeps ``x`` alive)."""
    return x[:, 0].clone()


def patch_mean(x: torch.Tensor, prefix_tokens: int = 1) -> torch.Tensor:
    """Mean of the patch tokens ``x[:, prefix_tokens:]`` of a ``(B, N, D)`` output: ``(B, D)``."""
    return x[:, prefix_tokens:].mean(dim=1)


def patch_tokens(x: torch.Tensor, prefix_tokens: int = 1) -> torch.Tensor:
    """The patch tokens ``x[:, prefix_tokens:]`` of a ``(B, N, D)`` output, as a new ``(B, N - prefix, D)`` tensor."""
    return x[:, prefix_tokens:].contiguous()


def pool_tokens(x: torch.Tensor, pool: TokenPool, prefix_tokens: int = 1) -> torch.Tensor:
    """Pool one ``(B, N, D)`` output: ``cls`` and ``mean`` give ``(B, D)``, ``cls+mean`` gives ``(B, 2D)``.

    ``patch`` gives the ``(B, N - prefix_tokens, D)`` patch tokens themselves (dense heads).

    Example:
        >>> x = torch.arange(12.0).reshape(1, 3, 4)
        >>> pool_tokens(x, "cls+mean").tolist()
        [[0.0, 1.0, 2.0, 3.0, 6.0, 7.0, 8.0, 9.0]]
    """
    problem = token_problem(x, prefix_tokens)
    if problem is not None:
        raise ValueError(problem)
    if pool == "cls":
        return cls_token(x)
    if pool == "mean":
        return patch_mean(x, prefix_tokens)
    if pool == "patch":
        return patch_tokens(x, prefix_tokens)
    return torch.cat([cls_token(x), patch_mean(x, prefix_tokens)], dim=-1)


def concat_features(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate per-module features on their last dimension (``last{n}``: n CLS tokens, then a mean token)."""
    return parts[0] if len(parts) == 1 else torch.cat(list(parts), dim=-1)
