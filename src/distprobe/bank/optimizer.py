"""The bank's optimizer: every head's state, step count, skip count and scheduled rates, and the step itself.

Like a torch optimizer, but over the bank's flat layout: the state tensors are flat like the parameter, and each
block of heads the family's `views` cut out steps as one tensor (`distprobe.engine.functional` holds the maths).
"""

from __future__ import annotations

from typing import Any

import torch

from distprobe.bank.config import AdamWSpec, BankConfig, LARSSpec
from distprobe.bank.families import HeadFamily
from distprobe.bank.rates import HeadRates
from distprobe.engine import functional
from distprobe.engine.fused_update import fused_sgd_available, fused_sgd_update


class BankOptimizer:
    """Steps every head of ``heads`` from a reduced flat gradient, each with its own hyper-parameters."""

    def __init__(self, config: BankConfig, heads: HeadFamily, *, total_steps: int | None) -> None:
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
        views = self.heads.views
        params, grads = views(self.heads.flat.data), views(grad)
        states = {key: views(value) for key, value in self.state.items()}
        finite = (
            functional.finite_heads([grads[0].whole])
            if len(grads) == 1
            else torch.cat([functional.finite_heads([g.whole]) for g in grads])
        )
        self.skipped_steps += finite.logical_not().long()
        lr, weight_decay, momentum, beta2 = self.rates.per_head()
        decays = self.rates.any_weight_decay  # a host fact: no pass over the parameters without weight decay
        if isinstance(spec, AdamWSpec):
            self.steps += finite.float()
        # On CUDA the plain SGD step of a block is one compiled kernel that also drops skipped heads' gradients
        # (`distprobe.engine.fused_update`); a skipped head's non-finite norm stays its own under per-head clipping.
        fused = not isinstance(spec, AdamWSpec | LARSSpec) and fused_sgd_available(self.heads.flat.device)
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            part = p.heads
            keep = finite[part]
            if not fused:
                functional.zero_skipped([g.whole], keep)
            # A head's norm over all its elements together, as clip_grad_norm_ sees a separate probe.
            functional.clip([g.whole], self.config.gradient_clip_val, self.config.gradient_clip_algorithm)
            step_rates = functional.StepRates(
                lr=lr[part], weight_decay=weight_decay[part], momentum=momentum[part], steps=self.steps[part], keep=keep
            )
            if isinstance(spec, AdamWSpec):  # elementwise: every tensor of a head as one
                functional.adamw_update(
                    [p.whole],
                    [g.whole],
                    [states["exp_avg"][i].whole],
                    [states["exp_avg_sq"][i].whole],
                    step_rates,
                    beta2=beta2[part],
                    eps=spec.eps,
                )
            elif isinstance(spec, LARSSpec):  # tensor by tensor: a trust ratio per part, biases excluded
                functional.lars_update(
                    list(p.parts),
                    list(g.parts),
                    list(states["momentum_buffer"][i].parts),
                    [spec.exclude_bias_n_norm and bias for bias in p.bias_like],
                    step_rates,
                    eta=spec.eta,
                    clip_lr=spec.clip_lr,
                    eps=spec.eps,
                    decays=decays,
                )
            elif fused:
                buffers = states.get("momentum_buffer")
                fused_sgd_update(
                    p.whole,
                    g.whole,
                    buffers[i].whole if buffers is not None else None,
                    step_rates,
                    spec_momentum=spec.momentum,
                    dampening=spec.dampening,
                    nesterov=spec.nesterov,
                    decays=decays,
                )
            else:
                buffers = states.get("momentum_buffer")
                functional.sgd_update(
                    [p.whole],
                    [g.whole],
                    [buffers[i].whole] if buffers is not None else [torch.empty(0)],
                    step_rates,
                    dampening=spec.dampening,
                    nesterov=spec.nesterov,
                    uses_momentum=spec.momentum != 0,
                    decays=decays,
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
