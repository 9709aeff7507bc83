"""The per-pixel loss of dense heads, its memory bounded by chunks of heads x samples (pure functions, no state).

A dense head's logits live on the patch grid ``(h, w)``; its loss is the cross-entropy of those logits upsampled
bilinearly to the target's ``(H, W)``, over the pixels that are not ``ignore_index``. For K heads at full resolution
the upsampled logits are ``K x B x C x H x W`` numbers (15 G at 224 px, 150 classes, batch 128, 16 heads), and
autograd would keep them all for the backward. `chunked_pixel_sums` instead runs the upsampling, the loss and its
gradient for one chunk of heads x samples at a time inside its forward, keeps only the gradient on the patch grid
(the size of the logits), and its backward scales that gradient: the same numbers as the plain graph, with one
chunk of full-resolution tensors alive at a time. A chunk holds at most ``max_heads`` heads and, where one head and
one sample fit, at most ``max_elements`` upsampled logits (`CHUNK_ELEMENTS`, 512 MiB of float32): the memory no
longer grows with the batch or the resolution. Chunking over samples is exact: a head's loss is a sum over samples,
and each sample's gradient is its own term's (only the order of the float sums changes). Validation upsamples in the
same chunks (`upsampled_chunks`, no graph) to score pixels at the masks' resolution.

The loss is returned as per-head *sums* over the valid pixels, with the count of those pixels: the bank divides the
all-reduced sums by the all-reduced count, so that N ranks take the mean over every valid pixel of the global batch,
as one process would (`distprobe.bank.bank`).

`loss_cost` estimates a step's loss memory and time from the shapes alone (docs/dense.md's cost table).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

#: The most upsampled logits (heads x samples x C x H x W) one chunk of the loss holds: 512 MiB of float32.
CHUNK_ELEMENTS = 2**27
#: Float32 reads and writes per upsampled logit in a training step's loss: the upsampling writes it, log-softmax
#: reads it and writes its output, the loss's gradient is written once, log-softmax's backward reads two tensors and
#: writes one, and the upsampling's backward reads it once.
FULL_PASSES = 8
#: Float32 reads and writes per patch-grid logit added by the loss: the chunk copies (read, write), the kept
#: gradient (write), its scaling in the backward (read, write).
GRID_PASSES = 5
#: The memory bandwidth the time estimate assumes (bytes per second): an H100's HBM3, about 3 TB/s.
BANDWIDTH = 3e12


def upsample(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(k, B, C, h, w)`` logits to ``(k * B, C, H, W)``, bilinearly (``align_corners=False``, as DINOv3's head)."""
    flat = logits.flatten(0, 1)
    if tuple(flat.shape[-2:]) == tuple(size):
        return flat
    return F.interpolate(flat, size=size, mode="bilinear", align_corners=False)


def loss_size(
    grid: tuple[int, int], mask_size: tuple[int, int], resolution: tuple[int, int] | None, grid_scale: int | None
) -> tuple[int, int]:
    """The ``(H, W)`` the loss is computed at.

    ``resolution`` if given, else ``grid_scale`` times the patch grid (never above the masks' size), else the masks'
    own size (None, None: DINOv3's full resolution).

    Example:
        >>> loss_size((14, 14), (224, 224), None, 4), loss_size((14, 14), (32, 32), None, 4)
        ((56, 56), (32, 32))
    """
    if resolution is not None:
        return (int(resolution[0]), int(resolution[1]))
    if grid_scale is None:
        return (int(mask_size[0]), int(mask_size[1]))
    return (min(int(mask_size[0]), grid[0] * grid_scale), min(int(mask_size[1]), grid[1] * grid_scale))


