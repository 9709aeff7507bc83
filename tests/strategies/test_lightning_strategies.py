"""OnlineProbe under every distprobe Lightning strategy, on CPU with gloo and 2 real processes.

One spawned run per strategy (see `scenario.run`) feeds four checks:

(a) probe replicas are bitwise identical on every rank after every optimizer step, from different initial weights;
(b) the probe equals a single-process probe trained on the union of the ranks' batches;
(c) the backbone is sharded as the strategy intends, the probe is not, and the backbone trains as without probes;
(d) a run resumed from the epoch-0 checkpoint (sharded formats included) ends where the uninterrupted run ends.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from distprobe.bank import BankConfig, ProbeBank
from distprobe.engine import Probe, ProbeConfig
from helpers.dist import run_distributed
from strategies.scenario import (
    BANK_OPTIONS,
    EMBED_DIM,
    EPOCHS,
    NUM_CLASSES,
    NUM_VAL_SAMPLES,
    PROBE_OPTIMIZER,
    PROBE_SEED,
    PointDataset,
    Spec,
    run,
)

SPECS = {
    # bf16-mixed: the features reach the probe in bf16.
    "ddp": Spec("distprobe_ddp", precision="bf16-mixed"),
    "fsdp1_full": Spec("distprobe_fsdp"),
    "fsdp1_sharded": Spec("distprobe_fsdp", strategy_kwargs={"state_dict_type": "sharded"}),
    "fsdp2": Spec("distprobe_fsdp2", kind="fsdp2"),
    # 1 data-parallel x 2 tensor-parallel: both ranks see the same batches; the features are DTensors.
    "fsdp2_tp_1x2": Spec(
        "distprobe_fsdp2", kind="tp", strategy_kwargs={"data_parallel_size": 1, "tensor_parallel_size": 2}
    ),
    # The default registration (a plain dict, invisible to nn.Module) beside the user-registered ModuleDict elsewhere.
    # 2 data-parallel x 2 tensor-parallel on 4 ranks: probes replicate over pairs of ranks and agree across all four.
    "fsdp2_tp_2x2": Spec(
        "distprobe_fsdp2",
        kind="tp",
        strategy_kwargs={"data_parallel_size": 2, "tensor_parallel_size": 2},
        world_size=4,
    ),
    "deepspeed_stage_1": Spec("distprobe_deepspeed_stage_1", probes_in_module_dict=False),
    "deepspeed_stage_2": Spec("distprobe_deepspeed_stage_2"),
    "deepspeed_stage_3": Spec("distprobe_deepspeed_stage_3"),
    # Lightning's *-true precision casts the whole LightningModule: probes in its nn.ModuleDict must keep float32.
    "ddp_bf16_true": Spec("distprobe_ddp", precision="bf16-true"),
    "fsdp1_bf16_true": Spec("distprobe_fsdp", precision="bf16-true"),
    # Probe accumulation of 3 with 4 micro-steps an epoch: the epoch-0 checkpoint, written by Lightning with rank 0's
    # callback state only, falls inside a window; the resumed run must still end where the uninterrupted one did.
    "ddp_accumulate_3": Spec("distprobe_ddp", probe_accumulate=3),
    "fsdp2_accumulate_3": Spec("distprobe_fsdp2", kind="fsdp2", probe_accumulate=3),
    "deepspeed_stage_2_accumulate_3": Spec("distprobe_deepspeed_stage_2", probe_accumulate=3),
}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Lazily run each strategy once per module; every check of that strategy reads the same run."""
    cache: dict[str, Any] = {}

    def get(name: str) -> list[dict[str, Any]]:
        if name not in cache:
            tmp = tmp_path_factory.mktemp(name)
            spec = SPECS[name]
            cache[name] = run_distributed(run, spec.world_size, spec, str(tmp), timeout=240.0)
        return cache[name]

    return {"get": get}


