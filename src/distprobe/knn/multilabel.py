"""Multi-label kNN: each neighbour votes with its whole label vector, weighted as DINO weights a class vote.

A query's score for label c is ``sum_j w_j y_jc / sum_j w_j`` over its k nearest neighbours, with ``w_j =
exp(cosine_j / T)`` and ``y_j`` neighbour j's multi-hot vector (stable-pretraining's PR #397 proposes this sum): the
weighted share of neighbours that carry the label, in [0, 1]. A label is predicted above 0.5; mAP ranks the scores.

The buffer keeps each vector packed into int64 words of 63 labels each (one bit per label, the sign bit unused), so a
candidate crosses ranks in the same tensor as its position, ``ceil(C / 63)`` numbers instead of one class index.
"""

from __future__ import annotations

import torch

BITS = 63
"""Labels per packed word (the sign bit stays 0)."""


def words(num_classes: int) -> int:
    """int64 words per packed label vector."""
    return -(-num_classes // BITS)


def _powers(device: torch.device) -> torch.Tensor:
    return torch.ones((), dtype=torch.long, device=device) << torch.arange(BITS, device=device)


def pack(targets: torch.Tensor) -> torch.Tensor:
    """``(B, C)`` multi-hot (a value of 1 is a label; anything else is not) to ``(B, words(C))`` int64."""
    b, c = targets.shape
    n = words(c)
    bits = torch.zeros(b, n * BITS, dtype=torch.long, device=targets.device)
    bits[:, :c] = (targets == 1).long()
    return (bits.view(b, n, BITS) * _powers(targets.device)).sum(dim=2)


def unpack(packed: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(..., words)`` int64 to ``(..., C)`` float32 0/1."""
    bits = (packed[..., None] >> torch.arange(BITS, device=packed.device)) & 1
    return bits.flatten(-2)[..., :num_classes].float()


def label_scores(
    scores: torch.Tensor, packed: torch.Tensor, ks: tuple[int, ...], num_classes: int, temperature: float
) -> torch.Tensor:
    """``(Q, len(ks), C)``: each label's weighted share among each query's first k neighbours (best first).

    ``scores`` ``(Q, max_k)`` are the cosines (``-inf`` for padding: weight 0), ``packed`` ``(Q, max_k, words)``.
    """
    weights = (scores / temperature).exp()
    labels = unpack(packed, num_classes)
    out = []
    for k in ks:
        votes = torch.einsum("qk,qkc->qc", weights[:, :k], labels[:, :k])
        out.append(votes / weights[:, :k].sum(dim=1, keepdim=True).clamp(min=torch.finfo(votes.dtype).tiny))
    return torch.stack(out, dim=1)
