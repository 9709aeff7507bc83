"""Few-shot protocols: reproducible episodes, ridge and logistic-regression solvers, no validation leakage (torch only).

An episode takes ``shots`` training samples of every class; which ones depends on ``(seed, shots, class)`` alone
(`distprobe.convex.episodes`). What every episode reads of the two sets, the training rows that may be drawn
grouped by class and the validation rows that count, is found once (`FewshotRows`), not once per episode.

A solver's regularisation is either one fixed value or chosen by cross-validation inside the episode's own shots;
the validation set only scores the final fit (CLIP_benchmark #125 and openai/CLIP #128 tuned it on validation).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Literal

import torch
import torch.distributed as dist

from distprobe.convex.episodes import ClassMembers, Episode, draw_episodes
from distprobe.convex.logreg import LinearModel, Standardizer, fit_logreg
from distprobe.convex.one_or_many import one_or_many
from distprobe.convex.ridge import fit_ridge
from distprobe.convex.spread import gather_rows, my_share
from distprobe.convex.usable import CountedResults, usable_rows

Solver = Literal["ridge", "logreg"]
SOLVERS: tuple[Solver, ...] = ("ridge", "logreg")
#: Cross-validation folds inside an episode at most (fewer when there are fewer shots).
MAX_FOLDS = 5


def _regularisation(solver: Solver, reg: float | Sequence[float]) -> list[float]:
    """The candidate values, most regularised first (so a tie keeps the most regularised)."""
    given = one_or_many("fewshot", "reg", reg, example="[0.001, 0.01, 0.1]")
    if solver not in SOLVERS:
        raise ValueError(f"fewshot: solver={solver!r}; expected one of {list(SOLVERS)}")
    numbers = all(
        (isinstance(v, Real) or getattr(v, "ndim", None) == 0) and not isinstance(v, bool | str) for v in given
    )
    values = [float(v) for v in given] if numbers else []
    bad = [v for v in values if not (v > 0 if solver == "logreg" else v >= 0) or not math.isfinite(v)]
    if not values or bad:
        what = "C > 0 (scikit-learn's C)" if solver == "logreg" else "l2 >= 0"
        raise ValueError(f"fewshot: reg={reg!r} for solver {solver!r}; expected one value or a list, each {what}")
    # ridge: a larger lambda regularises more; logreg: a smaller C does.
    return sorted(set(values), reverse=solver == "ridge")


def _fit_predict(
    solver: Solver,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    num_classes: int,
    values: list[float],
) -> torch.Tensor:
    """``(len(values), B)``: predictions on ``test_x`` of one fit per value on ``(train_x, train_y)``."""
    if solver == "ridge":
        return fit_ridge(train_x, train_y, num_classes, values).predict(test_x)
    scaler = Standardizer.fit(train_x)
    fit_x, test = scaler(train_x), scaler(test_x)
    model: LinearModel | None = None
    out = []
    for value in sorted(values):  # warm start from the most regularised end
        model = fit_logreg(fit_x, train_y, num_classes, value, init=model)
        out.append((value, model.predict(test)))
    by_value = dict(out)
    return torch.stack([by_value[v] for v in values])


def choose_regularisation(
    solver: Solver, x: torch.Tensor, y: torch.Tensor, episode: Episode, num_classes: int, values: list[float]
) -> float:
    """The value with the best cross-validated accuracy inside the episode's shots (ties: the most regularised)."""
    if len(values) == 1:
        return values[0]
    if episode.shots < 2:
        raise ValueError(
            f"fewshot: {episode.id}: choosing the regularisation needs >= 2 shots per class to cross-validate inside "
            f"the episode (never on validation); pass one fixed value for 1-shot episodes"
        )
    num_folds = min(episode.shots, MAX_FOLDS)
    fold = episode.folds(num_folds).to(x.device)
    correct = torch.zeros(len(values), dtype=torch.float64)
    for k in range(num_folds):
        held = fold == k
        predictions = _fit_predict(solver, x[~held], y[~held], x[held], num_classes, values)
        correct += (predictions == y[held]).double().sum(1).cpu()
    return values[int(torch.argmax(correct))]


@dataclass(frozen=True)
class EpisodeResult(CountedResults):
    """One episode's outcome on the validation set."""

    id: str
    shots: int
    seed: int
    reg: float
    """The regularisation used (fixed, or chosen inside the shots)."""
    val_correct: torch.Tensor
    """``(N_val,)`` bool: each validation sample classified right (False where not counted)."""
    val_counted: torch.Tensor | None = None
    """``(N_val,)`` bool: the validation samples counted (finite features, a label in range); None: all of them."""

    @property
    def top1(self) -> float:
        """Accuracy on the counted validation samples."""
        return self.counted_accuracy


def solve_episode(
    episode: Episode,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    num_classes: int,
    *,
    solver: Solver,
    reg: float | Sequence[float],
    val_counted: torch.Tensor | None = None,
) -> EpisodeResult:
    """Fit ``solver`` on the episode's shots (choosing ``reg`` inside them when several are given); score on val.

    A validation sample with a non-finite feature or a label outside ``[0, num_classes)`` is not counted;
    ``val_counted`` gives those rows when the caller found them once for many episodes (`FewshotRows`).
    """
    values = _regularisation(solver, reg)
    index = episode.indices.to(train_x.device)
    x, y = train_x[index], train_y[index].long()
    chosen = choose_regularisation(solver, x, y, episode, num_classes, values)
    counted = usable_rows(val_x, val_y, num_classes) if val_counted is None else val_counted.to(val_x.device)
    safe = torch.nan_to_num(val_x.to(torch.float64), nan=0.0, posinf=0.0, neginf=0.0)
    predictions = _fit_predict(solver, x, y, safe, num_classes, [chosen])[0]
    correct = (predictions == val_y.reshape(-1).long()) & counted
    return EpisodeResult(episode.id, episode.shots, episode.seed, chosen, correct.cpu(), counted.cpu())


