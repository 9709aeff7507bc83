"""A probe (and a bank) on its own labeled data on 2 gloo ranks: DDP, FSDP1, FSDP2 and DeepSpeed ZeRO-1/2/3.

Tensor parallelism: tests/features/own_data/test_tensor_parallel.py."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from features.own_data.scenario import Spec, run, run_many
from helpers.dist import run_distributed

pytestmark = pytest.mark.distributed


def _assert_same_backbone(a: dict[str, Any], b: dict[str, Any]) -> None:
    for part in ("state", "grads"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    assert all(torch.equal(x, y) for x, y in zip(a["moments"], b["moments"], strict=True))
    assert torch.equal(a["rng"], b["rng"])


def _assert_replicas_identical(steps: list[dict[str, Any]]) -> None:
    assert steps
    for record in steps:
        for key in ("probe", "bank"):
            if key in record:
                first, *others = record[f"{key}_all_ranks"]
                assert all(torch.equal(first, other) for other in others), key


def test_ddp_backbone_untouched_and_two_ranks_equal_one_process(tmp_path):
    """DDP: with BatchNorm + dropout the backbone is bitwise what it is without probes, on each rank; without them
    (so that 2 ranks train the backbone as 1 process does) the probe on 2 ranks equals 1 process on both halves."""
    specs = [Spec("distprobe_ddp"), Spec("distprobe_ddp", norm=False)]
    ranks = run_distributed(run_many, 2, specs, str(tmp_path / "ddp"), timeout=240.0)
    for rank in ranks:
        _assert_same_backbone(rank[0]["plain"], rank[0]["probed"])
        _assert_replicas_identical(rank[0]["steps"])
        _assert_replicas_identical(rank[1]["steps"])
    single = run(0, 1, Spec("auto", norm=False), str(tmp_path / "single"))
    for two, one in zip(ranks[0][1]["steps"], single["steps"], strict=True):
        torch.testing.assert_close(two["probe"], one["probe"], rtol=1e-5, atol=1e-5)
    # Exact over the 11 validation samples (the sampler pads rank 1 with a repeat): k / 11 on both.
    two_ranks = [e["eval/own_top1"] for e in ranks[0][1]["evals"]]
    assert two_ranks == pytest.approx([e["eval/own_top1"] for e in single["evals"]], abs=1e-6)
    assert all(round(v * 11) == pytest.approx(v * 11, abs=1e-4) for v in two_ranks)
    assert ranks[0][1]["evals"][-1]["eval/own_top1"] == ranks[1][1]["evals"][-1]["eval/own_top1"]


@pytest.mark.parametrize(
    "spec",
    [
        pytest.param(Spec("distprobe_fsdp2", fsdp2=True, uneven=True), id="fsdp2"),
        # Without BatchNorm: each rank's running statistics differ (no SyncBatchNorm) and the checkpoint restores one
        # copy, so a resumed backbone's eval-mode features would differ from the uninterrupted run's on their own.
        pytest.param(Spec("distprobe_fsdp2", fsdp2=True, norm=False, uneven=True, resume=True), id="fsdp2_resume"),
        pytest.param(Spec("distprobe_deepspeed_stage_3", uneven=True), id="deepspeed_stage_3"),
        pytest.param(
            Spec("distprobe_deepspeed_stage_3", norm=False, uneven=True, resume=True), id="deepspeed_stage_3_resume"
        ),
        pytest.param(Spec("distprobe_fsdp", uneven=True), id="fsdp1"),
        pytest.param(Spec("distprobe_deepspeed_stage_1", uneven=True), id="deepspeed_stage_1"),
        pytest.param(Spec("distprobe_deepspeed_stage_2", uneven=True), id="deepspeed_stage_2"),
        pytest.param(Spec("distprobe_ddp", norm=False, uneven=True, resume=True), id="ddp_resume"),
    ],
)
def test_sharded_backbones_do_not_hang_on_uneven_probe_loaders(tmp_path, spec):
    """Rank 0's probe loaders have 4 training and 3 validation batches, rank 1's 3 and 2: the extra forward (a
    collective) still runs at the same steps on every rank, the probe replicas stay identical, the backbone trains
    as without probes. Under DDP, FSDP2 and ZeRO-3 a run resumed from the epoch-0 checkpoint (rank 0's callback
    state: each rank finds its own loader position from the draw count) ends where the uninterrupted run did."""
    ranks = run_distributed(run, 2, spec, str(tmp_path), timeout=240.0)
    for rank in ranks:
        _assert_same_backbone(rank["plain"], rank["probed"])
        _assert_replicas_identical(rank["steps"])
        if spec.resume:
            tail = rank["steps"][-len(rank["resumed_steps"]) :]
            for uninterrupted, resumed in zip(tail, rank["resumed_steps"], strict=True):
                assert torch.equal(uninterrupted["probe"], resumed["probe"])
                assert torch.equal(uninterrupted["bank"], resumed["bank"])
            assert rank["resumed_evals"][-1] == rank["evals"][-1]
    assert ranks[0]["evals"] == ranks[1]["evals"]
