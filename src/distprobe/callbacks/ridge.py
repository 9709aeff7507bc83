"""`OnlineRidge`: a closed-form ridge probe in a Lightning Trainer, exact under data parallelism.

Which validation samples choose the best lambda (the hashed selection split, `distprobe.bank.selection.selects`)
follows each sample's position in its own validation dataloader (`distprobe.callbacks.selection.SelectsOnSplit`),
so that the same samples choose at any world size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from distprobe.callbacks.base import Stage
from distprobe.callbacks.flat_input import FlatInputCallback
from distprobe.callbacks.own_data import FeatureFn
from distprobe.callbacks.selection import SelectsOnSplit
from distprobe.convex.online import DEFAULT_L2, RidgeConfig, RidgeProbe

# Re-exported: tests/convex/test_ridge_selection_positions.py imports them from here.


class OnlineRidge(FlatInputCallback, SelectsOnSplit):
    """Ridge regression on one-hot labels, solved exactly for every lambda at each validation from summed statistics.

    Each rank sums, in float64 over the current epoch's training batches, the count, the feature and label sums,
    X^T X and X^T Y. At validation one flat all-reduce sums them over the data-parallel group and each lambda's
    ``min (1/n)||XW + 1b - Y||^2 + lambda ||W||^2`` (bias unpenalised) is solved from one eigendecomposition.
    No learning rate, no optimizer, nothing gathered: memory is O(D^2 + DC) per rank. Features are read as
    `OnlineProbe` reads them (output or batch keys, submodule taps, DTensors, ZeRO-3 activations).

    Args:
        module: The LightningModule to probe (None: taken at ``setup``); kept for the reference API's shape.
        name: Unique name; keys logs and checkpoint state.
        input: Key of the features in the step's outputs or batch, or a submodule to tap, as for `OnlineProbe`.
        target: Key of the class labels.
        num_classes: Number of classes.
        l2: The values of lambda (each solved exactly).
        selection_fraction: The hashed share of validation samples that chooses the best lambda; the rest reports it.
            A sample's share follows its position in its validation dataloader (`SelectsOnSplit`).
        in_features: Feature size; None: read from the first training batch.
        data: The probe's own labeled training DataLoader (docs/own-data.md), sharded over the data-parallel ranks.
        val_data: Its own labeled validation DataLoader.
        every_n_steps: With ``data``: sum one own batch every this many main training batches.
        features: With ``data``: ``features(pl_module, batch) -> tensor``, run under no_grad in eval mode.

    Logs ``eval/{name}/l2={l2:g}_top1`` for each lambda over every validation sample once (a distributed sampler's
    padding is not counted), ``eval/{name}_best_top1`` (the best lambda on the selection split, scored on the rest),
    ``eval/{name}_best_l2``, and ``train/{name}_bad_batches/{reason}`` (training batches skipped for bad data).

    Example:
        >>> ridge = OnlineRidge(None, "ridge", input="embedding", target="label", num_classes=10, l2=(1e-3, 1.0))
        >>> ridge.config.l2
        (0.001, 1.0)
    """

    engine_type = RidgeProbe
    kind = "ridge"
    holds = "statistics do"

    def __init__(
        self,
        module: pl.LightningModule | None,
        name: str,
        input: str,  # noqa: A002 - the reference API's name
        target: str,
        num_classes: int,
        l2: Sequence[float] = DEFAULT_L2,
        *,
        selection_fraction: float = 0.2,
        in_features: int | None = None,
        data: Any = None,
        val_data: Any = None,
        every_n_steps: int = 1,
        features: FeatureFn | None = None,
    ) -> None:
        # The callback starts the statistics at each training epoch, not the set after each evaluation: a validation
        # inside an epoch, or a resume inside it, keeps the epoch's sums.
        super().__init__(RidgeConfig, locals(), reset_statistics="by_owner")

    @property
    def ridge(self) -> RidgeProbe:
        """The engine, typed: `FlatInputCallback.engine` (from ``setup``, a loaded state or the first batch)."""
        return self.engine

    # --- training: the coordinator adds each batch to this rank's statistics ------------------------------------

    @override
    def new_train_epoch(self) -> None:
        # A new epoch's statistics; a resume inside the epoch the checkpoint saved keeps them (the base decides).
        if self._engine is not None:
            self._engine.reset_train()

    # --- values: the coordinator's probe set computes them ------------------------------------------------------

    @override
    def takes_part(self, trainer: pl.Trainer, stage: Stage) -> bool:
        # The sanity check runs before any training batch of this fit (the same on every rank).
        return self._engine is not None and not (stage == "val" and trainer.sanity_checking)

    @override
    def start_eval_epoch(self) -> None:
        self.ridge.start_eval_epoch()  # a collective: the statistics' one all-reduce, then the solve

    @override
    def engine_eval_step(self, read: Any, num_valid: int | None) -> torch.Tensor | None:
        return self.evaluate_on_split(self.ridge, read, num_valid)

    @override
    def predicted_column(self) -> int:
        best = self.ridge.best_index
        return 0 if best is None else best  # the lambda chosen at the last evaluation

    # --- checkpoints --------------------------------------------------------------------------------------------

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        legacy_epoch = state_dict.pop("epoch", None)  # the ridge's own key before the base saved "train_epoch"
        if legacy_epoch is not None and "train_epoch" not in state_dict:
            state_dict["train_epoch"] = legacy_epoch
        super().load_state_dict(state_dict)
