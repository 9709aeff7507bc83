"""A probe's own-data forward leaves an FSDP2 backbone sharded, as the main step leaves it.

FSDP2 keeps the root module's parameters unsharded after a forward (the backward needs them at once). The own-data
forward runs under no_grad at the end of a batch, with no backward to follow, so the root's parameters stayed
unsharded: plain full tensors registered on the module instead of its DTensor shards, until the next step. Code that
runs after the probe in the same hook (an EMA teacher update over ``student.parameters()``, a callback reading
shards) then saw other tensors than without the probe.

One spawn of 2 gloo ranks: a ``distprobe_fsdp2`` fit with an own-data probe and one without; after every batch the
backbone's parameters must be the same DTensor shards in both.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader

from helpers.dist import run_distributed
from helpers.models import RandomPoints
from strategies.scenario import EMBED_DIM, IN_DIM, NUM_CLASSES, DataModule, Spec, _module, _trainer

SPEC = Spec("distprobe_fsdp2", kind="fsdp2")


class ShardRecorder(Callback):
    """After every batch (the probe's step included): each backbone parameter's type and local values."""

    def __init__(self) -> None:
        self.steps: list[list[tuple[str, torch.Tensor]]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any) -> None:
        self.steps.append(
            [
                (type(p).__name__, (p.to_local() if hasattr(p, "to_local") else p).detach().clone())
                for p in pl_module.encoder.parameters()
            ]
        )


def _embed(module: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return module(batch["x"])


def _fit_with_and_without_own_data(rank: int, world_size: int) -> dict[str, Any]:
    import distprobe.strategies  # noqa: F401 - registers the strategy names
    from distprobe.callbacks import OnlineProbe

    own = RandomPoints(12, seed=5, in_dim=IN_DIM, num_classes=NUM_CLASSES)
    results = {}
    for probed in (True, False):
        recorder = ShardRecorder()
        callbacks: list[Callback] = [recorder]
        if probed:
            probe = OnlineProbe(
                None,
                name="own",
                input="embedding",
                target="label",
                probe=nn.Linear(EMBED_DIM, NUM_CLASSES),
                data=DataLoader(own, batch_size=2),
                features=_embed,
            )
            callbacks.insert(0, probe)
        _trainer(SPEC, world_size, callbacks, enable_checkpointing=False).fit(
            _module(SPEC, seed=0), datamodule=DataModule()
        )
        results["probed" if probed else "plain"] = recorder.steps
    return results


@pytest.mark.distributed
@pytest.mark.slow
def test_own_data_forward_leaves_fsdp2_parameters_sharded() -> None:
    for rank in run_distributed(_fit_with_and_without_own_data, 2, timeout=240.0):
        assert len(rank["probed"]) == len(rank["plain"]) > 0
        for step, (probed, plain) in enumerate(zip(rank["probed"], rank["plain"], strict=True)):
            assert [kind for kind, _ in probed] == ["DTensor"] * len(probed), step
            for (_, got), (_, want) in zip(probed, plain, strict=True):
                assert torch.equal(got, want), step
