"""The Lightning side of a probe's own labeled data: the extra forward in a Trainer, and the callbacks' arguments.

The torch-only driver is `distprobe.features.own_data.OwnData` (re-exported here).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from distprobe.features.lookup import lookup
from distprobe.features.own_data import (
    FeatureFn,
    OwnData,
    model_left_alone,
    restore_train_modes,
    shard_loader,
    train_modes,
)

__all__ = [
    "FeatureFn",
    "OwnData",
    "OwnDataFeatures",
    "draw_features",
    "eval_batches",
    "model_left_alone",
    "move_to",
    "own_data_of",
    "restore_train_modes",
    "shard_loader",
    "train_modes",
]


def move_to(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor on ``device``."""
    from lightning.fabric.utilities.apply_func import move_data_to_device

    return move_data_to_device(batch, device)


def unsharded_for_the_extra_forward(trainer: Any) -> contextlib.AbstractContextManager[Any]:
    """What the extra forward needs to see whole parameters; a collective under FSDP1.

    FSDP2 and DeepSpeed ZeRO-3 gather parameters in hooks on the modules, so calling the LightningModule works.
    FSDP1 gathers them in the wrapper's own ``forward``, which the extra forward does not go through: the
    LightningModule's parameters are flat shards there ("mat2 must be a matrix"). Its root unit's parameters are
    gathered for the forward, without write-back; nested FSDP units still gather their own in their ``forward``.
    """
    model = getattr(trainer.strategy, "model", None)
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(model, FullyShardedDataParallel):
        return FullyShardedDataParallel.summon_full_params(model, recurse=False, writeback=False)
    return contextlib.nullcontext()


def draw_features(
    own: OwnData, trainer: Any, pl_module: nn.Module, sources: Sequence[str], target: str
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Draw the probe's next own batch and compute its features with ``pl_module``, leaving the model alone.

    Args:
        own: The probe's `OwnData`.
        trainer: The Lightning Trainer (its precision plugin gives the main model's autocast).
        pl_module: The LightningModule.
        sources: The probe's input names.
        target: Key of the labels in the probe's own batches.
    """
    device = trainer.strategy.root_device
    own.tap(pl_module, sources)
    with (
        unsharded_for_the_extra_forward(trainer),
        model_left_alone(pl_module, device, trainer.precision_plugin.forward_context()),
    ):
        batch = move_to(own.next_batch(), device)
        features = own.features_of(sources, pl_module, batch)
    targets = lookup(target, {}, batch, probe_name=own.name, argument="target")
    return features, targets


def eval_batches(
    own: OwnData, trainer: Any, pl_module: nn.Module, sources: Sequence[str], target: str
) -> Iterator[tuple[list[torch.Tensor], torch.Tensor, int | None]]:
    """Features, targets and the count of real samples of each of this rank's own validation batches.

    Every rank yields as many batches as the longest share over all ranks (one all-reduce at
    the start): the extra forward is a collective under FSDP and ZeRO-3, so a rank with a shorter share runs its
    first batch again, counted as padding (0 real samples).
    """
    from distprobe.metrics.exact import valid_in_loader_batch

    loader = own.val_data
    if loader is None:
        return
    device = trainer.strategy.root_device
    own.tap(pl_module, sources)
    length = len(loader)
    if dist.is_available() and dist.is_initialized():
        longest = torch.tensor([length], device=device)
        # Over the world, not the data-parallel group: a tensor-parallel forward is a collective over every rank.
        dist.all_reduce(longest, op=dist.ReduceOp.MAX)
        steps = int(longest.item())  # once per validation epoch, not per step
    else:
        steps = length
    if steps == 0:
        return
    with (
        unsharded_for_the_extra_forward(trainer),
        model_left_alone(pl_module, device, trainer.precision_plugin.forward_context()),
    ):
        iterator = iter(loader)
        first = None
        for batch_idx in range(steps):
            raw = next(iterator, None)
            padding = raw is None
            if padding:
                raw = first
            if first is None:
                first = raw
            if raw is None:
                raise ValueError(
                    f"{own.owner}: argument 'val_data' has no batch on this rank while another rank has "
                    f"{steps}; shard it with a DistributedSampler (drop_last=False) so every rank has some."
                )
            batch = move_to(raw, device)
            features = own.features_of(sources, pl_module, batch)
            targets = lookup(target, {}, batch, probe_name=own.name, argument="target")
            num_valid = 0 if padding else valid_in_loader_batch(loader, batch_idx, targets.shape[0])
            yield features, targets, num_valid


class OwnDataFeatures:
    """A `distprobe.features.source.FeatureSource`: the features of the probe's own batches, by an extra forward.

    Args:
        own: The probe's `OwnData`.
        trainer: The Lightning Trainer.
        pl_module: The LightningModule that computes the features.
        sources: The probe's input names.
        target: Key of the labels in the probe's own batches.
    """

    def __init__(self, own: OwnData, trainer: Any, pl_module: nn.Module, sources: Sequence[str], target: Any) -> None:
        self.own = own
        self._trainer = trainer
        self._pl_module = pl_module
        self._sources = list(sources)
        self._target = target

    def arm(self) -> None:
        """Nothing to do: the extra forward arms its own taps."""

    def read(self, outputs: Any, batch: Any) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Draw the probe's next own batch and return its features and targets (``outputs`` and ``batch`` unused)."""
        return draw_features(self.own, self._trainer, self._pl_module, self._sources, self._target)

    def eval_batches(self) -> Iterator[tuple[list[torch.Tensor], torch.Tensor, int | None]]:
        """Features, targets and real-sample counts of this rank's own validation batches (see `eval_batches`)."""
        return eval_batches(self.own, self._trainer, self._pl_module, self._sources, self._target)

    def release(self) -> None:
        """Drop the own data's taps and loader iterators."""
        self.own.release()


def own_data_of(
    name: str, data: Any, val_data: Any, features: FeatureFn | None, every_n_steps: int, *, kind: str = "probe"
) -> OwnData | None:
    """The `OwnData` of a callback's ``data``/``val_data``/``features``/``every_n_steps`` arguments, or None.

    ``kind`` names the callback in messages (``"bank"``, ``"kNN"``, ``"ridge"``), as its other messages do.

    Raises:
        ValueError: for ``val_data`` or ``features`` without ``data``, or ``data`` without ``features``.
    """
    if data is None:
        for argument, value in (("val_data", val_data), ("features", features)):
            if value is not None:
                raise ValueError(
                    f"{kind} '{name}': argument '{argument}' is given without 'data'; pass the {kind}'s own labeled "
                    "training DataLoader as 'data' too, or drop it to probe the main batches."
                )
        return None
    if features is None:
        raise ValueError(
            f"{kind} '{name}': argument 'data' needs 'features', a callable features(pl_module, batch) -> tensor "
            f"that runs the model on one of the {kind}'s own batches (e.g. lambda m, b: m.backbone(b['image']))."
        )
    return OwnData(name, data=data, val_data=val_data, features=features, every_n_steps=every_n_steps, kind=kind)
