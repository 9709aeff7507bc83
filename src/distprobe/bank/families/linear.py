"""Linear heads, the first head family: K ``nn.Linear`` heads (each optionally behind a BatchNorm) as one module.

All weights and biases live in a single flat parameter, so that their gradient is a single tensor: one collective per
optimizer step, whatever K. A source's heads are one ``(K_s, C, D_s + 1)`` block of it, the bias as the last column:
the features get a column of ones, so the forward is one batched matmul, and autograd writes the block's gradient
once, in place in the flat layout (slicing weights and biases apart would make it build and sum zero-filled copies
of the whole parameter). Elementwise optimizer maths then runs on each block as one tensor.
The BatchNorm normalization (no affine: MAE's protocol) has no parameter and the features are detached, so it runs
without autograd, once per source, for all the heads behind it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist
from torch import nn

from distprobe.bank.config import BankConfig
from distprobe.bank.families.base import HeadFamily, ParamView
from distprobe.engine.collectives import rank_and_world
from distprobe.engine.functional import group_moments, update_running_stats
from distprobe.engine.precision import MatmulPrecision


@dataclass(frozen=True)
class Block:
    """The heads of one source: ``count`` heads from ``first``, in ``norms`` blocks of ``per_norm`` heads each."""

    source: str
    first: int
    count: int
    in_features: int
    num_classes: int
    offset: int
    batchnorm: tuple[bool, ...]
    """Per normalization block, in order: whether its heads see BatchNorm'd features."""

    @property
    def per_norm(self) -> int:
        """Heads per normalization block (the lr x weight-decay grid)."""
        return self.count // len(self.batchnorm)

    @property
    def numel(self) -> int:
        """Elements of the block's weights and biases in the flat parameter."""
        return self.count * self.num_classes * (self.in_features + 1)


def layout(config: BankConfig, in_features: dict[str, int]) -> list[Block]:
    """Where each source's heads sit in the flat parameter."""
    blocks, offset, first = [], 0, 0
    count = len(config.normalization) * config.heads_per_block
    for source in config.inputs:
        d, c = in_features[source], config.num_classes
        batchnorm = tuple(n == "batchnorm" for n in config.normalization)
        blocks.append(Block(source, first, count, d, c, offset, batchnorm))
        offset += count * c * (d + 1)
        first += count
    return blocks


def block_view(flat: torch.Tensor, block: Block) -> torch.Tensor:
    """``(K_s, C, D_s + 1)``: the block's weights and (last column) biases inside a flat tensor like the parameter."""
    return flat[block.offset : block.offset + block.numel].view(block.count, block.num_classes, block.in_features + 1)


def weight_view(flat: torch.Tensor, block: Block) -> torch.Tensor:
    """``(K_s, C, D_s)``: the block's weights (a strided view)."""
    return block_view(flat, block)[..., : block.in_features]


def bias_view(flat: torch.Tensor, block: Block) -> torch.Tensor:
    """``(K_s, C)``: the block's biases (a strided view)."""
    return block_view(flat, block)[..., block.in_features]


