"""One `ProbeSet` of every kind (a probe with an open accumulation window, a linear and an attentive bank, a kNN, a
ridge probe, an embedding monitor) on 2 gloo ranks, as a torchrun user runs it: bad data on ONE rank only, the
replicas, N ranks == one process, and a checkpoint written on 2 ranks mid-window resumed in 1 process.

One spawn serves every check (the ranks return what they saw; the parent runs the single-process side).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torchmetrics
from torch import nn

from distprobe.loop import ProbeSet
from helpers.dist import run_distributed

D, C, TOKENS, BATCH, VAL = 6, 4, 3, 8, 7
STEPS, CUT = 7, 4  # the probe's window of 3 is open at the cut (4 % 3) and at the end (7 % 3)
NAN_STEP, OUT_OF_RANGE_STEP = 1, 2  # on rank 1 only; both are in the kNN's ring at every evaluation


def _set(seed: int) -> ProbeSet:
    torch.manual_seed(seed)
    top1 = torchmetrics.classification.MulticlassAccuracy(C, average="micro")
    probe = {
        "name": "lin",
        "probe": nn.Linear(D, C),
        "input": "emb",
        "target": "y",
        "optimizer": {"type": "SGD", "lr": 0.1, "momentum": 0.9},
        "metrics": {"top1": top1},
        "accumulate_grad_batches": 3,
    }
    banks = [
        {"name": "grid", "input": "emb", "target": "y", "num_classes": C, "lr": [0.01, 0.1], "optimizer": "AdamW"},
        {"name": "att", "input": "tok", "target": "y", "num_classes": C, "lr": [0.01], "family": "attentive"},
        {
            "name": "seg",
            "input": "patch",
            "target": "mask",
            "num_classes": C,
            "lr": [0.1],
            "family": "dense",
            "head_options": {"samples_per_step": None},
            "accumulate_grad_batches": 3,  # open at the cut too: its window sums pixels with their count
        },
    ]
    knn = {"name": "knn", "input": "emb", "target": "y", "num_classes": C, "k": [1, 64], "queue_length": 64}
    ridge = {"name": "ridge", "input": "emb", "target": "y", "num_classes": C}
    monitor = {"name": "mon", "input": "emb"}
    return ProbeSet.build([probe], banks=banks, knns=[knn], ridges=[ridge], monitors=[monitor], total_steps=STEPS)


def _batch(step: int, rank: int, world: int) -> tuple[dict, dict]:
    """Step ``step``'s global batch, this rank's rows of it; rank 1's rows carry the bad data."""
    g = torch.Generator().manual_seed(step)
    features = {"emb": torch.randn(BATCH, D, generator=g), "tok": torch.randn(BATCH, TOKENS, D, generator=g)}
    features["patch"] = torch.randn(BATCH, 4, D, generator=g)  # a 2 x 2 grid of patch tokens
    targets = {"y": torch.randint(0, C, (BATCH,), generator=g), "mask": torch.randint(0, C, (BATCH, 4, 4), generator=g)}
    if step == NAN_STEP:
        features["emb"][1, 0] = float("nan")  # row 1: rank 1's first row (rows r, r + world, ...)
        features["tok"][1, 0, 0] = float("nan")
    if step == OUT_OF_RANGE_STEP:
        targets["y"][3] = C + 3  # rank 1's second row
    return {k: v[rank::world] for k, v in features.items()}, {k: v[rank::world] for k, v in targets.items()}


def _train(probes: ProbeSet, steps: range, rank: int, world: int) -> None:
    for step in steps:
        probes.step(*_batch(step, rank, world))


def _values(probes: ProbeSet, rank: int, world: int) -> dict[str, torch.Tensor]:
    """Train values, then one exact evaluation (7 samples, the last rank's share padded), and the weights."""
    values = {k: v.detach().float().clone() for k, v in probes.compute_train_metrics().items()}
    g = torch.Generator().manual_seed(99)
    features = {"emb": torch.randn(VAL, D, generator=g), "tok": torch.randn(VAL, TOKENS, D, generator=g)}
    features["patch"] = torch.randn(VAL, 4, D, generator=g)
    targets = {"y": torch.randint(0, C, (VAL,), generator=g), "mask": torch.randint(0, C, (VAL, 4, 4), generator=g)}
    mine = list(range(rank, VAL, world))
    rows = mine + mine[:1] * (math.ceil(VAL / world) - len(mine))
    probes.evaluate({k: v[rows] for k, v in features.items()}, {k: v[rows] for k, v in targets.items()}, len(mine))
    values.update({k: v.detach().float().clone() for k, v in probes.compute_metrics().items()})
    for name in ("grid", "att", "seg"):
        probes.bank(name).settle()
        values[f"weights/{name}"] = probes.bank(name).heads.flat.detach().clone()
    values["weights/lin"] = torch.cat([p.detach().reshape(-1) for p in probes["lin"].module.parameters()])
    return values


def _ranks(rank: int, world: int, path: str) -> dict[str, torch.Tensor]:
    probes = _set(seed=rank)  # different inits: build broadcasts rank 0's
    _train(probes, range(CUT), rank, world)
    state = probes.state_dict()  # a collective, mid-window
    if rank == 0:
        torch.save(state, path)
    dist.barrier()
    _train(probes, range(CUT, STEPS), rank, world)
    return _values(probes, rank, world)


def _assert_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], exact: bool = False) -> None:
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        if exact:
            assert torch.equal(got[key], value), key
        else:
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-5, msg=key)


@pytest.mark.distributed
@pytest.mark.slow  # about 8 s on 2 cores: one spawn of 2 ranks, then the one-process runs
def test_bad_data_on_one_rank_replicas_one_process_and_a_two_rank_checkpoint_resumed_in_one(tmp_path: Path):
    path = str(tmp_path / "probes.pt")
    rank0, rank1 = run_distributed(_ranks, 2, path, timeout=120)  # a rank left in a collective would time out

    # Bad data on rank 1 only: skipped and counted on both ranks at once, for every member that counts it.
    for member in ("lin", "grid", "att", "ridge"):
        assert rank0[f"train/{member}_bad_batches/nonfinite_features"] == 1, member
        assert rank0[f"train/{member}_bad_batches/targets_out_of_range"] == 1, member
    # The kNN stored rank 1's out-of-range label: before, every later evaluation failed inside its vote
    # ("index 7 is out of bounds for dimension 1 with size 4"); now that row never votes.
    assert {"eval/knn_k1_top1", "eval/knn_k64_top1"} <= set(rank0)
    _assert_close(rank1, rank0, exact=True)  # replicas and reduced values identical

    # 2 ranks == one process on the union of their batches: the weights (a bad step is skipped on every rank) and
    # the eval values, the kNN's included. Not what a bad batch drops: that is the batch of the rank that had it (the
    # ridge's sums, the train metrics), and one process has the union's batch (docs/plain-torch.md, "Bad data").
    solo = _set(seed=0)
    _train(solo, range(STEPS), 0, 1)
    solo_values = _values(solo, 0, 1)
    same = [k for k in rank0 if not k.startswith(("train/", "eval/ridge"))]
    _assert_close({k: solo_values[k] for k in same}, {k: rank0[k] for k in same})

    # The 2-rank checkpoint (mid-window: each rank's partial gradients, the kNN's two shards, the ridge's sums)
    # resumed in one process continues as the 2-rank run did.
    resumed = _set(seed=5)
    resumed.load_state_dict(torch.load(path, weights_only=False))
    _train(resumed, range(CUT, STEPS), 0, 1)
    _assert_close(_values(resumed, 0, 1), rank0)  # the train metrics too: saved reduced over the group
