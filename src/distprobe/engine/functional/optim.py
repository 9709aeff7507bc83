"""Optimizer updates of K heads at once, each with its own hyper-parameters.

Each function updates its tensors in place. Tensors hold K heads along their first dimension; hyper-parameters are
``(K,)`` device tensors or floats (one value for every head). The maths is that of `torch.optim.SGD`,
`torch.optim.AdamW` and `distprobe.engine.LARS` for one head, so that a head's update equals what it would get as a
separate probe; `distprobe.engine.LARS` itself steps each tensor as one head (K = 1) through `lars_update`.

Every update takes the step's `StepRates`: each head's rates, its step count and whether it steps. A skipped head
(``keep`` False: a non-finite gradient) must leave its parameters and state bitwise alone, with no host sync and no
copies: its gradient is zeroed (`grads.zero_skipped`), and its rate, weight decay and moment factors are set to the
values that make the update the identity (lr 0, momentum 1, beta 1; `StepRates.kept`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar, overload

import torch

from distprobe.engine.functional.grads import per_head

Hyper = torch.Tensor | float
Rate = TypeVar("Rate", torch.Tensor, float)
"""A per-head hyper-parameter: a ``(K,)`` tensor, or one float for every head."""


@dataclass(frozen=True)
class StepRates(Generic[Rate]):
    """What every update reads of one step, per head: its rates, its step count and whether it steps.

    The optimizer's own constants (AdamW's ``beta2`` and ``eps``, SGD's ``dampening``, LARS's ``eta``) are the
    updates' keyword arguments. SGD and AdamW take ``(K,)`` tensors (``StepRates[torch.Tensor]``); LARS also takes
    floats, as `distprobe.engine.LARS` steps each tensor of a probe with its parameter group's values.

    Example:
        >>> rates = StepRates(lr=torch.tensor([0.1, 0.5]), weight_decay=torch.zeros(2), momentum=torch.full((2,), 0.9),
        ...                   keep=torch.tensor([True, False]))
        >>> rates.kept(rates.lr, 0.0)
        tensor([0.1000, 0.0000])
    """

    lr: Rate
    """Each head's learning rate at this step."""
    weight_decay: Rate
    """Each head's weight decay (decoupled for AdamW)."""
    momentum: Rate
    """Each head's momentum: SGD's and LARS's, AdamW's ``beta1`` (the factor torch's schedulers cycle as momentum)."""
    steps: torch.Tensor | None = None
    """``(K,)`` float: each head's optimizer steps. SGD reads the steps before this one (a head's first step copies
    its gradient into the buffer), AdamW the steps including this one (its bias correction); LARS reads none."""
    keep: torch.Tensor | None = None
    """``(K,)`` bool: the heads that step (False: a non-finite gradient, the head is left bitwise alone); None: all."""

    @overload
    def kept(self, value: torch.Tensor, skipped: float) -> torch.Tensor: ...
    @overload
    def kept(self, value: Hyper, skipped: float) -> Hyper: ...
    def kept(self, value: Hyper, skipped: float) -> Hyper:
        """``value`` for the heads that step, ``skipped`` (what makes the update the identity) for the others."""
        return value if self.keep is None else torch.where(self.keep, value, skipped)

    def step_counts(self, update: str) -> torch.Tensor:
        """``steps``, which ``update`` (SGD's or AdamW's) needs."""
        if self.steps is None:
            raise ValueError(f"{update}: StepRates.steps is None; pass each head's optimizer steps, a (K,) tensor")
        return self.steps


def _scaled_add(t: torch.Tensor, other: torch.Tensor, factor: Hyper) -> torch.Tensor:
    """``t + factor * other`` (a new tensor), ``factor`` per head or one float."""
    if isinstance(factor, torch.Tensor):
        return t.addcmul(other, per_head(factor, t))
    return t.add(other, alpha=factor)


