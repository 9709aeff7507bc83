"""`ProbeSet(ridges=...)`: the same `RidgeProbe` as `OnlineRidge`, driven from a plain loop (run on 1 and 2 gloo ranks
by tests/convex/test_convex_distributed.py, in its spawns).

Each rank steps on every world-th batch and evaluates every world-th validation sample (the last rank's share padded
and marked with ``num_valid``); every lambda's top-1 must equal the closed form on all training samples, the
statistics must start again after an evaluation, and a set resumed from a mid-epoch checkpoint must log what the
uninterrupted one did.
"""

import pytest
import torch

from distprobe.convex import fit_ridge
from distprobe.loop import ProbeSet

from .helpers import gaussian_classes

L2 = (1e-3, 1.0)
SPEC = {"name": "ridge", "num_classes": 3, "l2": L2, "input": "emb", "target": "y"}


def _epoch(probes: ProbeSet, x, y, rank: int, world: int, batches: range) -> None:
    for b in batches:
        if b % world == rank:
            probes.step({"emb": x[b * 10 : (b + 1) * 10]}, {"y": y[b * 10 : (b + 1) * 10]})


def _evaluate(probes: ProbeSet, vx, vy, rank: int, world: int) -> dict[str, float]:
    own = torch.arange(rank, len(vy), world)
    padded = torch.cat([own, own[: (-len(vy)) % world]]) if len(own) < -(-len(vy) // world) else own
    for start in range(0, len(padded), 8):
        index = padded[start : start + 8]
        valid = max(0, min(len(index), len(own) - start))
        probes.evaluate({"emb": vx[index]}, {"y": vy[index]}, num_valid=valid)
    return {k: float(v) for k, v in probes.compute_metrics().items()}


def probe_set_run(rank: int, world: int) -> dict:
    """Two evaluations and a resume of a ProbeSet ridge on this rank's shares."""
    x, y, vx, vy = gaussian_classes(80, 23)
    probes = ProbeSet.build([], ridges=[SPEC])
    _epoch(probes, x, y, rank, world, range(0, 8))
    first = _evaluate(probes, vx, vy, rank, world)
    _epoch(probes, x, y, rank, world, range(2, 4))  # a new "epoch": only these batches count
    state = probes.state_dict()  # mid-epoch, a collective
    _epoch(probes, x, y, rank, world, range(4, 6))
    second = _evaluate(probes, vx, vy, rank, world)
    resumed = ProbeSet.build([], ridges=[SPEC])
    resumed.load_state_dict(state)
    _epoch(resumed, x, y, rank, world, range(4, 6))
    return {"first": first, "second": second, "resumed": _evaluate(resumed, vx, vy, rank, world)}


def _expected(rows: slice) -> dict[str, float]:
    x, y, vx, vy = gaussian_classes(80, 23)
    correct = fit_ridge(x[rows], y[rows], 3, L2).predict(vx) == vy
    return {f"eval/ridge/l2={lam:g}_top1": float(correct[i].double().mean()) for i, lam in enumerate(L2)}


def check_probe_set_run(result: dict) -> None:
    """Every value of `probe_set_run` equals the closed form on the batches since the last evaluation."""
    for name, rows in (("first", slice(0, 80)), ("second", slice(20, 60)), ("resumed", slice(20, 60))):
        logged = result[name]
        for key, value in _expected(rows).items():
            assert logged[key] == pytest.approx(value, abs=1e-6), (name, key)
        assert {"eval/ridge_best_top1", "eval/ridge_best_l2"} <= set(logged)
    assert result["resumed"] == result["second"]


def test_probe_set_ridge_in_one_process_without_torch_distributed():
    check_probe_set_run(probe_set_run(0, 1))
