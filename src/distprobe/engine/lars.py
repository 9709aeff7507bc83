"""LARS: layer-wise adaptive rate scaling, the usual optimizer for SSL linear probes.

Every decision is made on the device with `torch.where`, so a step never synchronises with the host.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.optim import Optimizer


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
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            eta=eta,
            clip_lr=clip_lr,
            exclude_bias_n_norm=exclude_bias_n_norm,
            eps=eps,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # noqa: D102 - documented by Optimizer.step
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                excluded = group["exclude_bias_n_norm"] and p.ndim <= 1
                if not excluded:
                    if group["weight_decay"]:
                        grad = grad.add(p, alpha=group["weight_decay"])
                    grad = grad * _trust_ratio(p, grad, group)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    # Zeros (not a copy of the first gradient) so that a fresh state is all zeros: a skipped
                    # non-finite step can then be undone by restoring zeros.
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(grad)
                p.add_(buf, alpha=-group["lr"])
        return loss


def _trust_ratio(param: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
    """The factor LARS multiplies a tensor's gradient by; 1 where either norm is zero."""
    w_norm = torch.linalg.vector_norm(param)
    g_norm = torch.linalg.vector_norm(grad)
    ratio = group["eta"] * w_norm / (g_norm + group["eps"])
    if group["clip_lr"]:
        ratio = torch.clamp(ratio / group["lr"], max=1.0)
    usable = (w_norm > 0) & (g_norm > 0)
    return torch.where(usable, ratio, torch.ones_like(ratio))
