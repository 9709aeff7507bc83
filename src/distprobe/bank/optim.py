"""The bank's optimizer maths: every head's update at once, with that head's own hyper-parameters.

Each function updates the tensors of one (source) block in place. A block's tensors hold K heads along their first
dimension; hyper-parameters are ``(K,)`` device tensors. The maths is that of `torch.optim.SGD`, `torch.optim.AdamW`
and `distprobe.engine.lars.LARS` for one head, so that a head's update equals what it would get as a separate probe.

A skipped head (non-finite gradient) must leave its parameters and state bitwise alone, with no host sync and no
copies: its gradient is zeroed, and its rate, weight decay and moment factors are set to the values that make the
update the identity (lr 0, momentum 1, beta 1). ``keep`` is the ``(K,)`` bool of heads that step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from distprobe.bank.config import AdamWSpec, ClipAlgorithm, LARSSpec, SGDSpec


def per_head(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(K,)`` values shaped to broadcast over a ``(K, ...)`` tensor."""
    return values.view(-1, *([1] * (like.ndim - 1)))


def head_sums(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(K,)``: the sum of each head's elements over its tensors (non-finite iff one of them is, bar overflow)."""
    total = tensors[0].flatten(1).sum(dim=1)
    for t in tensors[1:]:  # one tensor in the usual case: no stack, no second reduction
        total = total + t.flatten(1).sum(dim=1)
    return total


def head_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(K,)``: each head's L2 norm over its tensors (what `clip_grad_norm_` computes for one separate probe)."""
    squares = torch.stack([torch.linalg.vector_norm(t.flatten(1), dim=1) ** 2 for t in tensors]).sum(dim=0)
    return squares.sqrt()


def clean_skipped(grads: Sequence[torch.Tensor], keep: torch.Tensor) -> None:
    """Zero the gradients of skipped heads (NaN times 0 is NaN, so `where`, not a product)."""
    for g in grads:
        g.masked_fill_(per_head(keep.logical_not(), g), 0.0)


def clip_per_head(grads: Sequence[torch.Tensor], clip_val: float | None, algorithm: ClipAlgorithm) -> None:
    """Clip each head's gradients as `distprobe.engine.maths.clip_gradients` clips one probe's."""
    if clip_val is None:
        return
    if algorithm == "value":
        for g in grads:
            g.clamp_(-clip_val, clip_val)
        return
    factor = torch.clamp(clip_val / (head_norms(grads) + 1e-6), max=1.0)
    for g in grads:
        g.mul_(per_head(factor, g))


def sgd_update(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    buffers: Sequence[torch.Tensor],
    *,
    lr: torch.Tensor,
    weight_decay: torch.Tensor,
    momentum: torch.Tensor,
    steps: torch.Tensor,
    keep: torch.Tensor,
    spec: SGDSpec,
    decays: bool = True,
) -> None:
    """``torch.optim.SGD`` per head; ``steps`` counts each head's steps so far (its first step copies the gradient).

    ``grads`` are overwritten. ``decays=False`` (no head has a weight decay) saves a pass over the parameters.
    """
    neg_lr = torch.where(keep, -lr, 0.0)
    momentum_eff = torch.where(keep, momentum, 1.0)
    # torch: the first step's buffer is the gradient itself (no dampening); later steps add (1 - dampening) g.
    grad_factor = torch.where(keep & (steps > 0), 1.0 - spec.dampening, 1.0) if spec.dampening else None
    for p, d_p, buf in zip(params, grads, buffers, strict=True):
        if decays:
            d_p.addcmul_(p, per_head(torch.where(keep, weight_decay, 0.0), p))
        if spec.momentum == 0:
            p.addcmul_(d_p, per_head(neg_lr, p))
            continue
        if grad_factor is not None:
            d_p.mul_(per_head(grad_factor, d_p))
        torch.addcmul(d_p, buf, per_head(momentum_eff, buf), out=buf)  # buf = momentum * buf + d_p, one kernel
        step = d_p.addcmul_(buf, per_head(momentum, buf)) if spec.nesterov else buf
        p.addcmul_(step, per_head(neg_lr, p))


def adamw_update(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    *,
    lr: torch.Tensor,
    weight_decay: torch.Tensor,
    beta1: torch.Tensor,
    beta2: torch.Tensor,
    steps: torch.Tensor,
    keep: torch.Tensor,
    spec: AdamWSpec,
) -> None:
    """``torch.optim.AdamW`` per head; ``steps`` already counts this step for the heads that take it."""
    lr_eff = torch.where(keep, lr, 0.0)
    beta1_eff = torch.where(keep, beta1, 1.0)
    beta2_eff = torch.where(keep, beta2, 1.0)
    started = steps > 0  # a head that never stepped has no bias correction yet (1 - beta**0 = 0)
    bias_correction1 = torch.where(started, 1 - beta1**steps, 1.0)
    bias_correction2_sqrt = torch.where(started, 1 - beta2**steps, 1.0).sqrt()
    step_size = lr_eff / bias_correction1
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs, strict=True):
        p.mul_(per_head(1 - lr_eff * weight_decay, p))
        m.lerp_(g, per_head(1 - beta1_eff, m))
        v.mul_(per_head(beta2_eff, v)).addcmul_(g, g * per_head(1 - beta2_eff, v))
        denom = (v.sqrt() / per_head(bias_correction2_sqrt, v)).add_(spec.eps)
        p.sub_(m / denom * per_head(step_size, p))


def lars_update(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    buffers: Sequence[torch.Tensor],
    excluded: Sequence[bool],
    *,
    lr: torch.Tensor,
    weight_decay: torch.Tensor,
    momentum: torch.Tensor,
    keep: torch.Tensor,
    spec: LARSSpec,
    decays: bool = True,
) -> None:
    """`distprobe.engine.lars.LARS` per head: each head's weight gets its own trust ratio (its bias is excluded)."""
    lr_eff = torch.where(keep, lr, 0.0)
    wd_eff = torch.where(keep, weight_decay, 0.0)
    momentum_eff = torch.where(keep, momentum, 1.0)
    for p, g, buf, skip_adaptation in zip(params, grads, buffers, excluded, strict=True):
        if not skip_adaptation:
            if decays:
                g = g.addcmul(p, per_head(wd_eff, p))
            w_norm = torch.linalg.vector_norm(p.flatten(1), dim=1)
            g_norm = torch.linalg.vector_norm(g.flatten(1), dim=1)
            ratio = spec.eta * w_norm / (g_norm + spec.eps)
            if spec.clip_lr:
                ratio = torch.clamp(ratio / lr, max=1.0)
            ratio = torch.where((w_norm > 0) & (g_norm > 0), ratio, 1.0)
            g = g * per_head(ratio, g)
        buf.mul_(per_head(momentum_eff, buf)).add_(g)
        p.sub_(buf * per_head(lr_eff, p))
