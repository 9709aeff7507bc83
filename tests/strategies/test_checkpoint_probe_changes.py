"""Resuming with other probes than the checkpoint's, when the LightningModule registers ``callbacks_modules``.

A user's ``self.callbacks_modules = nn.ModuleDict()`` (stable-pretraining's ``spt.Module`` makes one) puts the probes
into the LightningModule's state dict, and every strategy loads that state strictly. Probes restore themselves from
their callbacks' state (by name), so the model's load must neither ask for nor refuse them: a probe added since the
checkpoint, and a bank whose parameters are only made at its first batch (no ``in_features``, so absent when the
checkpoint is restored) failed the load under every distprobe strategy ("Missing key(s)" / "Unexpected key(s) in
state_dict: callbacks_modules.bank.flat", or DCP's "Missing key in checkpoint state_dict").

One spawn of 2 gloo ranks runs each strategy: a fit with a probe and a lazily sized bank, checkpointed after epoch 0,
then a fresh fit resumed from that checkpoint with the same two and one new probe. The resumed probe and bank must end
bitwise where the uninterrupted ones did, and the new probe must train.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from helpers.dist import run_distributed
from strategies.scenario import EMBED_DIM, NUM_CLASSES, DataModule, Spec, _module, _trainer

SPECS = {
    "ddp": Spec("distprobe_ddp"),
    "fsdp1_full": Spec("distprobe_fsdp"),
    "fsdp1_sharded": Spec("distprobe_fsdp", strategy_kwargs={"state_dict_type": "sharded"}),
    "fsdp2": Spec("distprobe_fsdp2", kind="fsdp2"),
    "deepspeed_stage_2": Spec("distprobe_deepspeed_stage_2"),
}


def _callbacks(rank: int, *, added: bool) -> list[Any]:
    from distprobe.callbacks import OnlineProbe, OnlineProbeBank

    torch.manual_seed(1000 + rank)
    callbacks: list[Any] = [
        OnlineProbe(None, name="linear", input="embedding", target="label", probe=nn.Linear(EMBED_DIM, NUM_CLASSES)),
        # No in_features: the bank's parameters are made at its first batch, after Lightning restores the model.
        OnlineProbeBank(None, name="bank", input="embedding", target="label", num_classes=NUM_CLASSES, lr=[0.1]),
    ]
    if added:
        callbacks.append(
            OnlineProbe(None, name="added", input="embedding", target="label", probe=nn.Linear(EMBED_DIM, NUM_CLASSES))
        )
    return callbacks


def _final(callbacks: list[Any]) -> dict[str, torch.Tensor]:
    from distprobe.callbacks import OnlineProbe

    out = {}
    for callback in callbacks:
        if isinstance(callback, OnlineProbe):
            out[callback.name] = torch.cat([p.detach().reshape(-1).clone() for p in callback.probe.module.parameters()])
        else:
            callback.bank.settle()
            out[callback.name] = callback.bank.heads.flat.detach().clone()
    return out


def _run_every_strategy(rank: int, world_size: int, tmp: str) -> dict[str, Any]:
    import distprobe.strategies  # noqa: F401 - registers the strategy names

    results = {}
    for name, spec in SPECS.items():
        ckpt_dir = os.path.join(tmp, name)
        callbacks = _callbacks(rank, added=False)
        checkpoint = ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
        _trainer(spec, world_size, [*callbacks, checkpoint]).fit(_module(spec, seed=0), datamodule=DataModule())
        uninterrupted = _final(callbacks)

        callbacks = _callbacks(rank + 10, added=True)
        trainer = _trainer(spec, world_size, callbacks, enable_checkpointing=False)
        trainer.fit(_module(spec, seed=1), datamodule=DataModule(), ckpt_path=os.path.join(ckpt_dir, "epoch=0.ckpt"))
        results[name] = {"uninterrupted": uninterrupted, "resumed": _final(callbacks)}
    return results


@pytest.fixture(scope="module")
def every_strategy(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_distributed(_run_every_strategy, 2, str(tmp_path_factory.mktemp("probe_changes")), timeout=300.0)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("name", list(SPECS))
def test_resume_with_an_added_probe_and_a_lazily_sized_bank(name: str, every_strategy: list[dict[str, Any]]) -> None:
    for rank in every_strategy:
        result = rank[name]
        for probe in ("linear", "bank"):
            assert torch.equal(result["resumed"][probe], result["uninterrupted"][probe]), probe
        assert torch.isfinite(result["resumed"]["added"]).all()
    # The added probe trained as a replica: the same on both ranks, though each rank built it from another seed.
    assert torch.equal(every_strategy[0][name]["resumed"]["added"], every_strategy[1][name]["resumed"]["added"])
