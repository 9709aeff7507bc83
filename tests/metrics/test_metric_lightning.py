"""Exact eval through a real lightning.Trainer: OnlineProbes, DDP on gloo, Lightning's padding val sampler."""

from __future__ import annotations

import pytest
import torch
from lightning_workers import lightning_rank

from helpers.dist import run_distributed

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.mark.parametrize(
    ("world", "seed", "n", "batch_size"),
    [(2, 0, 23, 4), (3, 1, 2, 3)],  # 23 on 2 ranks pads one sample; 2 samples on 3 ranks: rank 2 holds only padding
)
def test_logged_eval_metrics_are_the_single_process_values(world, seed, n, batch_size):
    per_rank = run_distributed(lightning_rank, world, seed, n, batch_size, timeout=200)
    for rank, out in enumerate(per_rank):
        cases = ["random", "five"] if world == 2 else ["random"]
        for case in cases:
            got = out[case]
            for key, value in got["expected"].items():
                assert torch.equal(got["logged"][key], value), f"rank {rank} {case} {key}"
            # All probes of the trainer share one flat sync: 1 all-reduce + 2 gathers (AUROC), 1 probe or 3.
            assert got["counts"] == {"all_reduce": 1, "all_gather": 2}, f"rank {rank} {case}"
        if world == 2:
            assert out["five"]["logged"]["eval/p0_top1"].item() == pytest.approx(0.2)
