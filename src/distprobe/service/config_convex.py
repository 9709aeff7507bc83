"""The eval config's ``probes.ridge``, ``probes.logreg``, ``probes.fewshot`` and ``probes.intervals``.

The convex probes run on the cached features (`distprobe.convex`): ridge from summed statistics (`RidgeConfig`'s
fields, the service setting ``num_classes`` and ``in_features``), DINOv2/v3's logistic-regression protocol
(`LogregOptions`) and few-shot episodes (`FewshotOptions`). Their keys and types are these dataclasses' fields and
annotations; their ranges are checked by the dataclasses' own ``__post_init__``, run once when the file is loaded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from distprobe.arguments import require_choice, require_count
from distprobe.service.config_schema import build_section

FewshotSolver = Literal["ridge", "logreg"]

RIDGE_SET_BY_SERVICE = ("num_classes", "in_features", "input", "reset_statistics")
"""`distprobe.convex.RidgeConfig` fields the service fills in, or that mean nothing there (``reset_statistics``: a job
sums its cached training features once)."""


def _default_c_grid() -> list[float]:
    from distprobe.convex.logreg import DINOV3_C_GRID

    return list(DINOV3_C_GRID)


@dataclass(kw_only=True)
class LogregOptions:
    """``probes.logreg``: multinomial logistic regression by L-BFGS over a grid of C (`convex.logreg_grid`)."""

    name: str = "logreg"
    """The probe's name in the results."""
    c_grid: list[float] = field(default_factory=_default_c_grid)
    """The values of C (scikit-learn's inverse regularisation strength); default DINOv3's 45, 1e-6 to 1e5."""
    holdout: float = 0.1
    """The hashed share of train that chooses C (never the reported validation set)."""
    chain: int = 5
    """Consecutive C values one rank fits in a row, each warm-started from the previous one."""
    max_iter: int = 1000
    """L-BFGS iterations per fit at most."""

    def __post_init__(self) -> None:
        grid = [self.c_grid] if isinstance(self.c_grid, int | float) else list(self.c_grid)
        if not grid or not all(isinstance(c, int | float) and math.isfinite(c) and c > 0 for c in grid):
            raise ValueError(
                f"logreg '{self.name}': argument 'c_grid' got {self.c_grid!r}; expected one or more finite values of "
                "C > 0 (scikit-learn's inverse regularisation strength), e.g. c_grid: [0.01, 1.0, 100.0], or leave it "
                "out for DINOv3's 45 values"
            )
        self.c_grid = [float(c) for c in grid]
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(
                f"logreg '{self.name}': argument 'holdout' got {self.holdout!r}; expected a share in (0, 1), e.g. 0.1"
            )
        require_count(f"logreg '{self.name}'", "chain", self.chain)
        require_count(f"logreg '{self.name}'", "max_iter", self.max_iter)


@dataclass(kw_only=True)
class FewshotOptions:
    """``probes.fewshot``: episodes of ``shots`` samples per class, ``seeds`` of each (`convex.run_fewshot`)."""

    name: str = "fewshot"
    """The probe's name in the results."""
    shots: list[int] = field(default_factory=lambda: [1, 5, 10, 25])
    """Samples per class of each episode."""
    seeds: int = 3
    """Episodes per shot count (seeds 0 .. seeds - 1); the mean and standard deviation are over them."""
    solver: FewshotSolver = "ridge"
    """``ridge`` (closed form, lambda in the mean-squared-error form) or ``logreg`` (C)."""
    reg: float | list[float] = 0.01
    """One fixed value, or several chosen by cross-validation inside each episode's shots (>= 2 shots)."""

    def __post_init__(self) -> None:
        shots = [self.shots] if isinstance(self.shots, int) else list(self.shots)
        counts = all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shots)
        if not shots or not counts or len(set(shots)) != len(shots):
            raise ValueError(
                f"fewshot '{self.name}': argument 'shots' got {self.shots!r}; expected distinct integers >= 1"
            )
        self.shots = shots
        require_count(f"fewshot '{self.name}'", "seeds", self.seeds)
        require_choice(f"fewshot '{self.name}'", "solver", self.solver, get_args(FewshotSolver))
        from distprobe.convex.fewshot import _regularisation

        try:
            values = _regularisation(self.solver, self.reg)  # the core's own check of the values
        except ValueError:
            what = "C > 0 (scikit-learn's C)" if self.solver == "logreg" else "lambda >= 0"
            raise ValueError(
                f"fewshot '{self.name}': argument 'reg' got {self.reg!r} with solver {self.solver!r}; expected one "
                f"finite value or a list of them, each {what}, e.g. reg: 0.01 (one fixed value) or reg: [0.001, 0.01, "
                "0.1] (chosen inside each episode's shots)"
            ) from None
        if len(values) > 1 and min(shots) < 2:
            raise ValueError(
                f"fewshot '{self.name}': shots={shots} with reg={self.reg!r}: choosing the regularisation needs >= 2 "
                "shots per class (it is cross-validated inside each episode, never on validation); pass one value"
            )


def ridge_config(options: Mapping[str, Any], num_classes: int, in_features: int | None, source: str) -> Any:
    """``probes.ridge`` as a `distprobe.convex.RidgeConfig` (``name`` defaults to ``"ridge"``)."""
    from distprobe.convex import RidgeConfig

    ridge = {"name": "ridge", **options}
    service = {"num_classes": num_classes, "in_features": in_features}
    return build_section(RidgeConfig, ridge, "probes.ridge", source, RIDGE_SET_BY_SERVICE, **service)


def logreg_options(options: Mapping[str, Any], source: str) -> LogregOptions:
    """``probes.logreg`` checked and built."""
    return build_section(LogregOptions, options, "probes.logreg", source)


def fewshot_options(options: Mapping[str, Any], source: str) -> FewshotOptions:
    """``probes.fewshot`` checked and built."""
    return build_section(FewshotOptions, options, "probes.fewshot", source)


def check_convex_options(
    ridge: Mapping[str, Any] | None,
    logreg: Mapping[str, Any] | None,
    fewshot: Mapping[str, Any] | None,
    num_classes: int,
    source: str,
) -> None:
    """Raise `ServiceConfigError` for an unknown key, a wrong type or a value out of range in a convex probe."""
    if ridge is not None:
        ridge_config(ridge, num_classes, None, source)
    if logreg is not None:
        logreg_options(logreg, source)
    if fewshot is not None:
        fewshot_options(fewshot, source)
