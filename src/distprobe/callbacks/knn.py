"""`OnlineKNN`: a weighted kNN classifier over recent training features, its buffer sharded over the ranks."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from typing_extensions import override

from distprobe.callbacks.base import Stage
from distprobe.callbacks.flat_input import FlatInputCallback
from distprobe.callbacks.own_data import FeatureFn
from distprobe.knn import KNNConfig, ShardedKNN, StorageDtype

log = logging.getLogger(__name__)


class OnlineKNN(FlatInputCallback):
    """Classify validation samples by a weighted vote of their nearest recent training samples (cosine similarity).

    Each neighbour votes for its class with weight ``exp(cosine / temperature)`` (DINO's ``eval_knn.py``). The
    buffer of the last ``queue_length`` training samples is sharded over the data-parallel group (each rank keeps
    its own last ``queue_length / world`` samples) and never gathered whole; every validation sample is classified
    against the union of the shards, exactly (docs/knn.md). Under DDP, FSDP1/2 and DeepSpeed alike.

    Args:
        module: The LightningModule to probe (None: taken at ``setup``).
        name: Unique name; keys logs and checkpoint state.
        input: Key of the features in the step's outputs or batch, or a submodule to tap, as for `OnlineProbe`.
        target: Key of the class labels.
        num_classes: Number of classes.
        queue_length: Training samples kept over the whole data-parallel group.
        k: Numbers of neighbours, answered from one search; the first is the headline.
        temperature: T of the weights ``exp(cosine / T)``.
        storage_dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``: how the buffer stores features.
        in_features: Feature size; None: read from the first training batch.
        data: The kNN's own labeled training DataLoader (docs/own-data.md): its features fill the buffer instead of
            the main batches'. Sharded over the data-parallel ranks like `OnlineProbe`'s.
        val_data: Its own labeled validation DataLoader: the queries at each validation epoch instead of the main
            validation batches (then ``batch["{name}_preds"]`` is not written).
        every_n_steps: With ``data``: push one own batch every this many main training batches.
        features: With ``data``: ``features(pl_module, batch) -> tensor``, run under no_grad in eval mode.
        multilabel: Targets are ``(B, num_classes)`` multi-hot: neighbours vote with their label vectors, reported
            as mAP and F1 (docs/multilabel.md).

    Logs ``eval/{name}_top1`` (the first k) and ``eval/{name}_k{K}_top1`` for every k, counting each validation
    sample once; puts the first k's predictions in ``batch["{name}_preds"]`` (and the outputs, when a dict).

    Example:
        >>> knn = OnlineKNN(None, name="knn", input="embedding", target="label", num_classes=10, queue_length=4096)
        >>> knn.config.k
        (10, 20, 100, 200)
    """

    engine_type = ShardedKNN
    kind = "kNN"
    holds = "buffer does"

    def __init__(
        self,
        module: pl.LightningModule | None,
        name: str,
        input: str,  # noqa: A002 - the reference API's name
        target: str,
        num_classes: int,
        queue_length: int,
        k: Sequence[int] = (10, 20, 100, 200),
        temperature: float = 0.07,
        storage_dtype: StorageDtype = "float32",
        in_features: int | None = None,
        data: Any = None,
        val_data: Any = None,
        every_n_steps: int = 1,
        features: FeatureFn | None = None,
        multilabel: bool = False,
    ) -> None:
        super().__init__(KNNConfig, locals())

    @property
    def knn(self) -> ShardedKNN:
        """The engine, typed: `FlatInputCallback.engine` (from ``setup``, a loaded state or the first batch)."""
        return self.engine

    # --- validation ---------------------------------------------------------------------------------------------

    @override
    def takes_part(self, trainer: pl.Trainer, stage: Stage) -> bool:
        # The sanity check runs before any training batch: no buffer yet, or an empty one (same on every rank).
        return stage == "val" and self._engine is not None and not trainer.sanity_checking

    @override
    def evaluates(self, trainer: pl.Trainer) -> bool:
        return self.takes_part(trainer, "val")

    @override
    def start_eval_epoch(self) -> None:
        self.knn.reset_eval_metrics()
