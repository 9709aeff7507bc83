"""`ProbeSet` on its own labeled data, in a plain torch loop on 2 gloo ranks, through the torch-only `OwnData`.

The backbone (DDP, BatchNorm) pretrains on unlabeled points; every other step the probe draws a batch of its own
sharded labeled loader, runs the backbone inside `model_left_alone` and trains. Checked: the backbone (weights,
BatchNorm buffers, the RNG) is bitwise what it is without the probe; the probe replicas agree; and a loop resumed
from rank 0's saved state (backbone, `OwnData` counts, `ProbeSet.state_dict()`) mid-epoch of the probe loader
draws the same probe batches and ends with the same probe, bitwise.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from distprobe.engine import ProbeConfig
from distprobe.features.own_data import OwnData, model_left_alone
from distprobe.loop import ProbeSet, ProbeSpec
from helpers.dist import run_distributed
from helpers.models import RandomPoints

pytestmark = pytest.mark.distributed

STEPS, SAVE_AT, EVERY = 8, 3, 2  # 4 probe draws; the probe loader has 3 batches per rank and epoch


def _backbone() -> nn.Module:
    torch.manual_seed(0)
    return nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Linear(16, 8)))


def _probes() -> ProbeSet:
    torch.manual_seed(1)
    config = ProbeConfig(name="own", probe=nn.Linear(8, 3), optimizer={"type": "SGD", "lr": 0.1, "momentum": 0.9})
    return ProbeSet.build([ProbeSpec(config=config, input="emb", target="label")])


def _own() -> OwnData:
    labeled = RandomPoints(24, seed=5, in_dim=6, num_classes=3)
    loader = DataLoader(labeled, batch_size=4, shuffle=True)
    # The wrapped module, not the DDP wrapper: DDP's forward broadcasts rank 0's BatchNorm buffers to every rank,
    # which would change the other ranks' backbones (seen here: rank 1's running_mean).
    own = OwnData("own", data=loader, val_data=None, features=lambda m, b: m.module(b["x"]), every_n_steps=EVERY)
    own.shard_over(None)  # 12 samples, 3 batches per rank
    return own


def _loop(start: int, stop: int, state: dict[str, Any] | None, with_probe: bool = True) -> dict[str, Any]:
    model, probes, own = _backbone(), _probes(), _own()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    unlabeled = RandomPoints(64, seed=dist.get_rank(), in_dim=6, num_classes=3)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        own.load_state_dict(state["own"])
        probes.load_state_dict(state["probes"])
        torch.set_rng_state(state["rng"])
    drawn = []
    for step in range(start, stop):
        x = unlabeled.x[8 * step : 8 * step + 8]
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if with_probe and own.due():
            with model_left_alone(model, torch.device("cpu"), torch.autocast("cpu", enabled=False)):
                batch = own.next_batch()
                (features,) = own.features_of(["emb"], model, batch)
            probes.step({"emb": features}, {"label": batch["label"]})
            drawn.append(batch["label"].tolist())
        if step + 1 == SAVE_AT and state is None:
            # Deep copies, as torch.save would write: state dicts hold the live tensors.
            saved = copy.deepcopy(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "own": own.state_dict(),
                    "probes": probes.state_dict(),  # a collective: every rank
                    "rng": torch.get_rng_state(),
                }
            )
    weights = torch.cat([p.detach().flatten() for p in probes.probes["own"].module.parameters()])
    everyone = [torch.empty_like(weights) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, weights)
    return {
        "backbone": {k: v.clone() for k, v in model.state_dict().items()},
        "rng": torch.get_rng_state(),
        "probe_all_ranks": everyone,
        "drawn": drawn,
        "saved": saved if state is None else None,
    }


def _runs(rank: int, world: int) -> dict[str, Any]:
    plain = _loop(0, STEPS, None, with_probe=False)
    whole = _loop(0, STEPS, None)
    saved = whole["saved"]
    # Lightning-style: every rank resumes from rank 0's copy of the state.
    shared = [saved]
    dist.broadcast_object_list(shared, src=0)
    resumed = _loop(SAVE_AT, STEPS, shared[0])
    return {"plain": plain, "whole": whole, "resumed": resumed}


def test_probeset_on_own_data_leaves_the_backbone_alone_and_resumes_mid_epoch():
    for rank in run_distributed(_runs, 2, timeout=180):
        plain, whole, resumed = rank["plain"], rank["whole"], rank["resumed"]
        assert plain["backbone"].keys() == whole["backbone"].keys()
        for key, value in plain["backbone"].items():
            assert torch.equal(value, whole["backbone"][key]), key  # BatchNorm buffers included
        assert torch.equal(plain["rng"], whole["rng"])
        first, *others = whole["probe_all_ranks"]
        assert all(torch.equal(first, other) for other in others)
        assert len(whole["drawn"]) == STEPS // EVERY
        # Saved after 1 draw of 3 per epoch: the resumed loop draws what the uninterrupted one drew next.
        assert resumed["drawn"] == whole["drawn"][1:]
        assert all(torch.equal(a, b) for a, b in zip(resumed["probe_all_ranks"], whole["probe_all_ranks"], strict=True))
