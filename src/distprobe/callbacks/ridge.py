"""`OnlineRidge`: a closed-form ridge probe in a Lightning Trainer, exact under data parallelism.

Which validation samples choose the best lambda (the hashed selection split, `distprobe.bank.selection.selects`)
follows each sample's position in its own validation dataloader (`ValidationPositions`), so that the same samples
choose at any world size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from torch.utils.data import DistributedSampler
from typing_extensions import override

from distprobe.bank.selection import global_positions
from distprobe.callbacks.base import Stage
from distprobe.callbacks.flat_input import FlatInputCallback
from distprobe.callbacks.own_data import FeatureFn
from distprobe.convex.online import DEFAULT_L2, RidgeConfig, RidgeProbe
from distprobe.engine.collectives import rank_and_world
from distprobe.metrics.exact import dataloader_at

#: The `DistributedSampler` classes whose order the base class deals: torch's own, and Lightning's wrapper around a
#: user's sampler (which deals positions in that sampler's order). A subclass with its own ``__iter__`` may deal
#: another order, unknown here.
_BASE_ORDER = (DistributedSampler.__iter__, DistributedSamplerWrapper.__iter__)


def dealt_order(sampler: Any, device: torch.device) -> torch.Tensor | None:
    """The positions a `DistributedSampler` deals this rank this epoch, in order (padding repeats included).

    A position is an index into the sampler's dataset: the dataset index for torch's sampler, shuffled or not, the
    position in the wrapped sampler's order for Lightning's ``DistributedSamplerWrapper``. None for other samplers.

    Example:
        >>> dealt_order(DistributedSampler(range(5), num_replicas=2, rank=1, shuffle=False), torch.device("cpu"))
        tensor([1, 3, 0])
    """
    if not isinstance(sampler, DistributedSampler) or type(sampler).__iter__ not in _BASE_ORDER:
        return None
    # The base class's order is a function of (seed, epoch, dataset length) alone; the wrapper's own __iter__ would
    # first redraw the sampler it wraps, from the global RNG, and so change the training's shuffling.
    return torch.tensor(list(DistributedSampler.__iter__(sampler)), dtype=torch.long, device=device)


class ValidationPositions:
    """Each main validation sample's position, for the split that chooses the best lambda; per dataloader.

    - Under a `DistributedSampler` (Lightning's validation sampler under DDP, FSDP or DeepSpeed, shuffled or not, and
      its wrapper around a user's sampler): the index the sampler dealt the sample (`dealt_order`), so the same
      samples choose at any world size, and as in one process reading the set in order.
    - Under any other sampler (one process, or ``use_distributed_sampler=False`` with a sampler of one's own):
      the sample's place ``p`` in this rank's stream of the loader, read as ``p * world + rank`` (rank ``r`` holding
      samples ``r, r + N, ...``). In one process that is the place in the loader's order: the dataset index for a
      sequential loader, a new split every epoch for a shuffling one.

    Every validation dataloader counts from 0 at each validation epoch; the batch's place in its loader is the sum
    of that loader's earlier batches (padding included). Exact everywhere only with a sample id, which a batch does
    not carry.
    """

    def __init__(self) -> None:
        self._seen: dict[int, int] = {}
        self._orders: dict[int, torch.Tensor | None] = {}

    def reset(self) -> None:
        """A new validation epoch: every loader counts from 0 again, and a shuffling sampler deals anew."""
        self._seen.clear()
        self._orders.clear()

    def of_batch(
        self, loader: Any, dataloader_idx: int, batch_len: int, group: Any, device: torch.device
    ) -> torch.Tensor:
        """``(batch_len,)`` the positions of the next batch of ``loader`` (the dataloader number ``dataloader_idx``)."""
        first = self._seen.get(dataloader_idx, 0)
        self._seen[dataloader_idx] = first + batch_len
        if dataloader_idx not in self._orders:  # once per loader and epoch, after the sampler's set_epoch
            self._orders[dataloader_idx] = dealt_order(getattr(loader, "sampler", None), device)
        order = self._orders[dataloader_idx]
        if order is not None and first + batch_len <= order.numel():
            return order[first : first + batch_len]
        rank, world = rank_and_world(group)
        return global_positions(first, batch_len, rank, world, device)


class OnlineRidge(FlatInputCallback):
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
            A sample's share follows its position in its validation dataloader (`ValidationPositions`).
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
        self._positions = ValidationPositions()
        self._batch_from: tuple[Any, int] | None = None
        """The dataloader and its index of the main validation batch being evaluated (None: its own data)."""

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
        self._positions.reset()
        self.ridge.start_eval_epoch()  # a collective: the statistics' one all-reduce, then the solve

    @override
    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *batch_args: Any) -> None:
        # The base evaluates the batch: ``batch_args`` are (outputs, batch, batch_idx), then dataloader_idx when
        # there are several validation loaders. The loader's sampler says the batch's positions (`engine_eval_step`).
        dataloader_idx = int(batch_args[3]) if len(batch_args) > 3 else 0
        self._batch_from = (dataloader_at(trainer.val_dataloaders, dataloader_idx), dataloader_idx)
        try:
            super().on_validation_batch_end(trainer, pl_module, *batch_args)
        finally:
            self._batch_from = None

    @override
    def engine_eval_step(self, read: Any, num_valid: int | None) -> torch.Tensor | None:
        features, targets = read
        positions = None  # its own validation data: the engine's running count (distprobe shards it in order)
        if self._batch_from is not None:
            loader, index = self._batch_from
            ridge = self.ridge
            positions = self._positions.of_batch(loader, index, int(targets.shape[0]), ridge.dp_group, ridge.device)
        return self.ridge.eval_step(features, targets, num_valid=num_valid, positions=positions)

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
