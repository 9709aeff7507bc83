"""The bank's K linear heads as one module: one flat parameter, one batched matmul per feature source.

All weights and biases live in a single flat parameter, so that their gradient is a single tensor: one collective per
optimizer step, whatever K. A source's heads are a ``(K_s, C, D_s)`` weight view and a ``(K_s, C)`` bias view of it.
The BatchNorm normalization (no affine: MAE's protocol) has no parameter and the features are detached, so it runs
without autograd, once per source, for all the heads behind it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from distprobe.bank.config import BankConfig, Head
from distprobe.engine.replicate import is_distributed


@dataclass(frozen=True)
class Block:
    """The heads of one source: ``count`` heads from ``first``, in ``norms`` blocks of ``per_norm`` heads each."""

    source: str
    first: int
    count: int
    in_features: int
    num_classes: int
    weight_offset: int
    bias_offset: int
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
        blocks.append(
            Block(
                source=source,
                first=first,
                count=count,
                in_features=d,
                num_classes=c,
                weight_offset=offset,
                bias_offset=offset + count * c * d,
                batchnorm=tuple(n == "batchnorm" for n in config.normalization),
            )
        )
        offset += count * c * (d + 1)
        first += count
    return blocks


def weight_view(flat: torch.Tensor, block: Block) -> torch.Tensor:
    """``(K_s, C, D_s)``: the block's weights inside a flat tensor laid out like the parameter."""
    size = block.count * block.num_classes * block.in_features
    return flat[block.weight_offset : block.weight_offset + size].view(
        block.count, block.num_classes, block.in_features
    )


def bias_view(flat: torch.Tensor, block: Block) -> torch.Tensor:
    """``(K_s, C)``: the block's biases inside a flat tensor laid out like the parameter."""
    size = block.count * block.num_classes
    return flat[block.bias_offset : block.bias_offset + size].view(block.count, block.num_classes)


class BankHeads(nn.Module):
    """K linear heads over one or more feature sources (what ``pl_module.callbacks_modules[name]`` holds)."""

    def __init__(
        self,
        config: BankConfig,
        in_features: dict[str, int],
        *,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.blocks = layout(config, in_features)
        self.head_list: list[Head] = config.heads()
        total = sum(b.numel for b in self.blocks)
        # float32 whatever the default dtype: Lightning's *-true precisions set it while callbacks set up, and heads
        # train in their own precision (features are cast to it). Initialised on the CPU, from the CPU generator.
        flat = torch.empty(total, dtype=torch.float32)
        for block in self.blocks:
            # nn.Linear's initialisation, head by head: U(-1/sqrt(D), 1/sqrt(D)) for weights and biases.
            bound = block.in_features**-0.5
            weight_view(flat, block).uniform_(-bound, bound, generator=generator)
            bias_view(flat, block).uniform_(-bound, bound, generator=generator)
        self.flat = nn.Parameter(flat.to(device or "cpu"))
        # BatchNorm running statistics per source, as plain tensors rather than module buffers: a strategy's
        # buffer casts (FSDP's buffer_dtype, a *-true precision) walk the LightningModule's buffers, and these must
        # stay float32 and the bank's own.
        self.running: dict[int, tuple[torch.Tensor, torch.Tensor]] = {
            block.first: (
                torch.zeros(block.in_features, dtype=torch.float32, device=self.flat.device),
                torch.ones(block.in_features, dtype=torch.float32, device=self.flat.device),
            )
            for block in self.blocks
            if any(block.batchnorm)
        }

    @property
    def num_heads(self) -> int:
        """K, over every source."""
        return len(self.head_list)

    def running_stats(self, block: Block) -> tuple[torch.Tensor, torch.Tensor]:
        """The running mean and variance of a BatchNorm source."""
        return self.running[block.first]

    def statistics(self) -> list[torch.Tensor]:
        """Every running statistic, in a fixed order (what a skipped window restores, what checkpoints keep)."""
        return [t for first in sorted(self.running) for t in self.running[first]]

    def normalized(self, x: torch.Tensor, block: Block, group: dist.ProcessGroup | None) -> torch.Tensor:
        """``nn.BatchNorm1d(affine=False)`` of ``x``: batch statistics (of the whole group) in training, else running.

        The statistics are the group's, as `distprobe.engine.batchnorm` makes a probe's, so that N ranks normalise
        like one process: one small all-reduce (2D + 1 numbers) per forward of a BatchNorm source.
        """
        mean_buf, var_buf = self.running_stats(block)
        eps = self.config.batchnorm_eps
        with torch.no_grad():
            if not self.training:
                return (x - mean_buf) / torch.sqrt(var_buf + eps)
            count = torch.full((1,), x.shape[0], dtype=x.dtype, device=x.device)
            moments = torch.cat([x.sum(dim=0), (x * x).sum(dim=0), count])
            if is_distributed(group):
                dist.all_reduce(moments, group=group)
            d = x.shape[1]
            n = moments[-1]
            mean = moments[:d] / n
            var = (moments[d : 2 * d] / n - mean * mean).clamp_min(0)
            momentum = self.config.batchnorm_momentum
            mean_buf.lerp_(mean, momentum)
            var_buf.lerp_(var * n / (n - 1).clamp_min(1), momentum)
            return (x - mean) / torch.sqrt(var + eps)

    def forward(self, features: list[torch.Tensor], group: dist.ProcessGroup | None = None) -> torch.Tensor:
        """``(K, B, C)`` logits of every head, from one ``(B, D_s)`` tensor per source (in the config's order)."""
        outputs = []
        for block, x in zip(self.blocks, features, strict=True):
            variants = [self.normalized(x, block, group) if bn else x for bn in block.batchnorm]
            weight = weight_view(self.flat, block)
            bias = bias_view(self.flat, block)
            n, h, c = len(variants), block.per_norm, block.num_classes
            stacked = torch.stack(variants) if n > 1 else variants[0][None]
            # (n, B, D) @ (n, D, h*C) + (n, 1, h*C): one batched matmul for the block's K_s = n*h heads.
            w = weight.view(n, h * c, block.in_features).transpose(1, 2)
            logits = torch.baddbmm(bias.view(n, 1, h * c), stacked, w)
            outputs.append(logits.view(n, x.shape[0], h, c).transpose(1, 2).reshape(n * h, x.shape[0], c))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)
