"""Tapped probes under DDP, FSDP1 (wrapped and checkpointed blocks), FSDP2, tensor parallel and DeepSpeed ZeRO-3.

Each strategy is one spawned run on 2 gloo ranks (see `scenario.run` here). In it every tap spec has a twin probe
reading the same activation returned explicitly from ``training_step``: after training the two must hold the same
weights and report the same validation accuracy. The same fit without any probe must train the backbone bitwise
identically (same losses, same local parameters on every rank), and no tap hook may be left after fit.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from features.taps.scenario import STRATEGY_RUNS, run
from helpers.dist import run_distributed

RUNS = {name: STRATEGY_RUNS[name] for name in ("ddp", "fsdp1_wrapped", "fsdp2", "fsdp2_tp_1x2", "deepspeed_stage_3")}


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_tapped_probe_equals_explicit_probe_under_strategy(name: str) -> None:
    if name.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    spec = RUNS[name]
    ranks = run_distributed(run, 2, spec, timeout=240.0)
    for rank, result in enumerate(ranks):
        probes = result["probes"]
        for i in spec.pairs:
            torch.testing.assert_close(probes[f"tap{i}"], probes[f"explicit{i}"], rtol=0, atol=1e-6, msg=f"pair {i}")
            assert result["eval"][f"eval/tap{i}_top1"] == pytest.approx(result["eval"][f"eval/explicit{i}_top1"])
        assert torch.equal(probes["tap0"], ranks[0]["probes"]["tap0"]), rank  # replicas agree
        # The backbone trains exactly as without probes.
        assert len(result["losses"]) == len(result["plain_losses"]) > 0
        for got, want in zip(result["losses"], result["plain_losses"]):
            assert torch.equal(got, want)
        for got, want in zip(result["backbone"], result["plain_backbone"], strict=True):
            assert torch.equal(got, want)
        assert result["hooks_left"] == 0 and result["shared_left"] == 0
    facts = ranks[0]
    assert sorted(facts["tapped"]) == ["backbone.blocks.1", "backbone.blocks.2", "backbone.proj"], facts["tapped"]
    assert facts["dtensor_taps"] == (["backbone.proj"] if name == "fsdp2_tp_1x2" else [])
    if name == "fsdp1_wrapped":
        names = facts["names"]
        assert "backbone.blocks.1._fsdp_wrapped_module._checkpoint_wrapped_module" in names, names
        # The outermost module of each name is hooked: it runs once per step, the checkpointed block twice.
        assert facts["tapped"]["backbone.blocks.1"] == "FullyShardedDataParallel", facts["tapped"]
