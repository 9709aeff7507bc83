"""Each head's learning rate, weight decay and momenta, driven by any torch scheduler.

A torch ``LRScheduler`` acts on an optimizer's parameter groups. `HeadRates` is an optimizer with one group per head
(holding a placeholder tensor it never steps), so a scheduler moves each head's rate from that head's own base rate,
exactly as it would for a separate probe: cosine with ``eta_min``, warm-up, OneCycleLR's momentum cycling included.
The vectorised update reads the groups as ``(K,)`` device tensors, copied again only when a scheduler changed them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from distprobe.bank.config import AdamWSpec, BankConfig, Head
from distprobe.engine.factories import build_scheduler


class _GroupsOnly(Optimizer):
    """An optimizer whose only job is to hold parameter groups for a scheduler; `step` does nothing."""

    def step(self, closure: Any = None) -> Any:  # noqa: D102 - nothing to step
        return None


def _groups(config: BankConfig, heads: list[Head]) -> list[dict[str, Any]]:
    spec = config.optimizer_spec
    groups = []
    for head in heads:
        group: dict[str, Any] = {"params": [torch.zeros(())], "lr": head.lr, "weight_decay": head.weight_decay}
        if isinstance(spec, AdamWSpec):
            group["betas"] = spec.betas
        else:
            group["momentum"] = spec.momentum
        groups.append(group)
    return groups


class HeadRates:
    """The per-head hyper-parameters of a bank and the scheduler that moves them."""

    def __init__(self, config: BankConfig, heads: list[Head], *, device: torch.device, total_steps: int | None) -> None:
        self.config = config
        self.device = device
        groups = _groups(config, heads)
        # Schedulers that cycle momenta (OneCycleLR) look for them in the defaults.
        self.optimizer = _GroupsOnly(groups, {k: v for k, v in groups[0].items() if k in ("momentum", "betas")})
        self._initial = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.scheduler = self._build(total_steps)
        self._restored = False
        self._host: list[tuple[float, ...]] | None = None
        self._device_values: tuple[torch.Tensor, ...] | None = None
        self._last_lrs: list[float] = []

    def _build(self, total_steps: int | None) -> LRScheduler | None:
        if self.config.scheduler is None:
            # Constant rates: no scheduler at all, rather than ConstantLR's walk over K groups at every step.
            return None
        return build_scheduler(
            _per_head_peaks(self.config.scheduler, self._initial),
            self.optimizer,
            total_steps=total_steps,
            probe_name=self.config.name,
        )

    def set_total_steps(self, total_steps: int | None) -> None:
        """Rebuild the scheduler with lengths from ``total_steps`` unless it stepped or was restored."""
        if self.scheduler is None or total_steps is None or self._restored or self.scheduler.last_epoch > 0:
            return
        if isinstance(self.config.scheduler, LRScheduler):
            return
        for group, initial in zip(self.optimizer.param_groups, self._initial, strict=True):
            for key in [k for k in group if k != "params"]:
                del group[key]
            group.update(initial)
        self.scheduler = self._build(total_steps)
        self._host = None

    def _read(self) -> list[tuple[float, ...]]:
        out: list[tuple[float, ...]] = []
        for g in self.optimizer.param_groups:
            m, b2 = g["betas"] if "betas" in g else (g["momentum"], 0.0)
            out.append((float(g["lr"]), float(g["weight_decay"]), float(m), float(b2)))
        return out

    def _unchanged_since_read(self) -> bool:
        """Whether the groups still hold what was last read.

        torch schedulers move only ``lr`` (and, when cycling, the momenta), and `get_last_lr` lists the rates
        without a walk over the groups' dicts.
        """
        if self._host is None or getattr(self.scheduler, "cycle_momentum", False):
            return False
        return self.scheduler is None or self.scheduler.get_last_lr() == self._last_lrs

    def per_head(self) -> tuple[torch.Tensor, ...]:
        """``(lr, weight_decay, momentum or beta1, beta2)``, each a ``(K,)`` float32 tensor on the bank's device."""
        if self._device_values is not None and self._unchanged_since_read():
            return self._device_values
        host = self._read()
        self._last_lrs = [] if self.scheduler is None else [float(lr) for lr in self.scheduler.get_last_lr()]
        if host != self._host or self._device_values is None:
            values = torch.tensor(host, dtype=torch.float32).t().contiguous()
            if self.device.type == "cuda":
                # From pinned memory, without blocking: the caching host allocator keeps the buffer alive until the
                # copy is done, so the host never waits on the device.
                values = values.pin_memory().to(self.device, non_blocking=True)
            else:
                values = values.to(self.device)
            self._device_values = tuple(values)
            self._host = host
        return self._device_values

    @property
    def any_weight_decay(self) -> bool:
        """Whether any head has a weight decay now (a host fact: a pass over the parameters is saved otherwise)."""
        self.per_head()
        assert self._host is not None
        return any(values[1] for values in self._host)

    def step(self) -> None:
        """Advance the scheduler by one optimizer step."""
        if self.scheduler is not None:
            self.optimizer.step()
            self.scheduler.step()

    def current_lrs(self) -> list[float]:
        """Each head's learning rate now (host floats, no sync)."""
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """The groups' current values and the scheduler's state."""
        scheduler = None if self.scheduler is None else self.scheduler.state_dict()
        return {"optimizer": self.optimizer.state_dict(), "scheduler": scheduler}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the groups and the scheduler; a restored scheduler keeps its lengths."""
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self._restored = True
        self._host = None


def _per_head_peaks(spec: Any, initial: list[dict[str, Any]]) -> Any:
    """OneCycleLR and CyclicLR named without their peak rates: each head peaks at its own lr.

    These are the defaults a separate probe gets from its one group; the scheduler defaults read the first group's.
    """
    named = {"type": spec} if isinstance(spec, str) else spec
    if not isinstance(named, dict) or named.get("type") not in ("OneCycleLR", "CyclicLR"):
        return spec
    lrs = [float(g["lr"]) for g in initial]
    filled = dict(named)
    filled.setdefault("max_lr", lrs)
    if named["type"] == "CyclicLR":
        filled.setdefault("base_lr", [lr / 10 for lr in lrs])
    return filled