def _reference(ranks: list[dict[str, Any]], accumulate: int) -> list[torch.Tensor]:
    """A single-process probe trained on the union of the data-parallel ranks' batches; its weights per step."""
    dp_size = ranks[0]["dp"][1]
    by_dp_rank = {}
    for result in ranks:
        by_dp_rank.setdefault(result["dp"][0], result)
    assert sorted(by_dp_rank) == list(range(dp_size))
    torch.manual_seed(PROBE_SEED)  # rank 0's initial probe, which replication broadcasts
    probe = Probe.build(
        ProbeConfig(
            name="reference",
            probe=nn.Linear(EMBED_DIM, NUM_CLASSES),
            optimizer=PROBE_OPTIMIZER,
            accumulate_grad_batches=accumulate,
        )
    )
    weights = []
    for step in range(len(ranks[0]["probed"])):
        records = [by_dp_rank[d]["probed"][step] for d in range(dp_size)]
        probe.train_step(torch.cat([r["features"] for r in records]), torch.cat([r["labels"] for r in records]))
        weights.append(torch.cat([p.detach().reshape(-1) for p in probe.module.parameters()]))
    return weights


def _bank_reference(ranks: list[dict[str, Any]], accumulate: int) -> list[torch.Tensor]:
    """A single-process bank trained on the union of the data-parallel ranks' batches; its flat weights per step."""
    dp_size = ranks[0]["dp"][1]
    by_dp_rank = {r["dp"][0]: r for r in reversed(ranks)}
    config = BankConfig(name="bank", inputs=["embedding"], accumulate_grad_batches=accumulate, **BANK_OPTIONS)
    bank = ProbeBank.build(config)
    weights = []
    for step in range(len(ranks[0]["probed"])):
        records = [by_dp_rank[d]["probed"][step] for d in range(dp_size)]
        bank.train_step([torch.cat([r["features"] for r in records])], torch.cat([r["labels"] for r in records]))
        bank.settle()
        weights.append(bank.heads.flat.detach().clone())
    return weights


def _reference_top1(ranks: list[dict[str, Any]], run_name: str, epoch: int) -> float:
    """Top-1 accuracy over the unique validation samples of the probe as it was at the end of ``epoch``."""
    steps_per_epoch = len(ranks[0]["probed"]) // EPOCHS
    flat = ranks[0]["probed"][(epoch + 1) * steps_per_epoch - 1]["probe"]
    weight = flat[: NUM_CLASSES * EMBED_DIM].reshape(NUM_CLASSES, EMBED_DIM)
    bias = flat[NUM_CLASSES * EMBED_DIM :]
    features: dict[int, torch.Tensor] = {}
    for result in ranks:
        for record in result[f"{run_name}_val"][0]:
            if record["epoch"] == epoch:
                for i, x in zip(record["idx"].tolist(), record["features"]):
                    features.setdefault(i, x)
    assert sorted(features) == list(range(NUM_VAL_SAMPLES))
    x = torch.stack([features[i] for i in range(NUM_VAL_SAMPLES)]).float()
    preds = (x @ weight.T + bias).argmax(-1)
    return (preds == PointDataset(NUM_VAL_SAMPLES, seed=1).y).float().mean().item()


def _check_sharding(name: str, spec: Spec, facts: dict[str, Any]) -> None:
    assert facts["probe_types"] == ["Parameter"], facts
    assert facts["probe_shapes"] == [(NUM_CLASSES, EMBED_DIM), (NUM_CLASSES,)], facts
    assert facts["probe_dtypes"] == ["torch.float32"], facts
    assert not facts["probe_in_optimizer"], facts
    assert not facts["probe_ds_attrs"], facts
    assert facts["backbone_in_optimizer"], facts
    full = facts["backbone_full_numel"]
    if name.startswith("ddp"):
        assert facts["wrapper"] == "DistributedDataParallel"
        probe_names = [f"callbacks_modules.linear.{p}" for p in ("weight", "bias")]
        bank_names = ["callbacks_modules.bank.flat"]
        assert facts["ddp_ignores"] == sorted(probe_names + bank_names), facts
        assert facts["backbone_local_numel"] == full
        if spec.precision == "bf16-mixed":
            assert facts["feature_dtype"] == "torch.bfloat16"
    elif name.startswith("fsdp1"):
        assert facts["wrapper"] == "FullyShardedDataParallel"
        assert facts["flat_local_numel"] == facts["flat_full_numel"] // spec.world_size  # one flat parameter, sharded
        assert facts["flat_fqns"] == [f"encoder.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")]
    elif spec.kind == "fsdp2":
        assert facts["backbone_weight_type"] == "DTensor"
        assert facts["backbone_placements"] == ["S(0)"]
        assert facts["backbone_local_numel"] == full // spec.world_size
    elif name.startswith("fsdp2_tp"):
        assert facts["backbone_weight_type"] == "DTensor"
        assert facts["feature_type"] == "DTensor"
        assert any(p.startswith("S(") for p in facts["feature_placements"])  # sharded: full_tensor() must gather
        assert "S(0)" in facts["backbone_placements"]  # column-parallel over the tensor-parallel dim
        assert facts["backbone_local_numel"] == full // spec.world_size
        assert facts["probe_group_size"] == spec.strategy_kwargs["data_parallel_size"]  # not the world
    elif name.startswith("deepspeed"):
        stage = int(spec.strategy[-1])
        assert facts["wrapper"] == "DeepSpeedEngine"
        assert facts["zero_stage"] == stage
        assert facts["backbone_ds_partitioned"] == (stage == 3)
    if not name.startswith("fsdp2_tp"):
        assert facts["probe_group_size"] == spec.world_size


