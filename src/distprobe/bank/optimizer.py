"""The bank's optimizer: every head's state, step count, skip count and scheduled rates, and the step itself.

Like a torch optimizer, but over the bank's flat layout: the state tensors are flat like the parameter, and each
source's block of heads steps as one tensor (`distprobe.bank.optim` holds the maths).
"""

from __future__ import annotations

from typing import Any

import torch

from distprobe.bank import optim
from distprobe.bank.config import AdamWSpec, BankConfig, LARSSpec
from distprobe.bank.heads import BankHeads, bias_view, block_view, weight_view
from distprobe.bank.rates import HeadRates


class BankOptimizer:
    """Steps every head of ``heads`` from a reduced flat gradient, each with its own hyper-parameters."""

    def __init__(self, config: BankConfig, heads: BankHeads, *, total_steps: int | None) -> None:
        self.config = config
        self.heads = heads
        device = heads.flat.device
        k = heads.num_heads
        flat = heads.flat
        spec = config.optimizer_spec
        self.state: dict[str, torch.Tensor] = {}
        """The optimizer's state, flat like the parameter: its block views follow the same layout."""
        if isinstance(spec, AdamWSpec):
            self.state = {"exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
        elif spec.momentum:
            self.state = {"momentum_buffer": torch.zeros_like(flat)}
        self.steps = torch.zeros(k, dtype=torch.float32, device=device)
        """Each head's optimizer steps taken (skipped steps do not count), as AdamW's bias correction needs."""
        self.skipped_steps = torch.zeros(k, dtype=torch.long, device=device)
        """Each head's optimizer steps skipped for a non-finite gradient."""
        self.rates = HeadRates(config, heads.head_list, device=device, total_steps=total_steps)

    def step(self, grad: torch.Tensor) -> torch.Tensor:
        """Step every head whose gradient is finite; return the ``(K,)`` bool of heads that stepped.

        ``grad`` (flat, reduced over the group) is consumed: it is cleaned, clipped and overwritten in place.
        """
        spec = self.config.optimizer_spec
        blocks = self.heads.blocks
        flat = self.heads.flat.data
        grads = [block_view(grad, b) for b in blocks]
        sums = [optim.head_sums([g]) for g in grads]
        finite = torch.isfinite(sums[0] if len(sums) == 1 else torch.cat(sums))
        self.skipped_steps += finite.logical_not().long()
        lr, weight_decay, momentum, beta2 = self.rates.per_head()
        decays = self.rates.any_weight_decay  # a host fact: no pass over the parameters without weight decay
        if isinstance(spec, AdamWSpec):
            self.steps += finite.float()
        for block, g in zip(blocks, grads, strict=True):
            part = slice(block.first, block.first + block.count)
            keep = finite[part]
            optim.clean_skipped([g], keep)
            # A head's norm over its weights and bias together: one block row, as clip_grad_norm_ sees a probe.
            optim.clip_per_head([g], self.config.gradient_clip_val, self.config.gradient_clip_algorithm)
            hyper = {"lr": lr[part], "weight_decay": weight_decay[part], "keep": keep}
            if isinstance(spec, AdamWSpec):  # elementwise: weights and biases as one tensor
                optim.adamw_update(
                    [block_view(flat, block)],
                    [g],
                    [block_view(self.state["exp_avg"], block)],
                    [block_view(self.state["exp_avg_sq"], block)],
                    beta1=momentum[part],
                    beta2=beta2[part],
                    steps=self.steps[part],
                    spec=spec,
                    **hyper,
                )
            elif isinstance(spec, LARSSpec):  # weights and biases apart: a trust ratio per tensor, biases excluded
                optim.lars_update(
                    [weight_view(flat, block), bias_view(flat, block)],
                    [weight_view(grad, block), bias_view(grad, block)],
                    [
                        weight_view(self.state["momentum_buffer"], block),
                        bias_view(self.state["momentum_buffer"], block),
                    ],
                    [False, spec.exclude_bias_n_norm],
                    momentum=momentum[part],
                    spec=spec,
                    decays=decays,
                    **hyper,
                )
            else:
                buffer = self.state.get("momentum_buffer")
                optim.sgd_update(
                    [block_view(flat, block)],
                    [g],
                    [block_view(buffer, block)] if buffer is not None else [torch.empty(0)],
                    momentum=momentum[part],
                    steps=self.steps[part],
                    spec=spec,
                    decays=decays,
                    **hyper,
                )
        if not isinstance(spec, AdamWSpec):
            self.steps += finite.float()
        self.rates.step()
        return finite

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's part of the bank's checkpoint."""
        return {
            "optimizer": {k: v.clone() for k, v in self.state.items()},
            "steps": self.steps.clone(),
            "skipped_steps": self.skipped_steps.clone(),
            "rates": self.rates.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` saved (inside the bank's checkpoint)."""
        for key, value in state.get("optimizer", {}).items():
            self.state[key].copy_(value)
        self.steps.copy_(state["steps"])
        self.skipped_steps.copy_(state.get("skipped_steps", torch.zeros_like(self.skipped_steps)))
        self.rates.load_state_dict(state["rates"])
