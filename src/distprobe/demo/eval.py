"""The demo's offline evaluation: what the online probes estimate, measured on frozen features.

A multinomial logistic regression (features standardised, its inverse L2 strength ``C`` chosen by stratified 3-fold
cross-validation on the training split) and a cosine kNN-20, both scored top-1 on the held-out split. The same
evaluation of randomly initialised backbones and of the raw pixels says whether self-supervised training helped: on
8x8 digits both baselines are strong (a logistic regression on the 64 pixels scores about 0.97).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

C_GRID = (0.01, 0.1, 1.0, 10.0)
"""The logistic regression's inverse L2 strengths tried by cross-validation."""

Features = Callable[[torch.Tensor], torch.Tensor]
"""Images ``(n, ...)`` to features ``(n, ...)`` (flattened before the fit)."""


@dataclass(frozen=True)
class EvalSplits:
    """The labeled images the offline models are fitted on, and the held-out ones they are scored on."""

    train_images: torch.Tensor
    """Fitting set (cross-validation folds for ``C`` are taken from it)."""
    train_labels: torch.Tensor
    """Their classes, ``(n,)`` int."""
    test_images: torch.Tensor
    """Held-out set the scores are measured on."""
    test_labels: torch.Tensor
    """Their classes."""


@dataclass(frozen=True)
class OfflineScores:
    """Top-1 on the held-out split of one set of features."""

    logreg_top1: float
    """Logistic regression, ``C`` tuned by cross-validation on the training split."""
    knn_top1: float
    """Cosine kNN: the majority class of the ``k`` most similar training samples."""
    c: float
    """The ``C`` the cross-validation chose (NaN for a mean of several evaluations)."""

    def as_dict(self) -> dict[str, float | None]:
        """Plain numbers, for JSON: ``logreg_top1``, ``knn20_top1`` and ``c`` (None for a mean)."""
        return {
            "logreg_top1": self.logreg_top1,
            "knn20_top1": self.knn_top1,
            "c": None if math.isnan(self.c) else self.c,
        }


@dataclass(frozen=True)
class OfflineComparison:
    """The trained features' offline scores beside those of the baselines."""

    trained: OfflineScores
    """The trained backbone's features."""
    random_init: tuple[OfflineScores, ...]
    """Randomly initialised backbones of the same architecture, one per seed."""
    raw_pixels: OfflineScores
    """The flattened images themselves."""

    def random_init_mean(self) -> OfflineScores:
        """The mean over the random initialisations."""
        return OfflineScores(
            logreg_top1=float(np.mean([s.logreg_top1 for s in self.random_init])),
            knn_top1=float(np.mean([s.knn_top1 for s in self.random_init])),
            c=math.nan,
        )

    def beats_random_init(self) -> bool:
        """Whether the trained features score above every random initialisation, on both evaluations.

        Above each one rather than above their mean: on a few hundred test digits the inits differ by a point or
        more, and a gain inside that spread is not one.
        """
        return all(
            self.trained.logreg_top1 > s.logreg_top1 and self.trained.knn_top1 > s.knn_top1 for s in self.random_init
        )

    def above_random_init_mean(self) -> bool:
        """Whether the trained features score above the random initialisations' mean, on both evaluations."""
        mean = self.random_init_mean()
        return self.trained.logreg_top1 > mean.logreg_top1 and self.trained.knn_top1 > mean.knn_top1

    def as_dict(self) -> dict[str, object]:
        """Plain numbers, for JSON."""
        return {
            "trained": self.trained.as_dict(),
            "random_init_mean": self.random_init_mean().as_dict(),
            "random_init": [s.as_dict() for s in self.random_init],
            "raw_pixels": self.raw_pixels.as_dict(),
            "beats_random_init": self.beats_random_init(),
        }


def logistic_regression_top1(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    c_grid: Sequence[float] = C_GRID,
    folds: int = 3,
    seed: int = 0,
) -> tuple[float, float]:
    """Held-out top-1 of a standardised logistic regression whose ``C`` is chosen on the training split.

    Returns:
        The top-1 on ``test_x`` and the chosen ``C``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    search = GridSearchCV(
        make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
        {"logisticregression__C": list(c_grid)},
        cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
    )
    # One BLAS thread: the fits are small, and with the BLAS pools of scipy and torch both spinning on a shared
    # machine each fit took 2-10 s instead of 0.05 s (2 cores, load 6).
    with threadpool_limits(limits=1):
        search.fit(train_x, train_y)
    return float(search.score(test_x, test_y)), float(search.best_params_["logisticregression__C"])


def knn_top1(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *, k: int = 20) -> float:
    """Held-out top-1 of a cosine kNN: the majority class of the ``k`` most similar training samples."""
    train_n = train_x / np.linalg.norm(train_x, axis=1, keepdims=True).clip(1e-12)
    test_n = test_x / np.linalg.norm(test_x, axis=1, keepdims=True).clip(1e-12)
    nearest = np.argsort(-(test_n @ train_n.T), axis=1, kind="stable")[:, :k]
    votes = np.zeros((len(test_x), int(train_y.max()) + 1))
    np.add.at(votes, (np.arange(len(test_x))[:, None], train_y[nearest]), 1.0)
    return float((votes.argmax(axis=1) == test_y).mean())


def offline_eval(
    features_fn: Features, splits: EvalSplits, *, k: int = 20, c_grid: Sequence[float] = C_GRID, seed: int = 0
) -> OfflineScores:
    """Evaluate frozen features offline: a tuned logistic regression and a cosine kNN, top-1 on the test split.

    Args:
        features_fn: images to features; called under ``torch.no_grad``.
        splits: the images and labels to fit on and to score on.
        k: neighbours of the kNN.
        c_grid: the logistic regression's ``C`` values tried by 3-fold cross-validation on the training split.
        seed: seed of the cross-validation folds.

    Example:
        >>> from distprobe.demo import Digits
        >>> train, test = Digits("train"), Digits("val")
        >>> splits = EvalSplits(train.images, train.labels, test.images, test.labels)
        >>> offline_eval(lambda images: images, splits).logreg_top1 > 0.9  # raw pixels
        True
    """
    with torch.no_grad():
        train_x = features_fn(splits.train_images).flatten(1).double().cpu().numpy()
        test_x = features_fn(splits.test_images).flatten(1).double().cpu().numpy()
    train_y, test_y = splits.train_labels.cpu().numpy(), splits.test_labels.cpu().numpy()
    logreg, c = logistic_regression_top1(train_x, train_y, test_x, test_y, c_grid=c_grid, seed=seed)
    return OfflineScores(logreg_top1=logreg, knn_top1=knn_top1(train_x, train_y, test_x, test_y, k=k), c=c)


def frozen(module: nn.Module) -> Features:
    """`module` as a feature function: in eval mode (BatchNorm's running statistics), its mode restored after."""

    def features(images: torch.Tensor) -> torch.Tensor:
        was_training = module.training
        module.eval()
        try:
            return module(images.to(next(module.parameters()).device))
        finally:
            module.train(was_training)

    return features


def compare_with_baselines(
    trained: OfflineScores, random_backbones: Sequence[nn.Module], splits: EvalSplits
) -> OfflineComparison:
    """Evaluate the baselines as the trained features were: randomly initialised backbones and the raw pixels."""
    return OfflineComparison(
        trained=trained,
        random_init=tuple(offline_eval(frozen(backbone), splits) for backbone in random_backbones),
        raw_pixels=offline_eval(lambda images: images, splits),
    )
