"""The demo's terminal output: one table row per epoch, Lightning's routine notices kept out of it, the final summary.

The demo is a command-line program, so unlike the rest of the library it writes to stdout; every line goes through
`write_line`, which writes above Lightning's progress bar when one is shown.
"""

from __future__ import annotations

import logging
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar
from torch import nn
from typing_extensions import override

from distprobe import keys
from distprobe.demo.eval import OfflineComparison, OfflineScores

QUIET_INFO = (
    "GPU available: ",
    "TPU available: ",
    "💡 Tip: ",
    "`Trainer(limit_train_batches=1.0)` was configured so 100% of the batches",
    "`Trainer.fit` stopped: `max_epochs=",
    "Loading `train_dataloader` to estimate number of stepping batches.",
)
"""Starts of Lightning's info messages that `quiet_lightning` drops: true of every demo run, and noise in its output
(``max_epochs`` because the table's rows already say which epoch ended the run; the loading note because it is
the probes' and the cosine schedule's routine look at the loader's length)."""

QUIET_WARNINGS = (
    # The demo runs as one process (or as DDP processes Lightning starts itself): srun is not how it is meant to run.
    r"The `srun` command is available on your system but is not used",
    # The digits are in memory: loader workers would only add start-up time.
    r"The '\w+' does not have many workers",
    # Lightning 2.6's own use of a torch 2.10+ deprecation (lightning/pytorch/utilities/_pytree.py), not the user's.
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)
"""Regular expressions of the warnings `quiet_lightning` ignores (matched at the start of the message)."""

RANK_ZERO_LOGGER = "lightning.pytorch.utilities.rank_zero"
"""The logger of Lightning's ``rank_zero_info`` (``lightning.pytorch.utilities.rank_zero`` sets it)."""


