"""Dense heads: K linear segmentation heads on patch tokens (DINOv3's linear head), trained as one family.

One head (`DenseHead`, a plain module) is DINOv3's linear segmentation head: per patch, an optional BatchNorm
without affine, then a linear map to C classes; its logits on the patch grid ``(h, w)`` are upsampled bilinearly to
the target's ``(H, W)`` and trained by per-pixel cross-entropy over the pixels that are not ``ignore_index``.

`DenseHeads` stacks K such heads as `distprobe.bank.families.linear` stacks linear heads (one ``(K_s, C, D + 1)``
block per source, the bias as the last column): the forward is one batched matmul over every patch of the batch.
Its inputs are patch tokens ``(B, N, D)`` (grid from ``head_options['grid']``, else a square N) or a feature map
``(B, D, h, w)``. The BatchNorm's statistics are over every patch of the data-parallel group's batch, as a SyncBN's.

Its loss is given as per-head sums over valid pixels and their count (`summed_loss`): the bank divides the
all-reduced sums by the all-reduced count, so N ranks equal one process even when one rank's samples are mostly
ignored pixels. `distprobe.bank.dense_loss` bounds its memory (chunks of heads x samples, or a chosen resolution);
``samples_per_step`` trains on a fixed-size share of each batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn

from distprobe.arguments import require_count
from distprobe.bank import dense_loss
from distprobe.bank.config import BankConfig
from distprobe.bank.families.base import head_option_fields
from distprobe.bank.families.linear import LinearHeads
from distprobe.engine import bad_data
from distprobe.engine.checks import label_range_problem
from distprobe.engine.precision import MatmulPrecision


def _pair(value: Any, option: str, bank_name: str) -> tuple[int, int] | None:
    if value is None:
        return None
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pair):
        raise ValueError(
            f"bank '{bank_name}': head_options['{option}'] got {value!r}; expected (height, width) ints >= 1, "
            "one int, or None."
        )
    return (int(pair[0]), int(pair[1]))


#: The ``head_options`` of DINOv3's protocol, which the probing service applies under the user's: every sample of a
#: batch, the loss at the masks' own resolution (the memory stays bounded by ``loss_chunk_elements``).
FULL_RESOLUTION: Mapping[str, Any] = MappingProxyType({"samples_per_step": None, "loss_grid_scale": None})


@dataclass(kw_only=True, frozen=True)
class DenseOptions:
    """How every head of a dense bank reads its inputs and computes its loss (``head_options``)."""

    grid: tuple[int, int] | None = None
    """The patch grid ``(h, w)`` of ``(B, N, D)`` tokens; None: a square N. Feature maps carry their own."""
    ignore_index: int = 255
    """The target label of pixels without a class: never in the loss, never in the metrics."""
    loss_chunk_heads: int | None = 4
    """Most heads whose full-resolution logits exist at once in the loss and in validation (None: all); the values
    are the same whatever the chunk, only the memory differs."""
    loss_chunk_elements: int | None = dense_loss.CHUNK_ELEMENTS
    """Most upsampled logits (heads x samples x C x H x W) the loss, and validation, hold at once (2**27: 512 MiB of
    float32), by chunking the heads and the samples; at least one head x one sample. None: chunks of heads only. The
    values are the same whatever the chunk."""
    loss_resolution: tuple[int, int] | None = None
    """Train at this ``(H, W)`` (targets resized by nearest neighbour); None: see ``loss_grid_scale``. Validation
    always scores at the target's resolution."""
    loss_grid_scale: int | None = 4
    """Without ``loss_resolution``: train at this many times the patch grid (never above the target's size; 4: 56 x 56
    for a 14 x 14 grid); None: at the target's own resolution (DINOv3's protocol, the service's default)."""
    samples_per_step: int | None = 8
    """Train on the first this-many samples of each rank's batch (None: all, the service's default); validation sees
    every sample. With ``loss_grid_scale`` it bounds the online cost (docs/dense.md, "Cost control"): 8 is the share
    measured within issue 26's +3% step overhead beside a ViT-B/16 b128 step on an H100 (16 was +4.4%)."""

    @classmethod
    def parse(cls, options: Any, bank_name: str) -> DenseOptions:
        """From ``head_options`` (None, a dict or an instance); unknown keys and bad values are refused."""
        if isinstance(options, DenseOptions):
            return options
        given = head_option_fields(cls, options, bank_name, "dense")
        for key in ("grid", "loss_resolution"):
            given[key] = _pair(given.get(key), key, bank_name)
        for key in ("loss_chunk_heads", "loss_chunk_elements", "loss_grid_scale", "samples_per_step"):
            if given.get(key) is not None:
                require_count(f"bank '{bank_name}'", key, given[key], option_of="head_options", or_none=True)
        ignore = given.get("ignore_index", 255)
        if not isinstance(ignore, int) or isinstance(ignore, bool):
            raise ValueError(f"bank '{bank_name}': head_options['ignore_index'] got {ignore!r}; expected an int.")
        return cls(**given)

    def loss_cost(
        self, num_heads: int, batch: int, num_classes: int, grid: tuple[int, int], mask_size: tuple[int, int]
    ) -> dense_loss.LossCost:
        """A training step's loss memory and time under these options (`distprobe.bank.dense_loss.loss_cost`)."""
        return dense_loss.loss_cost(
            num_heads,
            batch,
            num_classes,
            grid,
            mask_size,
            samples_per_step=self.samples_per_step,
            resolution=self.loss_resolution,
            grid_scale=self.loss_grid_scale,
            max_heads=self.loss_chunk_heads,
            max_elements=self.loss_chunk_elements,
        )


