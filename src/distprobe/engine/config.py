"""The typed specification of one probe; runtime objects (groups, devices) are arguments of `Probe.build`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from distprobe.engine.options import TrainingOptions


@dataclass(kw_only=True)
class ProbeConfig(TrainingOptions):
    """What one probe is and how it trains (`TrainingOptions`: accumulation, clipping, scheduler).

    Example:
        >>> cfg = ProbeConfig(name="linear", probe=nn.Linear(8, 3), optimizer="SGD")
    """

    name: str
    """Unique identifier: keys the probe's logs, its checkpoint state and ``callbacks_modules``."""
    probe: Any
    """An nn.Module, a callable returning one, or a Hydra config with ``_target_``."""
    loss_fn: Callable[..., Any] | None = None
    """Loss taking ``(logits, targets)``; None means ``nn.CrossEntropyLoss()``."""
    optimizer: Any = None
    """Name, ``{"type": ...}`` dict, Hydra config, partial/class/callable, instance, or None for the LARS default."""
    metrics: Any = None
    """Metrics: a dict, list, tuple, single Metric, ``{"train": ..., "val": ...}``, or None for none."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or "/" in self.name:
            raise ValueError(
                f"probe {self.name!r}: argument 'name' must be a non-empty string without '/' (it becomes part of "
                "metric names such as 'train/{name}_loss')."
            )
        self.check_training_options(f"probe '{self.name}'")
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise ValueError(
                f"probe '{self.name}': argument 'loss_fn' got {self.loss_fn!r}; expected a callable "
                "such as nn.CrossEntropyLoss()."
            )

    def make_loss_fn(self) -> Callable[..., Any]:
        """The loss to train with: the user's, or cross-entropy by default."""
        return self.loss_fn if self.loss_fn is not None else nn.CrossEntropyLoss()
