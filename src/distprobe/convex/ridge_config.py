"""What an online ridge probe is (`RidgeConfig`), and how a `distprobe.loop.ProbeSet` routes it (`RidgeSpec`)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Any, Literal, get_args

from distprobe.arguments import require_choice, require_count, require_name
from distprobe.specs import TargetSpec

#: A default sweep of lambda (the mean-squared-error form: ``(1/n)||XW + 1b - Y||^2 + lambda ||W||^2``).
DEFAULT_L2: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)

StatisticsReset = Literal["after_evaluation", "by_owner"]
"""Who starts a ridge probe's statistics anew: its `distprobe.loop.ProbeSet` at the first training batch after an
evaluation, or the code that owns the probe (it calls `RidgeProbe.reset_train` itself)."""


@dataclass(kw_only=True)
class RidgeConfig:
    """What an online ridge probe is."""

    name: str
    """Unique name; keys the logs and the checkpoint state."""
    num_classes: int
    """Number of classes (targets are class indices, one-hot encoded for the regression)."""
    l2: Sequence[float] = DEFAULT_L2
    """The values of lambda, each solved exactly from the same statistics."""
    selection_fraction: float = 0.2
    """The hashed share of validation samples that chooses the best lambda; the rest reports it."""
    in_features: int | None = None
    """Feature size; None: read from the first training batch."""
    input: str | None = None
    """Key of the features in a `distprobe.loop.ProbeSet` step's mapping."""
    reset_statistics: StatisticsReset = "after_evaluation"
    """When the statistics start anew. ``"after_evaluation"``: the `distprobe.loop.ProbeSet` resets them at the first
    training batch after an evaluation, so each evaluation solves the batches since the last one. ``"by_owner"``: the
    set never resets them; the owner calls `RidgeProbe.reset_train` (`distprobe.callbacks.OnlineRidge` does at each
    training epoch's start, and keeps them over a resume inside the epoch)."""

    def __post_init__(self) -> None:
        name = require_name("ridge", self.name)
        require_count(f"ridge '{name}'", "num_classes", self.num_classes, minimum=2)
        given: Any = self.l2
        one = isinstance(given, Real | str) or getattr(given, "ndim", None) == 0 or not isinstance(given, Iterable)
        values: tuple[Any, ...] = (given,) if one else tuple(given)  # a 0-d tensor, a string: refused, not iterated
        real = all(isinstance(v, Real) and not isinstance(v, bool) for v in values)
        if not values or not real or not all(math.isfinite(v) and v >= 0 for v in values):
            raise ValueError(
                f"ridge '{name}': argument 'l2' got {self.l2!r}; expected one or more finite values >= 0, "
                "e.g. l2=(1e-4, 1e-2, 1.0)"
            )
        self.l2 = tuple(dict.fromkeys(float(v) for v in values))  # order kept, repeats dropped
        # Each lambda is logged and stored under its %g form: two that share it would overwrite each other's number
        # online, and fail the service's store (one row per probe, head and metric).
        by_key: dict[str, list[float]] = {}
        for value in self.l2:
            by_key.setdefault(f"{value:g}", []).append(value)
        shared = [group for group in by_key.values() if len(group) > 1]
        if shared:
            alike = " and ".join(map(repr, shared[0]))
            raise ValueError(
                f"ridge '{name}': argument 'l2' got {self.l2!r}; {alike} share the logged key 'l2={shared[0][0]:g}'; "
                "expected values that differ in their first 6 significant digits; drop all but one of them"
            )
        if not 0.0 < self.selection_fraction < 1.0:
            raise ValueError(
                f"ridge '{name}': argument 'selection_fraction' got {self.selection_fraction!r}; expected a share "
                "in (0, 1), e.g. 0.2"
            )
        if self.in_features is not None:
            require_count(f"ridge '{name}'", "in_features", self.in_features, or_none=True)
        require_choice(f"ridge '{name}'", "reset_statistics", self.reset_statistics, get_args(StatisticsReset))


class RidgeSpec(TargetSpec[RidgeConfig], config_type=RidgeConfig, kind="ridge"):
    """One ridge probe of a `distprobe.loop.ProbeSet`: its configuration (features by ``config.input``), its targets."""


to_ridge_spec = RidgeSpec.of
"""A `RidgeSpec` from itself, a `RidgeConfig`, or a dict of its fields plus ``target`` (ValueError: unknown keys)."""