def patch_rows(x: torch.Tensor, grid: tuple[int, int] | None) -> tuple[torch.Tensor, tuple[int, int]]:
    """``(B * h * w, D)`` rows of ``(B, N, D)`` tokens or a ``(B, D, h, w)`` map, row-major over the grid."""
    if x.ndim == 4:
        b, d, h, w = x.shape
        return x.permute(0, 2, 3, 1).reshape(b * h * w, d), (h, w)
    b, n, d = x.shape
    if grid is None:
        side = math.isqrt(n)
        grid = (side, side)
    return x.reshape(b * n, d), grid


def _grid_of(x: torch.Tensor, grid: tuple[int, int] | None) -> tuple[int, int]:
    """The patch grid `patch_rows` reads ``(B, N, D)`` tokens or a ``(B, D, h, w)`` map on."""
    if x.ndim == 4:
        return (int(x.shape[2]), int(x.shape[3]))
    if grid is not None:
        return grid
    side = math.isqrt(int(x.shape[1]))
    return (side, side)


class DenseHead(nn.Module):
    """One dense head as a plain module: ``(B, N, D)`` tokens or a ``(B, D, h, w)`` map to ``(B, C, h, w)`` logits.

    Upsample its output to the target's size (`distprobe.bank.dense_loss.upsample`) to score pixels.
    """

    def __init__(self, linear: nn.Linear, norm: nn.BatchNorm1d | None, grid: tuple[int, int] | None) -> None:
        super().__init__()
        self.norm = norm
        self.linear = linear
        self.grid = grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits on the patch grid."""
        rows, (h, w) = patch_rows(x, self.grid)
        if self.norm is not None:
            rows = self.norm(rows)
        # The classes named, not -1: an empty batch has no element to infer them from.
        return self.linear(rows).view(x.shape[0], h, w, self.linear.out_features).permute(0, 3, 1, 2)


class DenseHeads(LinearHeads):
    """K dense heads over one or more patch-token sources (the stacked weights are those of linear heads)."""

    metric_kind: ClassVar[str] = "segmentation"
    reads_tokens: ClassVar[bool] = True
    """Its inputs keep their token shape (a feature cache gives flattened rows their shape back)."""
    # The linear heads' TF32 default was measured on classification only; dense heads follow the process until
    # their mIoU is (docs/banks.md, "Precision of the heads' matmuls").
    default_matmul_precision: ClassVar[MatmulPrecision | None] = None

    def initial_flat(self, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        """Linear heads' weights, once ``head_options`` are checked."""
        self.options = self.check_options(self.config)
        return super().initial_flat(generator, device)

    @staticmethod
    def check_options(config: BankConfig) -> DenseOptions:
        """The parsed ``head_options``; refuses what a dense head cannot take."""
        if config.multilabel:
            raise ValueError(
                f"bank '{config.name}': argument 'multilabel' got True with head 'dense'; dense targets are "
                "(B, H, W) class-index masks: use multilabel=False."
            )
        return DenseOptions.parse(config.head_options, config.name)

    @staticmethod
    def parse_metrics(spec: Any, bank_name: str) -> dict[str, int]:
        """The metrics a dense bank reports (`distprobe.bank.segmentation`)."""
        from distprobe.bank.segmentation import parse_segmentation_metrics

        return parse_segmentation_metrics(spec, bank_name)

    @staticmethod
    def feature_size(sample_shape: torch.Size) -> int:
        """D of one sample's ``(N, D)`` tokens or ``(D, h, w)`` map."""
        return int(sample_shape[0] if len(sample_shape) == 3 else sample_shape[-1])

    def input_signature(self, sample_shape: torch.Size) -> tuple[int, ...]:  # type: ignore[override]
        """As a linear head's, and for tokens whether they lie on the grid the heads read.

        A later batch of tokens on no such grid (a count that is not square, or not ``head_options['grid']``'s) is
        then a batch of other shapes than the first, skipped and counted (`distprobe.engine.shapes`), not an error
        of one rank (`_check_grids`).
        """
        signature = (len(sample_shape), self.feature_size(sample_shape))
        if len(sample_shape) != 2:
            return signature
        tokens, grid = int(sample_shape[0]), self.options.grid
        return (*signature, int(grid[0] * grid[1] == tokens if grid else math.isqrt(tokens) ** 2 == tokens))

    @staticmethod
    def input_problem(source: str, features: torch.Tensor) -> str | None:
        """Why ``features`` are neither ``(B, N, D)`` patch tokens nor a ``(B, D, h, w)`` map, or None."""
        if features.ndim not in (3, 4):
            return (
                f"input {source!r} must be (batch, patches, dim) tokens or a (batch, dim, h, w) map for a dense "
                f"head; got shape {tuple(features.shape)}. Tap a block's patch tokens (e.g. "
                "'backbone.blocks.11:patch')."
            )
        return None

    @staticmethod
    def target_problem(owner: str, inputs: Mapping[str, Any], targets: Any, config: BankConfig) -> str | None:
        """What is wrong with a first batch's masks, or None (one host sync, on this batch only)."""
        options = DenseOptions.parse(config.head_options, config.name)
        if not isinstance(targets, torch.Tensor) or targets.ndim != 3 or targets.is_floating_point():
            shape = tuple(getattr(targets, "shape", ()))
            return (
                f"{owner}: a dense head's target must be (batch, H, W) integer class-index masks; got "
                f"{type(targets).__name__} {shape}."
            )
        grids: dict[str, tuple[int, int]] = {}
        for key, x in inputs.items():
            if not isinstance(x, torch.Tensor) or x.shape[0] != targets.shape[0]:
                return (
                    f"{owner}: input {key!r} must have the target's batch size {targets.shape[0]}; got "
                    f"{tuple(getattr(x, 'shape', ()))}."
                )
            if x.ndim == 3 and options.grid is None and math.isqrt(x.shape[1]) ** 2 != x.shape[1]:
                return (
                    f"{owner}: input {key!r} holds {x.shape[1]} tokens, not a square grid; set "
                    "head_options['grid'] = (h, w), or drop prefix tokens with a ':patch' tap."
                )
            if x.ndim == 3 and options.grid is not None and options.grid[0] * options.grid[1] != x.shape[1]:
                return (
                    f"{owner}: head_options['grid']={options.grid} does not hold the {x.shape[1]} tokens of input "
                    f"{key!r}; give the patch grid of the tokens."
                )
            grids[key] = _grid_of(x, options.grid)
        if len(set(grids.values())) > 1:
            # The heads of every source are scored on one grid: unchecked, grids of different sizes fail inside
            # the forward's cat with torch's message, and grids of the same size but another shape (2 x 8 tokens
            # beside a 4 x 4 map) would be read as the last source's grid, silently.
            return (
                f"{owner}: its inputs lie on different patch grids {grids}; a dense bank's sources must share one "
                "(h, w) grid (head_options['grid'] sets the tokens' grid): resize the feature maps to one grid, or "
                "use one bank per grid."
            )
        labels = targets[targets != options.ignore_index]
        return label_range_problem(
            owner,
            labels,
            config.num_classes,
            f"num_classes={config.num_classes} (ignore_index={options.ignore_index})",
            "set num_classes, or head_options['ignore_index'] to the label of unlabeled pixels",
        )

    @property
    def samples_per_step(self) -> int | None:
        """The share of each training batch the bank trains on (None: all)."""
        return self.options.samples_per_step

    def check_targets(
        self, targets: torch.Tensor, preds: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Masks' labels in ``[0, C)`` or ``ignore_index`` (`distprobe.engine.bad_data.check_targets`).

        A sample counts in metrics unless a label of its mask is out of range (ignored pixels are not counted, by
        the metric itself, but leave the sample's other pixels countable).
        """
        # preds is (B, C, h, w): the check reads the classes from the last dimension.
        safe, _, in_range, finite = bad_data.check_targets(targets, preds.movedim(1, -1), self.options.ignore_index)
        countable = (safe == targets).flatten(1).all(dim=1)
        # int64 for the loss: cross_entropy takes no int32 or int16 labels, which masks often are (numpy, PIL, the
        # service's cache); the first-batch check accepts every integer type, so this cast must not be left to it.
        return safe.long(), countable, in_range, finite

    def forward(self, features: list[torch.Tensor], group: dist.ProcessGroup | None = None) -> torch.Tensor:
        """``(K, B, C, h, w)`` logits of every head on the patch grid, one input per source (same grid for all)."""
        self._check_grids(features)
        parts = self.flat_parts([b.numel for b in self.blocks])
        outputs = []
        grid: tuple[int, int] | None = None
        for block, x, part in zip(self.blocks, features, parts, strict=True):
            rows, grid = patch_rows(x, self.options.grid)
            ones = torch.ones(rows.shape[0], 1, dtype=rows.dtype, device=rows.device)
            variants = [
                torch.cat([self.normalized(rows, block, group) if bn else rows, ones], dim=1) for bn in block.batchnorm
            ]
            n, per, c, d = len(variants), block.per_norm, block.num_classes, block.in_features + 1
            stacked = torch.stack(variants) if n > 1 else variants[0][None]
            logits = torch.bmm(part.view(n, per * c, d), stacked.transpose(1, 2))  # (n, per*C, B*h*w)
            outputs.append(logits.view(n * per, c, x.shape[0], grid[0] * grid[1]))  # no -1: B may be 0
        assert grid is not None, "a bank has at least one source"
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)
        k, c, b = out.shape[:3]
        return out.transpose(1, 2).reshape(k, b, c, *grid)

    def _check_grids(self, features: list[torch.Tensor]) -> None:
        """Refuse, naming the fix, inputs a later batch gives on no grid the heads can read (shapes only, no sync).

        The first batch is checked with its masks (`target_problem`); a later one of another shape (a validation
        image of another aspect ratio, as tokens) would otherwise fail inside a reshape with torch's message.
        """
        grids = {}
        for source, x in zip(self.config.inputs, features, strict=True):
            problem = self.input_problem(source, x)
            if problem is None and x.ndim == 3:
                h, w = _grid_of(x, self.options.grid)
                if h * w != x.shape[1]:
                    whose = "head_options['grid']" if self.options.grid else "a square token count"
                    problem = (
                        f"input {source!r} holds {x.shape[1]} tokens on this batch, not the {h} x {w} grid of "
                        f"{whose}; for images of varying sizes give (batch, dim, h, w) feature maps (tokens carry no "
                        "grid), else set head_options['grid'] to the tokens' (h, w)"
                    )
            if problem is not None:
                raise ValueError(f"bank '{self.config.name}': {problem}")
            grids[source] = _grid_of(x, self.options.grid)
        if len(set(grids.values())) > 1:
            raise ValueError(
                f"bank '{self.config.name}': its inputs lie on different patch grids {grids} on this batch; a dense "
                "bank's sources must share one (h, w) grid."
            )

    def summed_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(K,)`` each head's cross-entropy summed over this batch's valid pixels, and their count (0-d)."""
        o = self.options
        grid, mask = (outputs.shape[-2], outputs.shape[-1]), (targets.shape[-2], targets.shape[-1])
        size = dense_loss.loss_size(grid, mask, o.loss_resolution, o.loss_grid_scale)
        targets = dense_loss.resize_targets(targets, size)
        ignore = o.ignore_index
        sums = dense_loss.chunked_pixel_sums(outputs, targets, ignore, o.loss_chunk_heads, o.loss_chunk_elements)
        return sums, dense_loss.valid_pixels(targets, ignore)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``(K,)`` each head's mean cross-entropy over this batch's valid pixels (0 without any).

        A batch without a valid pixel (every label ``ignore_index``) sums to 0 over a count of 0: its loss is that sum,
        not 0 / 0, and the bank weighs such a step as nothing in the epoch's loss (no host sync decides it).
        """
        sums, count = self.summed_loss(outputs, targets)
        return sums / count.clamp(min=1)

    def export(self, index: int) -> nn.Module:
        """That head as a `DenseHead` (BatchNorm in eval mode, if any), giving ``(B, C, h, w)`` logits."""
        linear, norm = self.export_parts(index)
        return DenseHead(linear, norm, self.options.grid).eval()
