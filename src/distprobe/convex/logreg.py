"""Multinomial logistic regression by float64 L-BFGS, and DINOv2/v3's protocol over a grid of C (torch only).

The objective is scikit-learn's, so a C means the same in both: ``C * sum_i CE(x_i W + b, y_i) + ||W||^2 / 2`` with
the bias unpenalised (`fit_logreg` minimises it divided by ``C n``, the same minimiser, better scaled for L-BFGS).

`logreg_grid` runs the protocol: features standardised; C chosen on a held-out share of train (a hashed tenth by
default, as DINOv2/v3 do without a validation set), never on the reported set; the chosen C refitted on all of train
and reported on val. The grid is cut into fixed chains of consecutive C values; a rank fits whole chains, each
warm-started along the chain from the most regularised end, so a fit is the same whichever rank runs it and the
results are the same at any world size.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from distprobe.convex.one_or_many import one_or_many
from distprobe.convex.spread import gather_rows, my_share
from distprobe.convex.usable import CountedResults, usable_rows
from distprobe.engine.collectives import rank_and_world

log = logging.getLogger(__name__)

#: DINOv3's grid of C: 45 values log-spaced from 1e-6 to 1e5.
DINOV3_C_GRID: tuple[float, ...] = tuple(float(c) for c in torch.logspace(-6, 5, 45, dtype=torch.float64))

_GOLDEN = 2654435761  # Knuth's multiplicative hash, as in bank/selection.py: the held-out share spans every class
_SPAN = 2**32


@dataclass(frozen=True)
class LinearModel:
    """A linear classifier: ``scores = x W + b``, ``weight`` ``(D, C)``, ``bias`` ``(C,)``."""

    weight: torch.Tensor
    bias: torch.Tensor

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """``(B,)`` the class with the largest score."""
        return (features.to(self.weight) @ self.weight + self.bias).argmax(-1)


@dataclass(frozen=True)
class Standardizer:
    """Per-feature mean and standard deviation of a training set; `__call__` standardises any set with them."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def fit(cls, features: torch.Tensor) -> Standardizer:
        """The statistics of ``features`` ``(N, D)`` in float64; constant features keep a scale of 1."""
        x = features.to(torch.float64)
        std = x.std(0, unbiased=False)
        return cls(x.mean(0), torch.where(std > 1e-12, std, torch.ones_like(std)))

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """``features`` standardised, float64."""
        return (features.to(torch.float64) - self.mean) / self.std


