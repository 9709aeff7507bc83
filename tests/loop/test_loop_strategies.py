"""`ProbeSet` beside a backbone wrapped in DDP, FSDP1, FSDP2 (fully_shard), FSDP2 + tensor parallel (1 DP x 2 TP)
or a DeepSpeed engine (ZeRO 1/2/3).

All strategies share one spawn of 2 gloo ranks; each runs the same training with probes and without. On the ranks:
probe replicas are bitwise identical after build and after every step although every rank initialised them
differently; the probe step leaves the backbone's gradients untouched; probes saved mid-run (mid accumulation window)
and loaded into a freshly built set finish bitwise equal to the uninterrupted ones. Here: the probes equal a
single-process probe trained on the union of the ranks' batches, the backbone ends identical with and without probes,
and the exact distributed eval metric equals the single-process one.
"""

from __future__ import annotations

import pytest
import torch
from loop_harness import STRATEGIES, initial_weights, probe_specs, run_all

from distprobe.loop import ProbeSet
from helpers.dist import run_distributed

pytestmark = pytest.mark.distributed


def single_process_reference(seen_per_rank: list[list[dict[str, torch.Tensor]]], eval_inputs: list[dict]) -> tuple:
    specs = probe_specs(seed=0)
    weights = initial_weights(seed=10)  # rank 0's initial probes: building broadcasts them
    for spec in specs:
        spec["probe"].load_state_dict(weights[spec["name"]])
    reference = ProbeSet.build(specs, total_steps=len(seen_per_rank[0]))
    assert reference.dp_group is None
    for step in range(len(seen_per_rank[0])):
        union = {key: torch.cat([seen[step][key] for seen in seen_per_rank]) for key in seen_per_rank[0][step]}
        reference.step(union, union)
    features = torch.cat([e["embedding"] for e in eval_inputs])
    labels = torch.cat([e["label"] for e in eval_inputs])
    reference.evaluate({"embedding": features, "projection": torch.zeros(len(labels), 8)}, {"label": labels})
    return reference, reference.compute_metrics()


@pytest.fixture(scope="module")
def runs():
    """Every strategy's run, from one spawn of 2 ranks (shared by the parametrized tests below)."""
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        strategies = tuple(s for s in STRATEGIES if not s.startswith("zero"))
    else:
        strategies = STRATEGIES
    return run_distributed(run_all, 2, strategies, timeout=200)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_probe_set_beside_wrapped_backbone(runs, strategy):
    if strategy not in runs[0]:
        pytest.skip("deepspeed is not installed")
    for status, value in (rank_runs[strategy] for rank_runs in runs):
        if status == "error":
            pytest.fail(f"{strategy} failed on a rank:\n{value}")
    results = [rank_runs[strategy][1] for rank_runs in runs]

    for rank, result in enumerate(results):
        for a, b in zip(result["backbone"], result["backbone_without_probes"], strict=True):
            assert torch.equal(a, b), f"{strategy}: rank {rank}'s backbone trained differently with probes beside it"

    # One entry per data-parallel rank: ranks of one tensor-parallel group saw the same batches.
    per_dp_rank = list({r["dp_rank"]: r for r in results}.values())
    reference, ref_metrics = single_process_reference(
        [r["seen"] for r in per_dp_rank], [r["eval_inputs"] for r in per_dp_rank]
    )
    for name in reference.names:
        ref_state = reference[name].module.state_dict()
        for key, value in results[0]["probes"][name].items():
            torch.testing.assert_close(value, ref_state[key], rtol=0, atol=1e-5, msg=f"{strategy}: {name}.{key}")

    assert set(results[0]["eval"]) == {"eval/linear_top1"}
    for result in results:
        torch.testing.assert_close(result["eval"]["eval/linear_top1"], ref_metrics["eval/linear_top1"])