class _DropMessages(logging.Filter):
    def __init__(self, starts: tuple[str, ...]) -> None:
        super().__init__()
        self.starts = starts

    @override
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Drop the Lightning notices of `QUIET_INFO` and `QUIET_WARNINGS` inside the block; all others still show.

    A user reads them as something the demo got wrong. Only these messages are dropped, and only inside the block:
    the filter is removed and the warning filters restored on exit.
    """
    rank_zero_log = logging.getLogger(RANK_ZERO_LOGGER)
    drop = _DropMessages(QUIET_INFO)
    rank_zero_log.addFilter(drop)
    try:
        with warnings.catch_warnings():
            for pattern in QUIET_WARNINGS:
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        rank_zero_log.removeFilter(drop)


def write_line(line: str, trainer: pl.Trainer | None = None) -> None:
    """Write one line of the demo's output to stdout, above the progress bar of `trainer` when it shows one.

    tqdm clears its bar, writes the line and draws the bar again below it; a plain write would land in the middle
    of the bar's line.
    """
    bar = trainer.progress_bar_callback if trainer is not None else None
    if isinstance(bar, TQDMProgressBar) and bar.is_enabled:
        bar.print(line)
        return
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


OfflineEval = Callable[[nn.Module], OfflineScores]
"""The LightningModule to the offline scores of its current features."""


class EpochTable(pl.Callback):
    """Writes one line per epoch to stdout on global rank 0: the demo's own terminal output.

    The line is written at the end of the training epoch, not of its validation: Lightning validates inside the
    training epoch, before it reduces the epoch's ``on_epoch`` values, so at validation end ``train/ssl_loss_epoch``
    does not exist yet (the first row read NaN and every later one the previous epoch's loss). As before, only an
    epoch that was validated gets a row. Every rank reads the metrics, since reducing a ``sync_dist`` value is a
    collective.

    Every ``offline_every`` epochs and after the last one, rank 0 also evaluates the current features offline
    (`distprobe.demo.eval.offline_eval`: what the online probes estimate) and shows it in the row's last columns;
    the other ranks go on to the next step and wait for it there. The scores are also logged as
    ``offline/logreg_top1`` and ``offline/knn20_top1``.

    Args:
        offline: the module to its offline scores; None: no offline columns.
        offline_every: epochs between offline evaluations (0: never).
    """

    COLUMNS = ("epoch", "ssl_loss", "linear_loss", "linear_top1", "mlp_top1", "seconds")
    OFFLINE_COLUMNS = ("off_logreg", "off_knn20")

    def __init__(self, offline: OfflineEval | None = None, offline_every: int = 0) -> None:
        self.rows: list[dict[str, float]] = []
        """Every rank's rows: the epoch, its SSL loss, the probes' figures and the seconds since the start."""
        self._offline_scores: dict[int, OfflineScores] = {}
        self.offline = offline if offline_every > 0 else None
        self.offline_every = offline_every
        self._start = time.monotonic()
        self._validated_epoch: int | None = None

    def columns(self) -> tuple[str, ...]:
        """The printed columns."""
        return self.COLUMNS + (self.OFFLINE_COLUMNS if self.offline is not None else ())

    def _offline_due(self, trainer: pl.Trainer) -> bool:
        epoch = trainer.current_epoch
        return self.offline is not None and ((epoch + 1) % self.offline_every == 0 or epoch + 1 == trainer.max_epochs)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validated_epoch = trainer.current_epoch

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._validated_epoch != trainer.current_epoch:  # e.g. an epoch that a preemption stopped early
            return
        m = trainer.callback_metrics

        def value(key: str) -> float:
            return float(m[key]) if key in m else math.nan

        row = {
            "epoch": trainer.current_epoch,
            "ssl_loss": value("train/ssl_loss_epoch"),  # the model's own key (`distprobe.demo.model.SimCLR`)
            "linear_loss": value(keys.key(keys.TRAIN, "linear", keys.LOSS)),
            "linear_top1": value(keys.key(keys.EVAL, "linear", "top1")),
            "mlp_top1": value(keys.key(keys.EVAL, "mlp", "top1")),
        }
        offline = None
        if trainer.is_global_zero and self._offline_due(trainer):
            offline = self._evaluate_offline(trainer, pl_module)
        row["seconds"] = time.monotonic() - self._start
        self.rows.append(row)
        if not trainer.is_global_zero:
            return
        if len(self.rows) == 1:
            write_line(" | ".join(f"{c:>11}" for c in self.columns()), trainer)
        cells = [f"{row[c]:>11.4f}" if c != "epoch" else f"{row[c]:>11d}" for c in self.COLUMNS]
        if self.offline is not None:
            cells += [f"{offline.logreg_top1:>11.4f}", f"{offline.knn_top1:>11.4f}"] if offline else [" " * 11] * 2
        write_line(" | ".join(cells).rstrip(), trainer)

    def _evaluate_offline(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> OfflineScores:
        assert self.offline is not None
        scores = self.offline(pl_module)
        self._offline_scores[trainer.current_epoch] = scores
        if trainer.logger is not None:
            # The logger directly, not pl_module.log: only rank 0 evaluates, and a logged value is every rank's.
            metrics = {"offline/logreg_top1": scores.logreg_top1, "offline/knn20_top1": scores.knn_top1}
            trainer.logger.log_metrics(metrics, step=trainer.global_step)
        return scores

    @property
    def offline_rows(self) -> list[dict[str, float | None]]:
        """Rank 0's offline evaluations, in order, for JSON: ``epoch``, then `OfflineScores.as_dict`'s numbers."""
        return [{"epoch": epoch, **scores.as_dict()} for epoch, scores in self._offline_scores.items()]

    def offline_at(self, epoch: int) -> OfflineScores | None:
        """The offline scores this table computed after `epoch`, if it did."""
        return self._offline_scores.get(epoch)


def summary_lines(
    comparison: OfflineComparison,
    *,
    trained_label: str,
    n_train: int,
    n_test: int,
    online: Mapping[str, float],
) -> list[str]:
    """The demo's closing block: the final features evaluated offline beside the baselines and the online probes.

    Args:
        comparison: the trained features' scores and the baselines'.
        trained_label: what the trained row is (e.g. ``SimCLR backbone, epoch 59``).
        n_train: samples the offline models were fitted on.
        n_test: samples they were scored on.
        online: the online probes' last validation top-1 by probe name.
    """
    mean = comparison.random_init_mean()
    each = ", ".join(f"{s.logreg_top1:.4f}/{s.knn_top1:.4f}" for s in comparison.random_init)
    rows = [
        (trained_label, comparison.trained, f"C={comparison.trained.c:g}"),
        (f"random-init backbone, mean of {len(comparison.random_init)}", mean, f"each: {each}"),
        ("raw pixels", comparison.raw_pixels, f"C={comparison.raw_pixels.c:g}"),
    ]
    width = max(len(label) for label, _, _ in rows) + 2
    lines = [
        "",
        f"offline evaluation of frozen features, top-1 on the {n_test} validation digits: a logistic regression",
        f"(standardised features, C tuned by 3-fold CV on the {n_train} labeled training digits) and a cosine kNN-20",
        f"  {'features':<{width}}{'logreg':>8}{'kNN-20':>9}",
    ]
    lines += [f"  {label:<{width}}{s.logreg_top1:>8.4f}{s.knn_top1:>9.4f}   {note}" for label, s, note in rows]
    probes = ", ".join(f"{name} {top1:.4f}" for name, top1 in sorted(online.items()))
    lines.append(f"  online probes' last validation top-1: {probes}")
    lines.append(verdict(comparison, n_test))
    return lines


def verdict(comparison: OfflineComparison, n_test: int) -> str:
    """One plain sentence: did self-supervised training beat a random initialisation of the same network?"""
    trained, mean, raw = comparison.trained, comparison.random_init_mean(), comparison.raw_pixels

    def points(a: float, b: float) -> str:
        return f"{100 * (a - b):+.1f}"

    gains = (
        f"{points(trained.logreg_top1, mean.logreg_top1)} points (logreg) and "
        f"{points(trained.knn_top1, mean.knn_top1)} (kNN-20) against their mean"
    )
    raw_gains = f"{points(trained.logreg_top1, raw.logreg_top1)} and {points(trained.knn_top1, raw.knn_top1)}"
    digit = f"one validation digit is {100 / n_test:.2f} points"
    inits = f"{len(comparison.random_init)} random initialisations of the same network"
    if comparison.beats_random_init():
        return (
            f"verdict: self-supervised training helped. The trained features score above each of the {inits} on "
            f"both evaluations, {gains}; against raw pixels {raw_gains} ({digit})."
        )
    if comparison.above_random_init_mean():
        return (
            f"verdict: no clear gain from self-supervised training yet. The trained features score above the mean of "
            f"the {inits} ({gains}) but not above each of them; against raw pixels {raw_gains} ({digit})."
        )
    return (
        f"verdict: self-supervised training did NOT beat the {inits} here: {gains}; against raw pixels "
        f"{raw_gains} ({digit}). A rise of the online probes is then the probes learning, not the features "
        "improving."
    )