def sgd_update(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    buffers: Sequence[torch.Tensor],
    rates: StepRates[torch.Tensor],
    *,
    dampening: float = 0.0,
    nesterov: bool = False,
    uses_momentum: bool = True,
    decays: bool = True,
) -> None:
    """``torch.optim.SGD`` per head; ``rates.steps`` counts each head's steps before this one.

    ``grads`` are overwritten. ``uses_momentum=False`` (momentum 0) needs no buffers; ``decays=False`` (no head has
    a weight decay) saves a pass over the parameters.
    """
    steps = rates.step_counts("sgd_update")
    neg_lr = rates.kept(-rates.lr, 0.0)
    momentum_eff = rates.kept(rates.momentum, 1.0)
    # torch: the first step's buffer is the gradient itself (no dampening); later steps add (1 - dampening) g.
    started = steps > 0 if rates.keep is None else rates.keep & (steps > 0)
    grad_factor = torch.where(started, 1.0 - dampening, 1.0) if dampening else None
    for p, d_p, buf in zip(params, grads, buffers, strict=True):
        if decays:
            d_p.addcmul_(p, per_head(rates.kept(rates.weight_decay, 0.0), p))
        if not uses_momentum:
            p.addcmul_(d_p, per_head(neg_lr, p))
            continue
        if grad_factor is not None:
            d_p.mul_(per_head(grad_factor, d_p))
        torch.addcmul(d_p, buf, per_head(momentum_eff, buf), out=buf)  # one kernel
        step = d_p.addcmul_(buf, per_head(rates.momentum, buf)) if nesterov else buf
        p.addcmul_(step, per_head(neg_lr, p))


def adamw_update(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    rates: StepRates[torch.Tensor],
    *,
    beta2: torch.Tensor,
    eps: float = 1e-8,
) -> None:
    """``torch.optim.AdamW`` per head, ``rates.momentum`` its beta1; ``rates.steps`` already counts this step."""
    steps = rates.step_counts("adamw_update")
    lr_eff = rates.kept(rates.lr, 0.0)
    beta1_eff = rates.kept(rates.momentum, 1.0)
    beta2_eff = rates.kept(beta2, 1.0)
    started = steps > 0  # a head that never stepped has no bias correction yet (1 - beta**0 = 0)
    bias_correction1 = torch.where(started, 1 - rates.momentum**steps, 1.0)
    bias_correction2_sqrt = torch.where(started, 1 - beta2**steps, 1.0).sqrt()
    step_size = lr_eff / bias_correction1
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs, strict=True):
        p.mul_(per_head(1 - lr_eff * rates.weight_decay, p))
        m.lerp_(g, per_head(1 - beta1_eff, m))
        v.mul_(per_head(beta2_eff, v)).addcmul_(g, g * per_head(1 - beta2_eff, v))
        denom = (v.sqrt() / per_head(bias_correction2_sqrt, v)).add_(eps)
        p.sub_(m / denom * per_head(step_size, p))


def lars_update(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    buffers: Sequence[torch.Tensor],
    excluded: Sequence[bool],
    rates: StepRates[torch.Tensor] | StepRates[float],
    *,
    eta: float = 0.02,
    clip_lr: bool = True,
    eps: float = 1e-8,
    decays: bool = True,
) -> None:
    """LARS per head: SGD with momentum whose rate is scaled by ``eta * ||w|| / ||g||``, per head and per tensor.

    ``excluded`` tensors (biases) skip the adaptation and the weight decay. ``clip_lr`` (LARC) caps the trust ratio
    at 1 times the head's lr. The momentum buffers start at zeros, so that undoing a first step restores zeros.
    """
    lr_eff = rates.kept(rates.lr, 0.0)
    wd_eff = rates.kept(rates.weight_decay, 0.0)
    momentum_eff = rates.kept(rates.momentum, 1.0)
    for p, g, buf, skip_adaptation in zip(params, grads, buffers, excluded, strict=True):
        if not skip_adaptation:
            if decays:
                g = _scaled_add(g, p, wd_eff)
            w_norm = torch.linalg.vector_norm(p.flatten(1), dim=1)
            g_norm = torch.linalg.vector_norm(g.flatten(1), dim=1)
            ratio = eta * w_norm / (g_norm + eps)
            if clip_lr:
                ratio = torch.clamp(ratio / rates.lr, max=1.0)
            ratio = torch.where((w_norm > 0) & (g_norm > 0), ratio, 1.0)
            g = g * per_head(ratio, g)
        buf.mul_(per_head(momentum_eff, buf)).add_(g)
        if isinstance(lr_eff, torch.Tensor):
            p.sub_(buf * per_head(lr_eff, p))
        else:
            p.add_(buf, alpha=-lr_eff)