def held_out(num_samples: int, fraction: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """``(N,)`` bool: the hashed share of train (by position) that chooses C; the same for any world size."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"logreg: holdout={fraction}; expected a fraction in (0, 1), e.g. 0.1")
    positions = torch.arange(num_samples, dtype=torch.long, device=device)
    return (positions * _GOLDEN) % _SPAN < int(fraction * _SPAN)


def fit_logreg(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    c: float,
    *,
    init: LinearModel | None = None,
    max_iter: int = 1000,
    tolerance: float = 1e-10,
) -> LinearModel:
    """Minimise scikit-learn's multinomial objective at ``c`` by L-BFGS in float64, from ``init`` or zeros.

    Args:
        features: ``(N, D)``, standardised by the caller where that is wanted.
        labels: ``(N,)`` integer classes in ``[0, num_classes)``.
        num_classes: C.
        c: The inverse regularisation strength (scikit-learn's ``C``).
        init: A warm start (the neighbouring C's solution).
        max_iter: L-BFGS iterations at most.
        tolerance: Stop when the largest gradient entry or the change of the objective falls below it.
    """
    if not c > 0:
        raise ValueError(f"logreg: C={c}; expected C > 0 (scikit-learn's inverse regularisation strength)")
    x = features.to(torch.float64)
    y = labels.to(x.device).long()
    n, dim = x.shape
    weight = torch.zeros(dim, num_classes, dtype=torch.float64, device=x.device)
    bias = torch.zeros(num_classes, dtype=torch.float64, device=x.device)
    if init is not None:
        weight.copy_(init.weight)
        bias.copy_(init.bias)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    penalty = 1.0 / (2.0 * c * n)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=tolerance,
        tolerance_change=tolerance * 1e-2,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight + bias, y) + penalty * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return LinearModel(weight.detach(), bias.detach())


@dataclass(frozen=True)
class LogregResult(CountedResults):
    """The protocol's outcome: the grid's held-out accuracies, the chosen C and the refitted model's val results."""

    c_grid: tuple[float, ...]
    holdout_top1: torch.Tensor
    """``(len(c_grid),)``: each C's accuracy on the held-out share of train."""
    best_c: float
    val_correct: torch.Tensor
    """``(N_val,)`` bool: each validation sample classified right by the refitted model (for intervals)."""
    model: LinearModel
    """Over all ``num_classes``; a class absent from train has weight 0 and bias -inf (never predicted)."""
    standardizer: Standardizer
    val_counted: torch.Tensor | None = None
    """``(N_val,)`` bool: the validation samples counted (finite features, a label in range); None: all of them."""
    skipped_train: int = 0
    """Training samples left out for bad data (a non-finite feature, a label out of range)."""

    @property
    def val_top1(self) -> float:
        """The refitted model's accuracy on the counted validation samples."""
        return self.counted_accuracy


def _widened(model: LinearModel, present: torch.Tensor, num_classes: int) -> LinearModel:
    """``model`` over the classes ``present`` as one over all ``num_classes``: an absent class is never predicted."""
    if present.numel() == num_classes:
        return model
    weight = model.weight.new_zeros(model.weight.shape[0], num_classes)
    weight[:, present.to(weight.device)] = model.weight
    bias = model.bias.new_full((num_classes,), -math.inf)
    bias[present.to(bias.device)] = model.bias
    return LinearModel(weight, bias)


def _chains(num_values: int, chain: int) -> list[range]:
    return [range(start, min(start + chain, num_values)) for start in range(0, num_values, chain)]


def logreg_grid(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    num_classes: int,
    *,
    c_grid: float | Sequence[float] = DINOV3_C_GRID,
    holdout: float = 0.1,
    chain: int = 5,
    group: dist.ProcessGroup | None = None,
    max_iter: int = 1000,
) -> LogregResult:
    """DINOv2/v3's logistic-regression protocol over ``c_grid``, spread over the ranks of ``group``.

    Every rank must hold the same train and val sets (the service reads them from one cache). The validation labels
    are used once, to score the refitted model: no choice reads them. A training sample with a non-finite feature or
    a label outside ``[0, num_classes)`` is left out (counted in ``skipped_train``); a validation sample with one is
    not counted (``val_counted``).
    """
    # c_grid=0.5 (or a 0-d tensor): a grid of one value.
    grid = tuple(sorted(float(c) for c in one_or_many("logreg", "c_grid", c_grid, example="[0.01, 1.0, 100.0]")))
    # Checked here, on every rank alike: a C refused inside one rank's share would leave the others waiting.
    if not grid or chain < 1 or not all(math.isfinite(c) and c > 0 for c in grid):
        raise ValueError(
            f"logreg: c_grid={c_grid!r}, chain={chain}; expected one or more finite C values > 0 and chain >= 1"
        )
    usable = usable_rows(train_features, train_labels, num_classes)
    skipped = int((~usable).sum())
    if skipped and rank_and_world(group)[0] == 0:  # every rank holds the same set: one warning, not one per rank
        log.warning(
            "logreg: %d of %d training samples have a non-finite feature or a label outside [0, %d); left out",
            skipped,
            usable.numel(),
            num_classes,
        )
    if skipped:
        if skipped == usable.numel():
            raise ValueError(
                f"logreg: every one of the {skipped} training samples has a non-finite feature or a label outside "
                f"[0, {num_classes}); expected finite features and labels in range (is num_classes={num_classes} "
                "right?)"
            )
        train_features, train_labels = train_features[usable], train_labels[usable]
    held = held_out(train_features.shape[0], holdout, train_features.device)
    if bool(held.all()):  # one sample: the first position is always held out, and nothing would be fitted
        raise ValueError(
            f"logreg: {train_features.shape[0]} training sample(s) all fall in the held-out share that chooses C "
            f"(holdout={holdout}); expected at least 2 training samples"
        )
    # Fitted over the classes train holds, as scikit-learn does: a class absent from train has no samples to fit,
    # and its unpenalised bias would only drift towards -inf for every iteration L-BFGS allows (a 20-class fit of
    # 10 present classes took 3 times as long). Labels are renumbered 0..k-1 here and the model widened at the end.
    present = torch.unique(train_labels.reshape(-1).long())
    compact = torch.full((num_classes,), -1, dtype=torch.long, device=present.device)
    compact[present] = torch.arange(present.numel(), device=present.device)
    labels = compact[train_labels.reshape(-1).long()]
    fit_x, fit_y = train_features[~held], labels[~held]
    choose_x, choose_y = train_features[held], labels[held]
    scaler = Standardizer.fit(fit_x)
    fit_x, choose_x = scaler(fit_x), scaler(choose_x)

    chains = _chains(len(grid), chain)
    holdout_top1 = torch.zeros(len(grid), dtype=torch.float64, device=train_features.device)
    for index in my_share(len(chains), group):
        model: LinearModel | None = None
        for position in chains[index]:
            model = fit_logreg(fit_x, fit_y, present.numel(), grid[position], init=model, max_iter=max_iter)
            holdout_top1[position] = (model.predict(choose_x) == choose_y.to(choose_x.device)).double().mean()
    holdout_top1 = gather_rows(holdout_top1, group)
    # The first best wins: the most regularised of equally accurate values.
    best_c = grid[int(torch.argmax(holdout_top1))]

    full_scaler = Standardizer.fit(train_features)
    fitted = fit_logreg(full_scaler(train_features), labels, present.numel(), best_c, max_iter=max_iter)
    model = _widened(fitted, present, num_classes)
    counted = usable_rows(val_features, val_labels, num_classes)
    safe = torch.nan_to_num(val_features.to(torch.float64), nan=0.0, posinf=0.0, neginf=0.0)
    val_correct = (model.predict(full_scaler(safe)) == val_labels.reshape(-1).to(safe.device)) & counted
    return LogregResult(grid, holdout_top1.cpu(), best_c, val_correct.cpu(), model, full_scaler, counted.cpu(), skipped)
