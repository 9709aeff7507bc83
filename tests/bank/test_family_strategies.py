"""Attentive and dense banks under DDP, FSDP1 (wrapped, checkpointed blocks), FSDP2, FSDP2 with tensor parallel and
ZeRO 1-3, side by side in the same fits.

One spawned run of 2 gloo ranks per strategy (`bank.family_scenario.run`). Per family, a bank reading a tapped
input (attentive: ``backbone.blocks.1:tokens``; dense: ``backbone.blocks.1:patch``, masks with ignored pixels as
targets) equals its twin reading the same tokens from ``training_step``'s outputs, replicas agree, and a fit resumed
from a checkpoint that falls mid-window (epoch 0: an odd number of micro-batches, windows of 2) ends where the
uninterrupted fit did. The backbone trains bitwise as without the banks.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from bank.family_scenario import FAMILIES, INPUTS, run
from features.taps.scenario import STRATEGY_RUNS
from helpers.dist import run_distributed

RUNS = STRATEGY_RUNS
#: Per family the metrics its banks must report at validation (``eval/{bank}_...``).
METRICS = {"attentive": ("_best_top1",), "dense": ("_best_mIoU", "_pixel_acc")}


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_attentive_and_dense_banks_on_tapped_tokens_ride_the_strategy_and_resume_mid_window(name, tmp_path):
    if name.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    ranks = run_distributed(run, 2, RUNS[name], str(tmp_path), timeout=300.0)
    first = ranks[0]["probed"]
    per_epoch = first["micro_step"]["attentive_tapped"] // 2
    assert per_epoch % 2 == 1 and first["micro_step"] == {bank: 2 * per_epoch for bank in first["flat"]}
    assert set(first["flat"]) == {f"{family}_{kind}" for family in FAMILIES for kind in ("tapped", "explicit")}
    assert int(first["skipped"]["dense_tapped"].sum()) == 0
    for result in ranks:
        probed, resumed = result["probed"], result["resumed"]
        for family, (tapped_input, explicit_input) in INPUTS.items():
            tapped, explicit = f"{family}_tapped", f"{family}_explicit"
            # Tapped tokens are the explicit ones: the same heads, the same validation values.
            torch.testing.assert_close(probed["flat"][tapped], probed["flat"][explicit], rtol=0, atol=1e-6)
            twins = 0
            for key, value in probed["eval"].items():
                if key.startswith(f"eval/{tapped}"):
                    twin = key.replace(tapped, explicit, 1).replace(tapped_input, explicit_input)
                    assert probed["eval"][twin] == pytest.approx(value), key
                    twins += 1
            assert twins > 0, (family, probed["eval"])
            assert torch.equal(probed["flat"][tapped], first["flat"][tapped]), family  # replicas agree
            # Resumed mid-window: the same heads, steps and skips as the uninterrupted fit.
            for bank in (tapped, explicit):
                assert torch.equal(resumed["flat"][bank], probed["flat"][bank]), bank
                assert resumed["micro_step"][bank] == probed["micro_step"][bank], bank
                assert torch.equal(resumed["skipped"][bank], probed["skipped"][bank]), bank
        # The backbone trains as without the banks.
        assert probed["backbone"].numel() > 0 and torch.equal(probed["backbone"], result["no_bank"])
    for family, suffixes in METRICS.items():
        for suffix in suffixes:
            assert any(k.startswith(f"eval/{family}_") and k.endswith(suffix) for k in first["eval"]), (
                family,
                suffix,
                first["eval"],
            )
