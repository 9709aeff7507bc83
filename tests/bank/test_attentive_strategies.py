"""Attentive banks under DDP, FSDP1 (wrapped, checkpointed blocks), FSDP2, FSDP2 with tensor parallel and ZeRO 1-3.

One spawned run of 2 gloo ranks per strategy (`attentive_scenario.run`): a bank reading tapped tokens
(``backbone.blocks.1:tokens``) equals its twin reading the same tokens from ``training_step``'s outputs, replicas
agree, and a fit resumed from a checkpoint that falls mid-window (epoch 0: an odd number of micro-batches, windows
of 2) ends where the uninterrupted fit did.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from bank.attentive_scenario import run
from features.taps.scenario import TapRun
from helpers.dist import run_distributed

RUNS = {
    "ddp": TapRun("distprobe_ddp"),
    "fsdp1_wrapped": TapRun("fsdp1_wrapped"),
    "fsdp2": TapRun("distprobe_fsdp2", kind="fsdp2"),
    "fsdp2_tp_1x2": TapRun("tp_1x2", kind="tp"),
    "deepspeed_stage_1": TapRun("distprobe_deepspeed_stage_1"),
    "deepspeed_stage_2": TapRun("distprobe_deepspeed_stage_2"),
    "deepspeed_stage_3": TapRun("distprobe_deepspeed_stage_3"),
}


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_attentive_bank_on_tapped_tokens_rides_the_strategy_and_resumes_mid_window(name, tmp_path):
    if name.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    ranks = run_distributed(run, 2, RUNS[name], str(tmp_path), timeout=300.0)
    first = ranks[0]["probed"]
    per_epoch = first["micro_step"]["tapped"] // 2
    assert per_epoch % 2 == 1 and first["micro_step"] == {"tapped": 2 * per_epoch, "explicit": 2 * per_epoch}
    for result in ranks:
        probed, resumed = result["probed"], result["resumed"]
        # Tapped tokens are the explicit ones: the same heads, the same validation values.
        torch.testing.assert_close(probed["flat"]["tapped"], probed["flat"]["explicit"], rtol=0, atol=1e-6)
        for key, value in probed["eval"].items():
            if key.startswith("eval/tapped"):
                twin = key.replace("tapped", "explicit", 1).replace("backbone.blocks.1:tokens", "b1")
                assert probed["eval"][twin] == pytest.approx(value), key
        assert torch.equal(probed["flat"]["tapped"], first["flat"]["tapped"])  # replicas agree
        # Resumed mid-window: the same heads, steps and skips as the uninterrupted fit.
        for bank in ("tapped", "explicit"):
            assert torch.equal(resumed["flat"][bank], probed["flat"][bank]), bank
            assert resumed["micro_step"][bank] == probed["micro_step"][bank]
            assert torch.equal(resumed["skipped"][bank], probed["skipped"][bank])
    assert any(k.endswith("_best_top1") for k in first["eval"]), first["eval"]