@dataclass(frozen=True)
class FewshotRows:
    """What every episode reads of a training and a validation set, found once (`find`) for many `run_fewshot` calls.

    Found again for each episode, they cost a pass over all the features per episode: the training rows that may be
    drawn (finite features, a label in range), grouped by class, and the validation rows that count.
    """

    drawable: ClassMembers
    """The training rows an episode may draw, by class (a NaN row would break the fit)."""
    val_counted: torch.Tensor
    """``(N_val,)`` bool: the validation rows counted (finite features, a label in range)."""

    @classmethod
    def find(
        cls, train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor, num_classes: int
    ) -> FewshotRows:
        """The drawable training rows and the counted validation rows of the four tensors."""
        # Rows that may not be drawn get no class: the others' episodes are the same as without them.
        labels = torch.where(usable_rows(train_x, train_y, num_classes), train_y.reshape(-1).long(), -1)
        return cls(ClassMembers.of(labels, num_classes), usable_rows(val_x, val_y, num_classes))

    def check_fits(self, val_y: torch.Tensor, num_classes: int) -> None:
        """Refuse rows found for another ``num_classes`` or a validation set of another size (raises ValueError)."""
        found = self.drawable.num_classes, self.val_counted.numel()
        if found != (num_classes, val_y.numel()):
            raise ValueError(
                f"fewshot: argument 'rows' holds rows of num_classes={found[0]} and {found[1]} validation samples; "
                f"the sets have num_classes={num_classes} and {val_y.numel()}; pass FewshotRows.find(train_x, "
                "train_y, val_x, val_y, num_classes) of these same sets, or rows=None"
            )


def run_fewshot(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    num_classes: int,
    *,
    shots: int | Sequence[int],
    seeds: int | Sequence[int],
    solver: Solver,
    reg: float | Sequence[float],
    skip: Iterable[str] = (),
    group: dist.ProcessGroup | None = None,
    rows: FewshotRows | None = None,
) -> list[EpisodeResult]:
    """Every episode not in ``skip`` (ids already done), spread over the ranks of ``group``; all results on every rank.

    Every rank must hold the same train and val sets. Each rank solves whole episodes; the results are gathered with
    one sum, so they are the same at any world size. ``shots=5`` is ``shots=[5]``. Episodes are drawn among the
    training samples with finite features and a label in range (a NaN row would break the fit); a validation sample
    without them is not counted. A caller that runs a few episodes at a time finds those rows once
    (``rows=FewshotRows.find(...)`` of the same sets) and passes them to every call; None: found here.
    """
    given = one_or_many("fewshot", "shots", shots, example="[1, 5, 10]")
    shot_counts = list(dict.fromkeys(int(s) for s in given))  # a repeat would solve an episode twice
    # Fail before any work, on every rank alike (one rank raising inside its share would leave the others waiting).
    if len(_regularisation(solver, reg)) > 1 and min(shot_counts, default=2) < 2:
        raise ValueError(
            f"fewshot: shots={shot_counts} with reg={reg!r}: choosing the regularisation needs >= 2 shots per class "
            f"to cross-validate inside each episode (never on validation); pass one fixed value, or drop 1-shot"
        )
    if rows is None:
        rows = FewshotRows.find(train_x, train_y, val_x, val_y, num_classes)
    rows.check_fits(val_y, num_classes)
    todo = draw_episodes(rows.drawable, num_classes, shot_counts, seeds, skip=set(skip))
    # On the data's device: NCCL reduces CUDA tensors only.
    results = torch.zeros(len(todo), 1 + val_y.numel(), dtype=torch.float64, device=val_y.device)
    sets = (train_x, train_y, val_x, val_y, num_classes)
    for position in my_share(len(todo), group):
        result = solve_episode(todo[position], *sets, solver=solver, reg=reg, val_counted=rows.val_counted)
        results[position, 0] = result.reg
        results[position, 1:] = result.val_correct.to(results.device).double()
    results = gather_rows(results, group).cpu()
    counted = rows.val_counted.cpu()
    return [
        EpisodeResult(e.id, e.shots, e.seed, float(row[0]), row[1:] > 0.5, counted)
        for e, row in zip(todo, results, strict=True)
    ]


def with_counted(result: EpisodeResult, counted: torch.Tensor) -> EpisodeResult:
    """``result`` scored on the validation samples ``counted`` (an episode read back from a file knows none)."""
    return dataclasses.replace(result, val_correct=result.val_correct & counted, val_counted=counted)


@dataclass(frozen=True)
class ShotsSummary:
    """Accuracy over the seeds of one shot count: the mean and the standard deviation (n - 1; 0 for one seed)."""

    shots: int
    mean: float
    std: float
    seeds: int


def summarise(results: Iterable[EpisodeResult]) -> list[ShotsSummary]:
    """One `ShotsSummary` per shot count, in increasing shots."""
    by_shots: dict[int, list[float]] = {}
    for result in results:
        by_shots.setdefault(result.shots, []).append(result.top1)
    out = []
    for shots in sorted(by_shots):
        values = torch.tensor(by_shots[shots], dtype=torch.float64)
        std = float(values.std(unbiased=True)) if values.numel() > 1 else 0.0
        out.append(ShotsSummary(shots, float(values.mean()), std, values.numel()))
    return out