class LinearHeads(HeadFamily):
    """K linear heads over one or more feature sources (what ``pl_module.callbacks_modules[name]`` holds)."""

    # TF32 logits and weight gradient by default: on an H100, 64 heads trained from the same seeds in TF32 and in
    # IEEE float32 reached the same best-head top-1 (the demo's features: identical at 3 seeds; a 1000-class, 768-d
    # synthetic set: a mean difference of 0.0 against a seed spread of 8e-4), for 0.7 point less step overhead
    # (docs/benchmarks.md, Session L).
    default_matmul_precision: ClassVar[MatmulPrecision | None] = "high"

    def initial_flat(self, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        """Each block initialised as ``nn.Linear`` (on the CPU, from the CPU generator); BatchNorm statistics."""
        self.blocks = layout(self.config, self.in_features)
        flat = torch.empty(sum(b.numel for b in self.blocks), dtype=torch.float32)
        for block in self.blocks:
            # nn.Linear's initialisation, head by head: U(-1/sqrt(D), 1/sqrt(D)) for weights and biases.
            bound = block.in_features**-0.5
            weight_view(flat, block).uniform_(-bound, bound, generator=generator)
            bias_view(flat, block).uniform_(-bound, bound, generator=generator)
        # BatchNorm running statistics per source, as plain tensors rather than module buffers: a strategy's
        # buffer casts (FSDP's buffer_dtype, a *-true precision) walk the LightningModule's buffers, and these must
        # stay float32 and the bank's own.
        self.running: dict[int, tuple[torch.Tensor, torch.Tensor]] = {
            block.first: (
                torch.zeros(block.in_features, dtype=torch.float32, device=device),
                torch.ones(block.in_features, dtype=torch.float32, device=device),
            )
            for block in self.blocks
            if any(block.batchnorm)
        }
        self.batchnorm_masks: dict[int, torch.Tensor] = {}
        """Per source block (by its first head), which heads sit behind a BatchNorm: made at first use."""
        return flat

    def views(self, flat: torch.Tensor) -> list[ParamView]:
        """Per source: the block as one ``(K_s, C, D_s + 1)`` tensor, and its weights and biases apart."""
        return [
            ParamView(
                heads=slice(b.first, b.first + b.count),
                whole=block_view(flat, b),
                parts=(weight_view(flat, b), bias_view(flat, b)),
                bias_like=(False, True),
            )
            for b in self.blocks
        ]

    def statistics(self) -> list[torch.Tensor]:
        """Every running statistic, in a fixed order (what a skipped window restores, what checkpoints keep)."""
        return [t for first in sorted(self.running) for t in self.running[first]]

    def statistics_readers(self) -> list[torch.Tensor]:
        """Per statistic, its source's BatchNorm heads (the heads without one never read it)."""
        masks = []
        for first in sorted(self.running):
            block = next(b for b in self.blocks if b.first == first)
            masks += [self._batchnorm_heads(block)] * 2  # the mean and the variance
        return masks

    def untrainable_heads(self, batch_size: int, group: dist.ProcessGroup | None) -> torch.Tensor | None:
        """The BatchNorm heads, given one sample on one process: a separate BatchNorm probe skips such a batch.

        On two or more ranks the statistics are the group's (`normalized`), so one sample on a rank trains.
        """
        if batch_size != 1 or not self.running or rank_and_world(group)[1] > 1:
            return None
        masks = [self._batchnorm_heads(b) for b in self.blocks if any(b.batchnorm)]
        return torch.stack(masks).any(dim=0)

    def _batchnorm_heads(self, block: Block) -> torch.Tensor:
        """``(K,)`` bool on the bank's device: the heads of ``block`` behind a BatchNorm (made once, then kept)."""
        cache = self.batchnorm_masks
        if block.first not in cache:
            mask = torch.zeros(self.num_heads, dtype=torch.bool)
            for j, batchnorm in enumerate(block.batchnorm):
                if batchnorm:  # heads run normalization-major within a block
                    start = block.first + j * block.per_norm
                    mask[start : start + block.per_norm] = True
            cache[block.first] = mask.to(self.flat.device)
        return cache[block.first]

    def normalized(self, x: torch.Tensor, block: Block, group: dist.ProcessGroup | None) -> torch.Tensor:
        """``nn.BatchNorm1d(affine=False)`` of ``x``: batch statistics (of the whole group) in training, else running.

        The statistics are the group's, as `distprobe.engine.batchnorm` makes a probe's, so that N ranks normalise
        like one process: one small all-reduce (2D + 1 numbers) per forward of a BatchNorm source.
        """
        mean_buf, var_buf = self.running[block.first]
        eps = self.config.batchnorm_eps
        with torch.no_grad():
            if not self.training or (x.shape[0] == 1 and rank_and_world(group)[1] == 1):
                # One sample of one process: the running statistics normalise it and stay as they are; the bank
                # skips these heads' window (`untrainable_heads`), as torch's BatchNorm refuses such a batch.
                return (x - mean_buf) / torch.sqrt(var_buf + eps)
            mean, var, n = group_moments(x, group)
            update_running_stats(mean_buf, var_buf, mean, var, n, self.config.batchnorm_momentum)
            return (x - mean) / torch.sqrt(var + eps)

    def forward(self, features: list[torch.Tensor], group: dist.ProcessGroup | None = None) -> torch.Tensor:
        """``(K, B, C)`` logits of every head, from one ``(B, D_s)`` tensor per source (in the config's order).

        They are a transposed view of a ``(B, K, C)`` buffer: the layout that the loss's rows, the metrics and
        ``batch["{name}_preds"]`` read, so no step copies the logits to another layout (three copies of 33 MB, a
        tenth of the step's device time, for 64 heads of 1000 classes at batch 128).
        """
        parts = self.flat_parts([b.numel for b in self.blocks])
        outputs = []
        for block, x, part in zip(self.blocks, features, parts, strict=True):
            x = x.flatten(1)
            ones = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
            variants = [
                torch.cat([self.normalized(x, block, group) if bn else x, ones], dim=1) for bn in block.batchnorm
            ]
            n, h, c, d = len(variants), block.per_norm, block.num_classes, block.in_features + 1
            stacked = torch.stack(variants) if n > 1 else variants[0][None]
            # (n, B, D+1) @ (n, D+1, h*C): one batched matmul for the block's K_s = n*h heads, biases included.
            logits = _InputsTimesHeads.apply(stacked, part.view(n, h * c, d))  # (n, B, h*C)
            b = x.shape[0]
            outputs.append(logits.view(b, h, c) if n == 1 else logits.view(n, b, h, c).transpose(0, 1).flatten(1, 2))
        return (outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)).transpose(0, 1)

    def export(self, index: int) -> nn.Module:
        """That head as an ``nn.Linear`` with its current weights (behind its BatchNorm in eval mode, if any)."""
        linear, norm = self.export_parts(index)
        return linear if norm is None else nn.Sequential(norm, linear).eval()

    def export_parts(self, index: int) -> tuple[nn.Linear, nn.BatchNorm1d | None]:
        """That head's ``nn.Linear`` with its current weights, and its BatchNorm (running statistics) or None."""
        head = self.head_list[index]
        block = next(b for b in self.blocks if b.first <= index < b.first + b.count)
        at = index - block.first
        device = self.flat.device
        linear = nn.Linear(block.in_features, block.num_classes, device=device)
        with torch.no_grad():
            linear.weight.copy_(weight_view(self.flat, block)[at])
            linear.bias.copy_(bias_view(self.flat, block)[at])
        if head.normalization is None:
            return linear, None
        norm = nn.BatchNorm1d(block.in_features, affine=False, eps=self.config.batchnorm_eps, device=device)
        mean, var = self.running[block.first]
        with torch.no_grad():
            norm.load_state_dict({"running_mean": mean, "running_var": var}, strict=False)
        return linear, norm


class _InputsTimesHeads(torch.autograd.Function):
    """``(n, B, D)`` inputs times ``(n, M, D)`` stacked weights, transposed: ``(n, B, M)``; no copy either way.

    Autograd's own ``bmm(x, w.transpose(1, 2))`` would return the weights' gradient transposed, and the ``view`` it
    passes through on the way to the flat parameter would copy it (196 MB for 64 heads of 1000 x 768). Here the
    backward computes it as ``bmm(grad.transpose(1, 2), x)``, in the weights' own layout: cuBLAS reads the transposed
    operand in place. The maths is autograd's.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, inputs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inputs, weights)
        return torch.bmm(inputs, weights.transpose(1, 2))

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        inputs, weights = ctx.saved_tensors  # type: ignore[attr-defined]
        grad_inputs = torch.bmm(grad, weights) if ctx.needs_input_grad[0] else None  # type: ignore[attr-defined]
        grad_weights = torch.bmm(grad.transpose(1, 2), inputs) if ctx.needs_input_grad[1] else None  # type: ignore[attr-defined]
        return grad_inputs, grad_weights
