"""Attentive heads: K V-JEPA-style attentive probes over frozen tokens ``(B, N, D)``, trained as one family.

One head (`AttentiveProbe`, a plain module) is the attentive probe of V-JEPA and V-JEPA 2: ``num_queries`` learnable
query tokens cross-attend over the tokens in a multi-head cross-attention block (the tokens LayerNorm'd, the
attention's output added to the queries, then a LayerNorm'd MLP added again), after ``depth - 1`` self-attention
blocks over the tokens; a linear classifier reads the queries, averaged when there are several.

`AttentiveHeads` stacks K such heads in one flat parameter, head-major: head k's tensors are one contiguous row of
a ``(K, P)`` block, so a head's gradient norm, skip mask and optimizer maths see it as one tensor (`views`). The
forward splits that block once per step (one copy in the backward, not one zero-filled copy per tensor) and runs
every head with batched matmuls over the head dimension. The first LayerNorm of the shared tokens is computed once
for all heads, its per-head affine folded into the following projection's weights. At ``depth`` 1 every head attends
over those same tokens, on the query side (`AttentiveHeads._attend_shared_tokens`: no per-head keys and values);
deeper heads attend with one ``scaled_dot_product_attention`` over ``K x B`` sequences.

``compute_dtype="bfloat16"`` runs a head's matmuls and attention under ``torch.autocast(dtype=torch.bfloat16)`` (in
16 bits, as V-JEPA's evaluation runs its probes; it uses float16 with loss scaling), on float32 parameters: the
optimizer's maths, its state and the gradient's all-reduce stay float32, and the logits come out float32 for the loss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, cast, get_args

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from distprobe.arguments import require_choice, require_count
from distprobe.bank.config import BankConfig
from distprobe.bank.families.base import HeadFamily, ParamView, head_option_fields

ComputeDtype = Literal["float32", "bfloat16"]
"""The precision of a head's matmuls and attention (its parameters are float32 either way)."""


