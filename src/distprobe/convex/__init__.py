"""Closed-form and convex probes on frozen features, few-shot protocols and bootstrap intervals (torch only).

- `ridge`: exact ridge regression from summed float64 sufficient statistics, every lambda from one decomposition;
- `online`: `RidgeProbe`, the online ridge probe over a data-parallel group (`OnlineRidge`'s and `ProbeSet`'s engine);
- `logreg`: multinomial logistic regression by float64 L-BFGS (scikit-learn's objective), DINOv2/v3's C protocol;
- `episodes`: few-shot episodes drawn from ``(seed, shots, class)`` over labels grouped by class once;
- `fewshot`: ridge and logreg solvers of the episodes, no validation leakage;
- `bootstrap`: seeded bias-corrected percentile intervals from per-sample results;
- `spread`: whole problems spread over ranks, results gathered identically at any world size.

None of it imports Lightning: `distprobe.callbacks.OnlineRidge` and the probing service are adapters over it.
"""

from distprobe.convex.bootstrap import Interval, bootstrap_interval
from distprobe.convex.episodes import ClassMembers, Episode, draw_episode, draw_episodes
from distprobe.convex.fewshot import (
    EpisodeResult,
    FewshotRows,
    ShotsSummary,
    run_fewshot,
    solve_episode,
    summarise,
)
from distprobe.convex.logreg import DINOV3_C_GRID, LinearModel, LogregResult, Standardizer, fit_logreg, logreg_grid
from distprobe.convex.online import RidgeProbe
from distprobe.convex.ridge import RidgeSolution, RidgeStatistics, fit_ridge, solve_centred
from distprobe.convex.ridge_config import DEFAULT_L2, RidgeConfig, RidgeSpec

__all__ = [
    "DEFAULT_L2",
    "DINOV3_C_GRID",
    "ClassMembers",
    "Episode",
    "EpisodeResult",
    "FewshotRows",
    "Interval",
    "LinearModel",
    "LogregResult",
    "RidgeConfig",
    "RidgeProbe",
    "RidgeSolution",
    "RidgeSpec",
    "RidgeStatistics",
    "ShotsSummary",
    "Standardizer",
    "bootstrap_interval",
    "draw_episode",
    "draw_episodes",
    "fit_logreg",
    "fit_ridge",
    "logreg_grid",
    "run_fewshot",
    "solve_centred",
    "solve_episode",
    "summarise",
]