def _assert_same_steps(actual: list[dict[str, Any]], expected: list[dict[str, Any]], probe: bool) -> None:
    assert [r["step"] for r in actual] == [r["step"] for r in expected]
    for got, want in zip(actual, expected, strict=True):
        assert torch.equal(got["features"], want["features"]), got["step"]
        assert torch.equal(got["loss"], want["loss"]), got["step"]
        if probe:
            torch.testing.assert_close(got["probe"], want["probe"], rtol=0, atol=1e-6)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("name", list(SPECS))
def test_online_probe_under_strategy(name: str, outcomes: dict[str, Any]) -> None:
    ranks = outcomes["get"](name)

    # (a) replicas bitwise identical after every optimizer step, on every rank, in the fresh and the resumed run.
    for result in ranks:
        for run_name in ("probed", "resumed"):
            for record in result[run_name]:
                for other in record["probe_all_ranks"]:
                    assert torch.equal(other, record["probe"]), (run_name, record["step"])

    # (b) equal to one process trained on the union of the data-parallel ranks' batches.
    for step, want in enumerate(_reference(ranks, SPECS[name].probe_accumulate)):
        torch.testing.assert_close(ranks[0]["probed"][step]["probe"], want, rtol=0, atol=1e-5)

    # The bank alongside: replicas identical, equal to one process on the union of the ranks' batches.
    bank_reference = _bank_reference(ranks, SPECS[name].probe_accumulate)
    for result in ranks:
        for run_name in ("probed", "resumed"):
            for record in result[run_name]:
                for other in record["bank_all_ranks"]:
                    assert torch.equal(other, record["bank"]), (run_name, record["step"])
    for step, want in enumerate(bank_reference):
        torch.testing.assert_close(ranks[0]["probed"][step]["bank"], want, rtol=1e-4, atol=2e-5)

    # (c) sharded as intended, probe untouched by the strategy, backbone trains exactly as without probes.
    for result in ranks:
        _check_sharding(name, SPECS[name], result["facts"])
        _assert_same_steps(result["probed"], result["plain"], probe=False)
        for got, want in zip(result["probed_val"][0], result["plain_val"][0], strict=True):
            assert torch.equal(got["features"], want["features"])

    # The eval metric, reduced over the data-parallel group, counts every validation sample once.
    for epoch in range(EPOCHS):
        want = _reference_top1(ranks, "probed", epoch)
        for result in ranks:
            assert result["probed_val"][1][epoch] == pytest.approx(want, abs=1e-6), epoch

    # (d) resume from the epoch-0 checkpoint and finish where the uninterrupted run did.
    if name == "fsdp1_sharded" or name.startswith("deepspeed"):
        assert ranks[0]["ckpt_is_dir"]  # the sharded formats are directories
    for result in ranks:
        steps = len(result["probed"])
        assert len(result["resumed"]) == steps // 2
        _assert_same_steps(result["resumed"], result["probed"][steps // 2 :], probe=True)
        for got, want in zip(result["resumed"], result["probed"][steps // 2 :], strict=True):
            assert torch.equal(got["bank"], want["bank"]), got["step"]
        assert result["resumed_val"][1] == result["probed_val"][1][1:]

    # trainer.validate outside fit works too, and every rank reports the same, group-reduced, value.
    values = [result["validate_only"][0]["eval/linear_top1"] for result in ranks]
    assert len(set(values)) == 1 and 0.0 <= values[0] <= 1.0