def resize_targets(targets: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """``(B, H, W)`` class-index masks at ``size`` by nearest neighbour (None or the same size: unchanged).

    ``nearest-exact`` samples each output pixel's centre, where the bilinear upsampling of the logits
    (``align_corners=False``) evaluates them too; plain ``nearest`` takes the top-left pixel of each block, 1.5 px
    off the centre at a 4x reduction.
    """
    if size is None or tuple(targets.shape[-2:]) == tuple(size):
        return targets
    resized = F.interpolate(targets[:, None].float(), size=size, mode="nearest-exact")
    return resized[:, 0].to(targets.dtype)


def bilinear_weights(size_out: int, size_in: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(size_out, size_in)``: the weights of `upsample` along one axis, as a matrix.

    ``F.interpolate(mode="bilinear", align_corners=False)`` reads output index ``i`` at ``(i + 0.5) * in / out - 0.5``
    (at least 0), weighting its two neighbours by their distance; the last one is its own neighbour.

    Example:
        >>> bilinear_weights(4, 2, torch.float32, torch.device("cpu")).tolist()
        [[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]]
    """
    rows = torch.arange(size_out, device=device)
    src = ((rows.to(dtype) + 0.5) * (size_in / size_out) - 0.5).clamp(min=0)
    low = src.long()
    frac = src - low.to(dtype)
    weights = torch.zeros(size_out, size_in, dtype=dtype, device=device)
    weights.index_put_((rows, low), 1 - frac, accumulate=True)
    weights.index_put_((rows, (low + 1).clamp(max=size_in - 1)), frac, accumulate=True)
    return weights


def upsampled_rows(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(k, B, C, h, w)`` logits to ``(k * B * H * W, C)`` rows: `upsample`'s values, classes last.

    Bilinear upsampling is separable: two matrix products (`bilinear_weights` along w, then along h). They give
    `upsample`'s numbers up to float rounding, but as fast matmuls whose backward is matmuls too, and with the classes
    contiguous for the cross-entropy's softmax. (``F.interpolate`` on ``(N, C, H, W)`` runs one GPU thread per output
    pixel looping over ``N x C``: measured ~12 to 35 times slower than memory-bound on an H100.) Where float32
    matmuls run in TF32 (``torch.set_float32_matmul_precision("high")``), so do these, as the heads' own matmul.
    """
    k, b, c, h, w = logits.shape
    rows = logits.permute(0, 1, 3, 4, 2)  # (k, B, h, w, C): a copy of the small patch-grid logits
    height, width = size
    if (height, width) == (h, w):
        return rows.reshape(-1, c)
    along_w = bilinear_weights(width, w, logits.dtype, logits.device)
    along_h = bilinear_weights(height, h, logits.dtype, logits.device)
    rows = torch.matmul(along_w, rows.reshape(k * b * h, w, c))  # (k B h, W, C)
    rows = torch.matmul(along_h, rows.reshape(k * b, h, width * c))  # (k B, H, W C)
    return rows.reshape(-1, c)


def pixel_sums(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``(k,)``: each head's summed cross-entropy over the valid pixels of ``(B, H, W)`` targets."""
    k = logits.shape[0]
    rows = upsampled_rows(logits, (targets.shape[-2], targets.shape[-1]))
    labels = targets.reshape(1, -1).expand(k, -1).reshape(-1)
    per_pixel = F.cross_entropy(rows, labels, ignore_index=ignore_index, reduction="none")
    return per_pixel.view(k, -1).sum(dim=1)


def chunk_shape(
    num_heads: int, batch: int, per_sample: int, max_heads: int | None, max_elements: int | None
) -> tuple[int, int]:
    """``(heads, samples)`` per chunk of the loss.

    At most ``max_heads`` heads (None: all) and at most ``max_elements`` upsampled logits (``per_sample`` per head
    and sample; None: no bound), but at least one head x one sample.

    Example:
        >>> chunk_shape(16, 128, 150 * 224 * 224, 4, 2**27)  # 7.5 M logits a sample: 4 heads x 4 samples
        (4, 4)
        >>> chunk_shape(16, 256, 150 * 1024 * 1024, 4, 2**27)  # one sample is over the budget: 1 x 1
        (1, 1)
    """
    heads = min(num_heads, max_heads or num_heads)
    if max_elements is None:
        return heads, batch
    samples = max(1, min(batch, max_elements // (heads * per_sample)))
    if samples == 1:  # a whole chunk of heads is too large for one sample: fewer heads
        heads = min(heads, max(1, max_elements // per_sample))
    return heads, samples


def _chunks(logits: torch.Tensor, heads: int, samples: int) -> Iterator[tuple[slice, slice]]:
    """``(head slice, sample slice)`` of every chunk of ``(K, B, ...)`` logits, heads outermost."""
    for h in range(0, logits.shape[0], heads):
        for s in range(0, logits.shape[1], samples):
            yield slice(h, h + heads), slice(s, s + samples)


def upsampled_chunks(
    logits: torch.Tensor, size: tuple[int, int], max_heads: int | None, max_elements: int | None
) -> Iterator[tuple[slice, slice, torch.Tensor]]:
    """Every chunk of ``(K, B, C, h, w)`` logits upsampled to ``size``, one chunk at a time (no graph kept).

    Yields ``(head slice, sample slice, values)`` with ``values`` the chunk's `upsampled_rows` as
    ``(heads, samples, H, W, C)``; a chunk holds at most ``max_heads`` heads and ``max_elements`` upsampled logits
    (`chunk_shape`), as the loss's. Drop each chunk's values before taking the next (``del``): two chunks alive at
    once would double the peak. Validation's confusion matrices score pixels through it
    (`distprobe.bank.segmentation`).

    Example:
        >>> logits = torch.arange(2 * 3 * 2 * 1 * 1.0).view(2, 3, 2, 1, 1)  # 2 heads, 3 samples, 2 classes, 1 x 1
        >>> [(hs.start, ss.start, tuple(v.shape)) for hs, ss, v in upsampled_chunks(logits, (2, 2), 1, 2 * 2 * 2 * 2)]
        [(0, 0, (1, 2, 2, 2, 2)), (0, 2, (1, 1, 2, 2, 2)), (1, 0, (1, 2, 2, 2, 2)), (1, 2, (1, 1, 2, 2, 2))]
    """
    k, b, c = logits.shape[:3]
    heads, samples = chunk_shape(k, b, c * size[0] * size[1], max_heads, max_elements)
    for hs, ss in _chunks(logits, heads, samples):
        part = logits[hs, ss]
        yield hs, ss, upsampled_rows(part, size).view(part.shape[0], part.shape[1], size[0], size[1], c)


class _ChunkedPixelSums(torch.autograd.Function):
    """Per-head pixel sums whose gradient is computed chunk by chunk in the forward (see the module docstring)."""

    @staticmethod
    def forward(
        ctx: Any, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, heads: int, samples: int
    ) -> torch.Tensor:
        sums = torch.zeros(logits.shape[0], dtype=logits.dtype, device=logits.device)
        grad = torch.empty_like(logits)
        for hs, ss in _chunks(logits, heads, samples):
            part = logits[hs, ss].detach().requires_grad_()
            with torch.enable_grad():
                part_sums = pixel_sums(part, targets[ss], ignore_index)
                # Heads and samples are independent: the gradient of the chunk's total is each term's own gradient.
                (part_grad,) = torch.autograd.grad(part_sums.sum(), part)
            sums[hs] += part_sums.detach()
            grad[hs, ss] = part_grad
        ctx.save_for_backward(grad)
        return sums

    @staticmethod
    def backward(ctx: Any, grad_sums: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        return grad * grad_sums.view(-1, *([1] * (grad.ndim - 1))), None, None, None, None


def chunked_pixel_sums(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    chunk: int | None = None,
    max_elements: int | None = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """``(K,)`` summed pixel cross-entropies of ``(K, B, C, h, w)`` logits against ``(B, H, W)`` targets.

    Args:
        logits: Every head's logits on the patch grid.
        targets: Class-index masks; ``ignore_index`` pixels count for nothing.
        ignore_index: The label of pixels without a class.
        chunk: Most heads upsampled at once (None: all of them).
        max_elements: Most upsampled logits (heads x samples x C x H x W) at once (`chunk_shape`); None: no bound.
            When everything fits in one chunk the loss is one plain autograd graph.

    Example:
        >>> logits = torch.zeros(2, 1, 3, 2, 2, requires_grad=True)
        >>> sums = chunked_pixel_sums(logits, torch.tensor([[[0, 1], [2, 255]]]), 255, chunk=1)
        >>> [round(v, 4) for v in sums.tolist()]  # 3 valid pixels, each log(3)
        [3.2958, 3.2958]
    """
    k, b, c = logits.shape[:3]
    heads, samples = chunk_shape(k, b, c * targets.shape[-2] * targets.shape[-1], chunk, max_elements)
    if heads >= k and samples >= b:  # one chunk: the plain graph
        return pixel_sums(logits, targets, ignore_index)
    if not logits.requires_grad:  # no graph to keep: chunks bound the memory alone
        sums = torch.zeros(k, dtype=logits.dtype, device=logits.device)
        for hs, ss in _chunks(logits, heads, samples):
            sums[hs] += pixel_sums(logits[hs, ss], targets[ss], ignore_index)
        return sums
    return _ChunkedPixelSums.apply(logits, targets, ignore_index, heads, samples)


def valid_pixels(targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """0-d float: how many pixels of ``targets`` carry a class (a device tensor, no host sync)."""
    return (targets != ignore_index).sum().to(torch.float32)


@dataclass(frozen=True)
class LossCost:
    """A training step's loss cost, from the shapes alone (`loss_cost`): float32 element counts and their bytes."""

    samples: int
    """Samples the loss trains on (the share of the batch)."""
    size: tuple[int, int]
    """The ``(H, W)`` the loss is computed at."""
    chunk: tuple[int, int]
    """``(heads, samples)`` per chunk (`chunk_shape`)."""
    full_elements: int
    """Upsampled logits over the whole step: ``K x samples x C x H x W``."""
    chunk_elements: int
    """Upsampled logits of one chunk."""
    partial_elements: int
    """One chunk's logits upsampled along the width only (``heads x samples x C x h x W``, `upsampled_rows`)."""
    grid_elements: int
    """Patch-grid logits of every head: ``K x samples x C x h x w``."""

    @property
    def peak_elements(self) -> int:
        """Float32 numbers alive at the loss's peak.

        A chunk's upsampled logits, their log-softmax and its gradient (``3 x chunk``) and the half-upsampled
        logits (``partial``), beside every head's patch-grid logits and their kept gradient (``2 x grid``); the
        backward then holds ``3 x grid``.
        """
        chunk = 3 * self.chunk_elements + self.partial_elements
        return max(chunk + 2 * self.grid_elements, 3 * self.grid_elements)

    @property
    def peak_bytes(self) -> int:
        """`peak_elements` in float32 bytes."""
        return 4 * self.peak_elements

    def seconds(self, bandwidth: float = BANDWIDTH) -> float:
        """The loss's time if memory-bound: `FULL_PASSES` over the upsampled logits, `GRID_PASSES` over the grid's."""
        return 4 * (FULL_PASSES * self.full_elements + GRID_PASSES * self.grid_elements) / bandwidth


def loss_cost(
    num_heads: int,
    batch: int,
    num_classes: int,
    grid: tuple[int, int],
    mask_size: tuple[int, int],
    *,
    samples_per_step: int | None,
    resolution: tuple[int, int] | None,
    grid_scale: int | None,
    max_heads: int | None,
    max_elements: int | None,
) -> LossCost:
    """The loss cost of one training step of ``num_heads`` dense heads on a batch of ``batch`` samples.

    Example:
        >>> cost = loss_cost(16, 128, 150, (14, 14), (224, 224), samples_per_step=None, resolution=None,
        ...                  grid_scale=None, max_heads=4, max_elements=2**27)
        >>> cost.full_elements, cost.chunk, round(cost.peak_bytes / 2**30, 2)  # full resolution, the whole batch
        (15414067200, (4, 4), 1.82)
    """
    samples = min(batch, samples_per_step or batch)
    size = loss_size(grid, mask_size, resolution, grid_scale)
    per_sample = num_classes * size[0] * size[1]
    heads, chunk_samples = chunk_shape(num_heads, samples, per_sample, max_heads, max_elements)
    return LossCost(
        samples=samples,
        size=size,
        chunk=(heads, chunk_samples),
        full_elements=num_heads * samples * per_sample,
        chunk_elements=heads * chunk_samples * per_sample,
        partial_elements=heads * chunk_samples * num_classes * grid[0] * size[1],
        grid_elements=num_heads * samples * num_classes * grid[0] * grid[1],
    )
