"""LARS: layer-wise adaptive rate scaling, the usual optimizer for SSL linear probes.

The maths is `distprobe.engine.functional.lars_update`, each tensor one head; every decision is made on the device
with `torch.where`, so a step never synchronises with the host.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from distprobe.engine.functional.optim import StepRates, lars_update


class LARS(Optimizer):
    """SGD with momentum whose per-tensor learning rate is scaled by ``eta * ||w|| / ||g||``.

    Args:
        params: Parameters or parameter groups.
        lr: Base learning rate.
        momentum: Momentum factor.
        weight_decay: L2 penalty added to the gradient before the trust ratio (skipped for excluded tensors).
        eta: Trust coefficient.
        clip_lr: LARC's clipping mode: the adaptive rate never exceeds ``lr`` (the trust ratio is capped at 1).
        exclude_bias_n_norm: Leave 1-D tensors (biases, normalisation weights) out of adaptation and weight decay.
        eps: Guards the division when a gradient norm is zero.

    Example:
        >>> layer = torch.nn.Linear(4, 2)
        >>> opt = LARS(layer.parameters(), lr=0.1)
        >>> layer(torch.randn(3, 4)).sum().backward()
        >>> opt.step()
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.02,
        clip_lr: bool = True,
        exclude_bias_n_norm: bool = True,
        eps: float = 1e-8,
    ) -> None:
        if lr <= 0:
            raise ValueError(f"LARS: lr must be > 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"LARS: momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"LARS: weight_decay must be >= 0, got {weight_decay}")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "eta": eta,
            "clip_lr": clip_lr,
            "exclude_bias_n_norm": exclude_bias_n_norm,
            "eps": eps,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # noqa: D102 - documented by Optimizer.step
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    # Zeros (not a copy of the first gradient) so that a fresh state is all zeros: a skipped
                    # non-finite step can then be undone by restoring zeros.
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            # Each tensor is one head (K = 1) of the functional update: its own trust ratio.
            lars_update(
                [p.detach()[None] for p in params],
                [p.grad[None] for p in params],
                [self.state[p]["momentum_buffer"][None] for p in params],
                [group["exclude_bias_n_norm"] and p.ndim <= 1 for p in params],
                StepRates(lr=group["lr"], weight_decay=group["weight_decay"], momentum=group["momentum"]),
                eta=group["eta"],
                clip_lr=group["clip_lr"],
                eps=group["eps"],
                decays=bool(group["weight_decay"]),
            )
        return loss
