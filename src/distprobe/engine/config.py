"""The typed specification of one probe; runtime objects (groups, devices) are arguments of `Probe.build`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

GRADIENT_CLIP_ALGORITHMS = ("norm", "value")


@dataclass(kw_only=True)
class ProbeConfig:
    """What one probe is and how it trains.

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
    scheduler: Any = None
    """Name, ``{"type": ...}`` dict, Hydra config, partial/class/callable, instance, or None for a constant rate."""
    accumulate_grad_batches: int = 1
    """Micro-batches per optimizer step; gradients are not communicated on the micro-steps in between."""
    gradient_clip_val: float | None = None
    """Clip threshold applied to the probe's own (all-reduced, unscaled) gradients; None disables clipping."""
    gradient_clip_algorithm: Literal["norm", "value"] = "norm"
    """``"norm"`` clips the total gradient norm, ``"value"`` clamps each element."""
    metrics: Any = None
    """Metrics: a dict, list, tuple, single Metric, ``{"train": ..., "val": ...}``, or None for none."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or "/" in self.name:
            raise ValueError(
                f"probe {self.name!r}: argument 'name' must be a non-empty string without '/' (it becomes part of "
                "metric names such as 'train/{name}_loss')."
            )
        if isinstance(self.accumulate_grad_batches, bool) or not isinstance(self.accumulate_grad_batches, int):
            raise ValueError(
                f"probe '{self.name}': argument 'accumulate_grad_batches' got {self.accumulate_grad_batches!r}; "
                "expected a positive int such as 1 or 4."
            )
        if self.accumulate_grad_batches < 1:
            raise ValueError(
                f"probe '{self.name}': argument 'accumulate_grad_batches' got {self.accumulate_grad_batches}; "
                "expected a positive int (1 disables accumulation)."
            )
        if self.gradient_clip_algorithm not in GRADIENT_CLIP_ALGORITHMS:
            raise ValueError(
                f"probe '{self.name}': argument 'gradient_clip_algorithm' got {self.gradient_clip_algorithm!r}; "
                f"expected one of {list(GRADIENT_CLIP_ALGORITHMS)}."
            )
        if self.gradient_clip_val is not None and not (
            isinstance(self.gradient_clip_val, int | float) and self.gradient_clip_val > 0
        ):
            raise ValueError(
                f"probe '{self.name}': argument 'gradient_clip_val' got {self.gradient_clip_val!r}; "
                "expected a positive number, or None to disable clipping."
            )
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise ValueError(
                f"probe '{self.name}': argument 'loss_fn' got {self.loss_fn!r}; expected a callable "
                "such as nn.CrossEntropyLoss()."
            )

    def make_loss_fn(self) -> Callable[..., Any]:
        """The loss to train with: the user's, or cross-entropy by default."""
        return self.loss_fn if self.loss_fn is not None else nn.CrossEntropyLoss()