@dataclass(kw_only=True, frozen=True)
class AttentiveOptions:
    """The architecture of every head of an attentive bank (``head_options``)."""

    num_queries: int = 1
    """Learnable query tokens; their pooled outputs are averaged before the classifier."""
    depth: int = 1
    """Blocks in all: ``depth - 1`` self-attention blocks over the tokens, then the cross-attention block (V-JEPA's
    meaning: 1 is the cross-attention block alone)."""
    num_heads: int | None = None
    """Attention heads; None: ``D // 64`` (at least 1). Must divide D."""
    mlp_ratio: float = 4.0
    """The MLP's hidden size over D."""
    qkv_bias: bool = True
    """Biases on the query, key and value projections."""
    init_std: float = 0.02
    """Standard deviation of the truncated-normal initialisation of weights and query tokens."""
    compute_dtype: ComputeDtype = "float32"
    """``"float32"``: exact, no autocast of the head's own. ``"bfloat16"``: the matmuls and attention under
    ``torch.autocast(dtype=torch.bfloat16)`` (16 bits as in V-JEPA's protocol; faster on a GPU, 8 significant bits);
    parameters, optimizer state, the gradient's all-reduce and the returned logits stay float32."""

    @classmethod
    def parse(cls, options: Any, bank_name: str) -> AttentiveOptions:
        """From ``head_options`` (None, a dict or an instance); unknown keys and bad values are refused."""
        if isinstance(options, AttentiveOptions):  # checked too: a dataclass takes any value
            options = dataclasses.asdict(options)
        parsed = cls(**head_option_fields(cls, options, bank_name, "attentive"))
        owner = f"bank '{bank_name}'"
        for key in ("num_queries", "depth"):
            require_count(owner, key, getattr(parsed, key), option_of="head_options")
        if parsed.num_heads is not None:
            require_count(
                owner,
                "num_heads",
                parsed.num_heads,
                option_of="head_options",
                or_none=True,
                hint="dividing the feature size D; None: D // 64",
            )
        for key, fix in (("mlp_ratio", "4.0 is V-JEPA's"), ("init_std", "0.02 is V-JEPA's")):
            value = getattr(parsed, key)
            # NaN and infinity too: the MLP's size and the initialisation read them (int(inf) fails, a NaN
            # standard deviation draws weights silently, 0 divides by zero inside trunc_normal_).
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
                raise ValueError(
                    f"bank '{bank_name}': head_options['{key}'] got {value!r}; expected a finite number > 0 ({fix})."
                )
        if not isinstance(parsed.qkv_bias, bool):  # a YAML "false" in quotes would be a true string
            raise ValueError(
                f"bank '{bank_name}': head_options['qkv_bias'] got {parsed.qkv_bias!r}; expected True or False."
            )
        require_choice(owner, "compute_dtype", parsed.compute_dtype, get_args(ComputeDtype), option_of="head_options")
        return parsed

    def autocast(self, device_type: str) -> contextlib.AbstractContextManager[Any]:
        """Where a head's forward runs: bfloat16 autocast on ``device_type``, or as it is for float32."""
        if self.compute_dtype == "bfloat16":
            return torch.autocast(device_type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def heads_for(self, dim: int, bank_name: str, source: str) -> int:
        """The attention heads for feature size ``dim`` (checked to divide it)."""
        heads = self.num_heads if self.num_heads is not None else max(1, dim // 64)
        if dim % heads:
            raise ValueError(
                f"bank '{bank_name}': head_options['num_heads']={heads} does not divide the feature size {dim} of "
                f"source {source!r}; pick a divisor of {dim}."
            )
        return heads

    def hidden(self, dim: int, bank_name: str = "attentive", source: str = "tokens") -> int:
        """The MLP's hidden size for feature size ``dim`` (checked to be at least 1)."""
        hidden = int(dim * self.mlp_ratio)
        if hidden < 1:
            # An MLP of no unit has weights of no element, which the batched forward cannot lay out.
            raise ValueError(
                f"bank '{bank_name}': head_options['mlp_ratio']={self.mlp_ratio!r} gives an MLP of {hidden} hidden "
                f"units for the feature size {dim} of source {source!r}; expected mlp_ratio >= 1/{dim} (4.0 is "
                "V-JEPA's)."
            )
        return hidden

    def sizes_problem(self, dim: int, bank_name: str, source: str) -> str | None:
        """Why heads of these options cannot read ``dim`` features of ``source`` (`heads_for`, `hidden`), or None."""
        try:
            self.heads_for(dim, bank_name, source)
            self.hidden(dim, bank_name, source)
        except ValueError as err:
            return str(err)
        return None


# --- one head as a plain module ---------------------------------------------------------------------------------


class MLP(nn.Module):
    """``fc2(GELU(fc1(x)))``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.fc2(F.gelu(self.fc1(x)))


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(..., L, D)`` to ``(..., heads, L, D // heads)``."""
    *lead, length, dim = x.shape
    return x.view(*lead, length, heads, dim // heads).transpose(-3, -2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``(..., heads, L, d)`` to ``(..., L, heads * d)``."""
    *lead, heads, length, d = x.shape
    return x.transpose(-3, -2).reshape(*lead, length, heads * d)


class SelfAttentionBlock(nn.Module):
    """A pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, heads: int, hidden: int, qkv_bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        q, k, v = (_split_heads(t, self.heads) for t in self.qkv(self.norm1(x)).chunk(3, dim=-1))
        x = x + self.proj(_merge_heads(F.scaled_dot_product_attention(q, k, v)))
        return x + self.mlp(self.norm2(x))


class CrossAttentionBlock(nn.Module):
    """Queries attend over LayerNorm'd tokens: ``q + attn(q, norm1(x))``, then ``q + mlp(norm2(q))`` (V-JEPA)."""

    def __init__(self, dim: int, heads: int, hidden: int, qkv_bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, hidden)

    def forward(self, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        k, v = (_split_heads(t, self.heads) for t in self.kv(self.norm1(x)).chunk(2, dim=-1))
        attended = F.scaled_dot_product_attention(_split_heads(self.q(q), self.heads), k, v)
        q = q + self.proj(_merge_heads(attended))
        return q + self.mlp(self.norm2(q))


class AttentiveProbe(nn.Module):
    """One attentive probe: ``(B, N, D)`` tokens to ``(B, C)`` logits (what an attentive bank's head exports).

    ``options`` are an attentive bank's ``head_options`` (an `AttentiveOptions` or a dict of its fields), so a
    separately trained probe can match a bank's head, ``compute_dtype`` included.

    Example:
        >>> probe = AttentiveProbe(64, 5, {"compute_dtype": "bfloat16"})
        >>> logits = probe(torch.randn(2, 7, 64))
        >>> tuple(logits.shape), logits.dtype
        ((2, 5), torch.float32)
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        options: AttentiveOptions | dict[str, Any] | None = None,
        *,
        generator: torch.Generator | None = None,
        bank_name: str = "attentive",
        source: str = "tokens",
    ) -> None:
        super().__init__()
        options = AttentiveOptions.parse(options, bank_name)
        self.options = options
        heads = options.heads_for(dim, bank_name, source)
        hidden = options.hidden(dim, bank_name, source)
        self.query_tokens = nn.Parameter(torch.zeros(1, options.num_queries, dim))
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(dim, heads, hidden, options.qkv_bias) for _ in range(options.depth - 1)
        )
        self.cross = CrossAttentionBlock(dim, heads, hidden, options.qkv_bias)
        self.classifier = nn.Linear(dim, num_classes)
        self._initialise(options.init_std, generator)

    @torch.no_grad()
    def _initialise(self, std: float, generator: torch.Generator | None) -> None:
        # V-JEPA's scheme for the pooler: truncated-normal weights and query tokens, zero biases, unit LayerNorms;
        # self-attention block i's output projections scaled down by sqrt(2 (i + 1)), and the cross-attention
        # block's MLP output by the last self-attention block's factor (sqrt(2) without one). Its classifier keeps
        # nn.Linear's own initialisation, U(-1/sqrt(D), 1/sqrt(D)).
        pooler = [*self.blocks, self.cross]
        for module in (m for block in pooler for m in block.modules()):
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=std, generator=generator)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.query_tokens, std=std, generator=generator)
        blocks = cast(list[SelfAttentionBlock], list(self.blocks))
        for layer, block in enumerate(blocks, start=1):
            block.proj.weight.div_(math.sqrt(2.0 * layer))
            block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer))
        self.cross.mlp.fc2.weight.div_(math.sqrt(2.0 * max(1, len(self.blocks))))
        bound = self.classifier.in_features**-0.5
        self.classifier.weight.uniform_(-bound, bound, generator=generator)
        self.classifier.bias.uniform_(-bound, bound, generator=generator)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickle; a whole probe saved (``torch.save(probe)``) before it kept its ``options`` gets them back.

        Such a probe predates ``compute_dtype`` (so it ran in float32), and its modules tell the rest.
        """
        super().__setstate__(state)
        if "options" not in self.__dict__:
            cross = self.cross
            dim = cross.q.in_features
            self.options = AttentiveOptions(
                num_queries=self.query_tokens.shape[1],
                depth=len(self.blocks) + 1,
                num_heads=cross.heads,
                mlp_ratio=cross.mlp.fc1.out_features / dim,
                qkv_bias=cross.q.bias is not None,
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C)`` logits of ``(B, N, D)`` tokens (float32 with ``compute_dtype="bfloat16"`` too)."""
        with self.options.autocast(x.device.type):
            for block in self.blocks:
                x = block(x)
            queries = self.query_tokens.expand(x.shape[0], -1, -1)
            logits = self.classifier(self.cross(queries, x).mean(dim=1))
        return logits if self.options.compute_dtype == "float32" else logits.float()


# --- K heads as one family ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """The heads of one source: ``count`` heads from ``first``, each ``per_head`` elements from ``offset``."""

    source: str
    first: int
    count: int
    dim: int
    offset: int
    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    heads: int
    """Attention heads of this source's probes."""

    @property
    def sizes(self) -> list[int]:
        """Elements of each tensor of one head."""
        return [math.prod(s) for s in self.shapes]

    @property
    def per_head(self) -> int:
        """Elements of one head."""
        return sum(self.sizes)

    @property
    def numel(self) -> int:
        """Elements of the block in the flat parameter."""
        return self.count * self.per_head


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Per head: ``x (K, ..., in) @ weight (K, out, in)^T + bias (K, out)``."""
    k = weight.shape[0]
    flat = x.reshape(k, -1, x.shape[-1])
    out = torch.baddbmm(bias[:, None, :], flat, weight.transpose(1, 2)) if bias is not None else flat @ weight.mT
    return out.view(*x.shape[:-1], weight.shape[1])


def _per_head(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """A ``(K, F)`` per-head vector broadcast against a ``(K, ..., F)`` tensor of ``ndim`` dimensions."""
    return t.view(t.shape[0], *([1] * (ndim - 2)), t.shape[-1])


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Per-head LayerNorm over the last dimension of ``(K, ..., D)``."""
    normed = F.layer_norm(x, x.shape[-1:])
    return torch.addcmul(_per_head(bias, x.ndim), normed, _per_head(weight, x.ndim))


def _fold_layer_norm(p: dict[str, torch.Tensor], norm: str, linear: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Each head's ``linear_k(norm_k(x))`` as one affine map of the plain-normalised ``x``: ``(K, O, D)``, ``(K, O)``.

    Head k's LayerNorm affine ``(g_k, b_k)`` folds into its projection ``(W_k, c_k)`` as ``W_k diag(g_k)`` and
    ``W_k b_k + c_k``, so the normalisation itself, the same for every head, is computed once (`_normalised_once`).
    """
    weight, gain, shift = p[f"{linear}.weight"], p[f"{norm}.weight"], p[f"{norm}.bias"]
    folded_bias = torch.einsum("kod,kd->ko", weight, shift)
    bias = p.get(f"{linear}.bias")
    return weight * gain[:, None, :], folded_bias if bias is None else folded_bias + bias


def _normalised_once(x: torch.Tensor) -> torch.Tensor:
    """``x`` LayerNorm'd without an affine, once for every head, in autocast's dtype when autocast is on.

    Cast here once: autocast would cast it again at each use, and an operand broadcast over the heads as a
    ``(K, ...)`` copy.
    """
    normed = F.layer_norm(x, x.shape[-1:])
    if torch.is_autocast_enabled(x.device.type):
        normed = normed.to(torch.get_autocast_dtype(x.device.type))
    return normed


def _mlp(x: torch.Tensor, p: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    hidden = F.gelu(_linear(x, p[f"{prefix}.fc1.weight"], p[f"{prefix}.fc1.bias"]))
    return _linear(hidden, p[f"{prefix}.fc2.weight"], p[f"{prefix}.fc2.bias"])


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """``(K, B, L, D)`` queries over ``(K, B, N, D)`` keys and values, every head's batch as one attention call."""
    kk, b = q.shape[:2]
    shape = (kk * b, *q.shape[2:])
    out = F.scaled_dot_product_attention(
        _split_heads(q.reshape(shape), heads),
        _split_heads(k.reshape(kk * b, *k.shape[2:]), heads),
        _split_heads(v.reshape(kk * b, *v.shape[2:]), heads),
    )
    return _merge_heads(out).view(*q.shape)


class AttentiveHeads(HeadFamily):
    """K attentive probes over ``(B, N, D)`` token sources, stacked in one flat parameter (see the module docstring).

    Only without normalization (``normalization=[None]``): the probe has its own LayerNorms.
    """

    reads_tokens: ClassVar[bool] = True
    """Its inputs are ``(B, N, D)`` tokens (a feature cache of flattened rows gives them their shape back)."""

    def initial_flat(self, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        """Each head's parameters as a separate `AttentiveProbe` would draw them, one row per head."""
        config = self.config
        self.options = self.check_options(config)
        self.blocks: list[Block] = []
        rows: list[torch.Tensor] = []
        offset = first = 0
        count = len(config.normalization) * config.heads_per_block
        for source in config.inputs:
            dim = self.in_features[source]
            heads = self.options.heads_for(dim, config.name, source)
            for _ in range(count):
                # Each head initialised as a separate AttentiveProbe would be, from the bank's generator.
                probe = AttentiveProbe(
                    dim, config.num_classes, self.options, generator=generator, bank_name=config.name, source=source
                )
                rows.append(torch.cat([p.detach().flatten() for p in probe.parameters()]))
            names = tuple(n for n, _ in probe.named_parameters())
            shapes = tuple(p.shape for p in probe.parameters())
            block = Block(source, first, count, dim, offset, names, shapes, heads)
            self.blocks.append(block)
            offset += block.numel
            first += count
        return torch.cat(rows)

    @staticmethod
    def check_options(config: BankConfig) -> AttentiveOptions:
        """The parsed ``head_options``; refuses options and normalizations an attentive head cannot take."""
        if any(n is not None for n in config.normalization):
            raise ValueError(
                f"bank '{config.name}': argument 'normalization' got {list(config.normalization)} with head "
                "'attentive'; an attentive head normalises its tokens with its own LayerNorms: use [None]."
            )
        return AttentiveOptions.parse(config.head_options, config.name)

    @staticmethod
    def sizes_problem(config: BankConfig, sizes: dict[str, int]) -> str | None:
        """Why heads of ``config`` cannot read features of these sizes per source, or None.

        Asked at the first batch (and by the service on its cached shapes), so that a ``num_heads`` that does not
        divide D, or an ``mlp_ratio`` too small for it, is refused there with the fix, on every rank together.
        """
        options = AttentiveOptions.parse(config.head_options, config.name)
        for source, dim in sizes.items():
            problem = options.sizes_problem(dim, config.name, source)
            if problem is not None:
                return problem
        return None

    @staticmethod
    def feature_size(sample_shape: torch.Size) -> int:
        """D of one sample's ``(N, D)`` tokens."""
        return int(sample_shape[-1])

    @staticmethod
    def input_problem(source: str, features: torch.Tensor) -> str | None:
        """Why ``features`` are not ``(B, N, D)`` tokens, or None."""
        if features.ndim != 3:
            return (
                f"input {source!r} must be (batch, tokens, dim) tokens for an attentive head; got shape "
                f"{tuple(features.shape)}. Tap a block unpooled (e.g. 'backbone.blocks.11:tokens')."
            )
        return None

    def _block_params(self, part: torch.Tensor, block: Block) -> dict[str, torch.Tensor]:
        """Each tensor of the block's heads as ``(K_s, *shape)``: one split of the ``(K_s, P)`` rows."""
        rows = part.view(block.count, block.per_head)
        chunks = torch.split(rows, block.sizes, dim=1)
        return {
            name: chunk.view(block.count, *shape)
            for name, chunk, shape in zip(block.names, chunks, block.shapes, strict=True)
        }

    def views(self, flat: torch.Tensor) -> list[ParamView]:
        """Per source: each head's row of the ``(K_s, P)`` block, and every tensor as a ``(K_s, *shape)`` part."""
        out = []
        for block in self.blocks:
            whole = flat[block.offset : block.offset + block.numel].view(block.count, block.per_head)
            parts, at = [], 0
            for size, shape in zip(block.sizes, block.shapes, strict=True):
                parts.append(whole[:, at : at + size].view(block.count, *shape))
                at += size
            out.append(
                ParamView(
                    heads=slice(block.first, block.first + block.count),
                    whole=whole,
                    parts=tuple(parts),
                    # As the LARS optimizer tells a separate probe's: 1-D tensors are biases and norms' weights.
                    bias_like=tuple(len(s) <= 1 for s in block.shapes),
                )
            )
        return out

    def forward(self, features: list[torch.Tensor], group: dist.ProcessGroup | None = None) -> torch.Tensor:
        """``(K, B, C)`` logits of every head, from one ``(B, N, D_s)`` tensor per source (in the config's order)."""
        parts = self.flat_parts([b.numel for b in self.blocks])
        with self.options.autocast(self.flat.device.type):  # the bank calls this outside the training's autocast
            outputs = [
                self._block_forward(x, self._block_params(part, block), block)
                for block, x, part in zip(self.blocks, features, parts, strict=True)
            ]
        logits = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)
        return logits.float()  # the loss and metrics in float32 (a no-op in float32)

    def _block_forward(self, x: torch.Tensor, p: dict[str, torch.Tensor], block: Block) -> torch.Tensor:
        k, b, heads = block.count, x.shape[0], block.heads
        depth = self.options.depth
        tokens: torch.Tensor | None = None  # (K, B, N, D) once the heads' paths part
        for i in range(depth - 1):
            pre = f"blocks.{i}"
            if tokens is None:
                qkv = self._shared_norm_linear(x, p, f"{pre}.norm1", f"{pre}.qkv")
                tokens = x.expand(k, *x.shape)
            else:
                normed = _layer_norm(tokens, p[f"{pre}.norm1.weight"], p[f"{pre}.norm1.bias"])
                qkv = _linear(normed, p[f"{pre}.qkv.weight"], p.get(f"{pre}.qkv.bias"))
            q, kk, v = qkv.chunk(3, dim=-1)
            tokens = tokens + _linear(_attend(q, kk, v, heads), p[f"{pre}.proj.weight"], p[f"{pre}.proj.bias"])
            normed = _layer_norm(tokens, p[f"{pre}.norm2.weight"], p[f"{pre}.norm2.bias"])
            tokens = tokens + _mlp(normed, p, f"{pre}.mlp")
        # The queries do not depend on the sample: project them once per head, then repeat them over the batch.
        queries = p["query_tokens"][:, 0]  # (K, Q, D)
        projected = _linear(queries, p["cross.q.weight"], p.get("cross.q.bias"))
        if tokens is None:  # every head reads the same tokens: attend on the query side, no (K, B, N, D) keys
            attended = self._attend_shared_tokens(x, projected, p, heads)
        else:
            normed = _layer_norm(tokens, p["cross.norm1.weight"], p["cross.norm1.bias"])
            kv = _linear(normed, p["cross.kv.weight"], p.get("cross.kv.bias"))
            keys, values = kv.chunk(2, dim=-1)
            attended = _attend(projected[:, None].expand(k, b, *projected.shape[1:]), keys, values, heads)
        pooled = queries[:, None] + _linear(attended, p["cross.proj.weight"], p["cross.proj.bias"])
        normed = _layer_norm(pooled, p["cross.norm2.weight"], p["cross.norm2.bias"])
        pooled = pooled + _mlp(normed, p, "cross.mlp")
        logits = _linear(pooled.mean(dim=2), p["classifier.weight"], p["classifier.bias"])  # (K, B, C)
        return logits.contiguous()

    @staticmethod
    def _attend_shared_tokens(
        x: torch.Tensor, projected: torch.Tensor, p: dict[str, torch.Tensor], heads: int
    ) -> torch.Tensor:
        """Every head's cross-attention ``(K, B, Q, D)`` over tokens shared by all heads, attending on the query side.

        ``projected`` are the heads' projected queries ``(K, Q, D)``, ``x`` the tokens ``(B, N, D)``; the result is
        `_attend`'s of the heads' keys and values, before the output projection.

        Keys and values are linear in the normalised tokens: head k's are ``A x_j + a`` and ``V x_j + v`` (its
        LayerNorm's affine folded into ``A``, ``V``, ``a``, ``v``). So a query's score against token j is
        ``(A_h^T q_h) . x_j`` plus a term the same for every j, which the softmax drops, and the attended value is
        ``V_h (sum_j p_j x_j) + v_h``, as the weights p sum to 1. Attending on the query side costs the heads
        ``K x B x N x D`` per attention head instead of projecting ``K x B x N`` tokens through D x D weights: about
        D / heads = 64 times fewer multiplies for ViT-B, and no ``(K, B, N, 2D)`` keys and values in memory. The sums
        are reassociated, so the result equals `_attend`'s to float rounding (tests/bank/test_attentive.py).
        """
        k, q_count, dim = projected.shape
        d = dim // heads
        folded, folded_bias = _fold_layer_norm(p, "cross.norm1", "cross.kv")  # (K, 2D, D), (K, 2D)
        key_map, value_map = folded[:, :dim].view(k, heads, d, dim), folded[:, dim:].view(k, heads, d, dim)
        value_bias = folded_bias[:, dim:]  # the keys' bias is the same for every token: the softmax drops it
        normed = _normalised_once(x)  # (B, N, D)
        # (K, H, Q, D): each query folded back through its head's key map, scaled as the attention scales.
        query_side = torch.einsum("khqe,khed->khqd", projected.view(k, q_count, heads, d).transpose(1, 2), key_map)
        query_side = (query_side * d**-0.5).reshape(k * heads * q_count, dim)
        b, n = x.shape[:2]
        scores = (normed.reshape(b * n, dim) @ query_side.to(normed.dtype).T).view(b, n, k * heads * q_count)
        # Over the tokens, in float32 at least (bf16 scores under autocast).
        weights = torch.softmax(scores, dim=1, dtype=torch.promote_types(scores.dtype, torch.float32))
        weights = weights.to(normed.dtype)
        pooled = torch.bmm(weights.transpose(1, 2), normed)  # (B, K*H*Q, D): each query's weighted tokens
        pooled = pooled.view(b, k, heads, q_count, dim)
        attended = torch.einsum("bkhqd,khed->kbqhe", pooled, value_map.to(pooled.dtype))  # (K, B, Q, H, d)
        return attended.reshape(k, b, q_count, dim) + value_bias[:, None, None, :].to(attended.dtype)

    @staticmethod
    def _shared_norm_linear(x: torch.Tensor, p: dict[str, torch.Tensor], norm: str, linear: str) -> torch.Tensor:
        """``linear_k(norm_k(x))`` for every head k of tokens ``x`` ``(B, N, D)`` shared by all heads: ``(K, B, N, O)``.

        The normalisation itself is the same for every head: computed once; head k's affine ``(g_k, b_k)`` folds
        into its projection ``(W_k, c_k)`` as ``W_k diag(g_k)`` and ``W_k b_k + c_k``, so one matmul serves all.
        """
        folded_weight, folded_bias = _fold_layer_norm(p, norm, linear)  # (K, O, D), (K, O)
        k, o = folded_weight.shape[:2]
        normed = _normalised_once(x).flatten(0, 1)  # (B * N, D)
        # One batched matmul over the heads with the tokens broadcast (no copy): the output and its gradient come
        # out head-major and contiguous, as the attention reads them.
        out = torch.baddbmm(folded_bias[:, None, :], normed.expand(k, -1, -1), folded_weight.transpose(1, 2))
        return out.view(k, *x.shape[:2], o)

    def export(self, index: int) -> nn.Module:
        """That head as an `AttentiveProbe` with its current weights."""
        block = next(b for b in self.blocks if b.first <= index < b.first + b.count)
        probe = AttentiveProbe(
            block.dim, self.config.num_classes, self.options, bank_name=self.config.name, source=block.source
        ).to(self.flat.device)
        params = self._block_params(self.flat[block.offset : block.offset + block.numel].detach(), block)
        with torch.no_grad():
            for name, tensor in probe.named_parameters():
                tensor.copy_(params[name][index - block.first])
        return probe
