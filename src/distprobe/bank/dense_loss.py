"""The per-pixel loss of dense heads, with memory bounded by a chunk of heads (pure functions, no state).

A dense head's logits live on the patch grid ``(h, w)``; its loss is the cross-entropy of those logits upsampled
bilinearly to the target's ``(H, W)``, over the pixels that are not ``ignore_index``. For K heads at full resolution
the upsampled logits are ``K x B x C x H x W`` numbers (15 G at 224 px, 150 classes, batch 128, 16 heads), and
autograd would keep them all for the backward. `chunked_pixel_sums` instead runs the upsampling, the loss and its
gradient for a few heads at a time inside its forward, keeps only the gradient on the patch grid (the size of the
logits), and its backward scales that gradient: the same numbers as the plain graph, with one chunk of full-resolution
tensors alive at a time.

The loss is returned as per-head *sums* over the valid pixels, with the count of those pixels: the bank divides the
all-reduced sums by the all-reduced count, so that N ranks take the mean over every valid pixel of the global batch,
as one process would (`distprobe.bank.bank`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def upsample(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(k, B, C, h, w)`` logits to ``(k * B, C, H, W)``, bilinearly (``align_corners=False``, as DINOv3's head)."""
    flat = logits.flatten(0, 1)
    if tuple(flat.shape[-2:]) == tuple(size):
        return flat
    return F.interpolate(flat, size=size, mode="bilinear", align_corners=False)


def resize_targets(targets: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """``(B, H, W)`` class-index masks at ``size`` by nearest neighbour (None or the same size: unchanged)."""
    if size is None or tuple(targets.shape[-2:]) == tuple(size):
        return targets
    resized = F.interpolate(targets[:, None].float(), size=size, mode="nearest")
    return resized[:, 0].to(targets.dtype)


def pixel_sums(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``(k,)``: each head's summed cross-entropy over the valid pixels of ``(B, H, W)`` targets."""
    k = logits.shape[0]
    upsampled = upsample(logits, (targets.shape[-2], targets.shape[-1]))
    per_pixel = F.cross_entropy(upsampled, targets.repeat(k, 1, 1), ignore_index=ignore_index, reduction="none")
    return per_pixel.view(k, -1).sum(dim=1)


class _ChunkedPixelSums(torch.autograd.Function):
    """Per-head pixel sums whose gradient is computed chunk by chunk in the forward (see the module docstring)."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, chunk: int) -> torch.Tensor:
        k = logits.shape[0]
        sums = torch.empty(k, dtype=logits.dtype, device=logits.device)
        grad = torch.empty_like(logits)
        for start in range(0, k, chunk):
            part = logits[start : start + chunk].detach().requires_grad_()
            with torch.enable_grad():
                part_sums = pixel_sums(part, targets, ignore_index)
                # Heads are independent: the gradient of the chunk's total is each head's own gradient.
                (part_grad,) = torch.autograd.grad(part_sums.sum(), part)
            sums[start : start + chunk] = part_sums.detach()
            grad[start : start + chunk] = part_grad
        ctx.save_for_backward(grad)
        return sums

    @staticmethod
    def backward(ctx: Any, grad_sums: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (grad,) = ctx.saved_tensors
        return grad * grad_sums.view(-1, *([1] * (grad.ndim - 1))), None, None, None


def chunked_pixel_sums(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, chunk: int | None = None
) -> torch.Tensor:
    """``(K,)`` summed pixel cross-entropies of ``(K, B, C, h, w)`` logits against ``(B, H, W)`` targets.

    Args:
        logits: Every head's logits on the patch grid.
        targets: Class-index masks; ``ignore_index`` pixels count for nothing.
        ignore_index: The label of pixels without a class.
        chunk: Heads upsampled at once (None: all of them, as one plain autograd graph).

    Example:
        >>> logits = torch.zeros(2, 1, 3, 2, 2, requires_grad=True)
        >>> sums = chunked_pixel_sums(logits, torch.tensor([[[0, 1], [2, 255]]]), 255, chunk=1)
        >>> [round(v, 4) for v in sums.tolist()]  # 3 valid pixels, each log(3)
        [3.2958, 3.2958]
    """
    k = logits.shape[0]
    if not logits.requires_grad:  # no graph to keep: chunks bound the memory alone
        step = chunk or k
        return torch.cat([pixel_sums(logits[s : s + step], targets, ignore_index) for s in range(0, k, step)])
    if chunk is None or chunk >= k:
        return pixel_sums(logits, targets, ignore_index)
    return _ChunkedPixelSums.apply(logits, targets, ignore_index, chunk)


def valid_pixels(targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """0-d float: how many pixels of ``targets`` carry a class (a device tensor, no host sync)."""
    return (targets != ignore_index).sum().to(torch.float32)
