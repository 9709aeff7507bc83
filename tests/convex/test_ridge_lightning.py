"""`OnlineRidge` in real `lightning.Trainer` fits: every logged value equals a float64 NumPy closed form on the union
of the training features the ranks saw, 2 ranks equal 1 process, bad batches are skipped and counted, and a fit
resumed between epochs logs what the uninterrupted one did; under DDP, FSDP2 and DeepSpeed ZeRO-3 with features
tapped from a submodule, and tensor parallelism (DTensor features). One spawn per world size serves every check."""

import math

import numpy as np
import pytest
import torch
from tests.convex import ridge_scenario
from tests.convex.ridge_scenario import L2, RidgeRun
from tests.convex.test_ridge import numpy_ridge
from tests.helpers.dist import run_distributed
from tests.strategies.scenario import EPOCHS, NUM_CLASSES, NUM_SAMPLES, NUM_VAL_SAMPLES, Spec

from distprobe.bank.selection import selects

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

DDP = Spec("distprobe_ddp")
RUNS_ON_TWO = {
    "frozen": RidgeRun(DDP, lr=0.0),
    "trained": RidgeRun(DDP, nan_at=(0, 1, 1), resume=True),
    # Features tapped from a submodule (a forward hook) under sharded strategies.
    "fsdp2_tapped": RidgeRun(Spec("distprobe_fsdp2", kind="fsdp2"), input="encoder.2"),
    "zero3_tapped": RidgeRun(Spec("distprobe_deepspeed_stage_3"), input="encoder.2"),
    # Tensor parallelism on a 1 x 2 mesh: the features are DTensors, both ranks see the same batches, and the
    # data-parallel group is each rank alone.
    "tp_1x2": RidgeRun(
        Spec("distprobe_fsdp2", kind="tp", strategy_kwargs={"data_parallel_size": 1, "tensor_parallel_size": 2})
    ),
}
RUNS_ON_ONE = {"frozen": RidgeRun(DDP, lr=0.0)}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return run_distributed(ridge_scenario.run_all, 2, RUNS_ON_TWO, str(tmp_path_factory.mktemp("ridge2")))


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    return run_distributed(ridge_scenario.run_all, 1, RUNS_ON_ONE, str(tmp_path_factory.mktemp("ridge1")))


def expected_values(ranks: list[dict], epoch: int) -> dict[str, float]:
    """What the ridge must log after ``epoch``'s validation, from the union of every rank's records, in NumPy."""
    xs, ys = [], []
    for record in ranks:
        for ep, emb, labels in record["train"]:
            batch = np.asarray(emb)
            if ep == epoch and np.isfinite(batch).all():  # a batch with a NaN is skipped whole
                xs.append(batch)
                ys.extend(labels)
    x, y = np.concatenate(xs), np.asarray(ys)
    val = {}
    for record in ranks:
        for ep, emb, labels, idx in record["val"]:
            if ep == epoch:
                for row, label, i in zip(emb, labels, idx, strict=True):
                    val[i] = (row, label)  # a padded repeat lands on the same index: each sample once
    assert sorted(val) == list(range(NUM_VAL_SAMPLES))
    vx = np.asarray([val[i][0] for i in range(NUM_VAL_SAMPLES)])
    vy = np.asarray([val[i][1] for i in range(NUM_VAL_SAMPLES)])
    select = selects(torch.arange(NUM_VAL_SAMPLES), 0.2).numpy()
    out, select_top1, report_top1 = {}, [], []
    for lam in L2:
        w, b = numpy_ridge(x, y, NUM_CLASSES, lam)
        correct = (vx @ w + b).argmax(1) == vy
        out[f"eval/ridge/l2={lam:g}_top1"] = correct.mean()
        select_top1.append(correct[select].mean())
        report_top1.append(correct[~select].mean())
    best = max(sorted(range(len(L2)), key=lambda i: -L2[i]), key=lambda i: select_top1[i])
    out["eval/ridge_best_top1"] = report_top1[best]
    out["eval/ridge_best_l2"] = L2[best]
    return out, len(x)


def assert_logged(logged: dict[str, float], expected: dict[str, float]) -> None:
    assert set(logged) == set(expected)
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, rel=1e-6), key


@pytest.mark.parametrize("name", list(RUNS_ON_TWO))
def test_each_lambda_equals_the_numpy_closed_form_on_the_union_of_training_features(name, two_ranks):
    whole = [per_rank[name]["whole"] for per_rank in two_ranks]
    data_parallel = whole[:1] if name.startswith("tp_") else whole  # under TP both ranks saw the same samples
    for epoch in range(EPOCHS):
        expected, count = expected_values(data_parallel, epoch)
        assert count == NUM_SAMPLES - (4 if RUNS_ON_TWO[name].nan_at == (epoch, 1, 1) else 0)
        for rank_result in whole:
            assert_logged(rank_result["logged"][epoch], expected)


def test_two_ranks_equal_one_process(one_rank, two_ranks):
    (one,) = [r["frozen"]["whole"] for r in one_rank]
    two = two_ranks[0]["frozen"]["whole"]
    for epoch in range(EPOCHS):
        expected, count = expected_values([one], epoch)
        assert count == NUM_SAMPLES
        assert_logged(one["logged"][epoch], expected)
        for key, value in one["logged"][epoch].items():
            assert two["logged"][epoch][key] == pytest.approx(value, rel=1e-6), key


def test_a_bad_batch_is_skipped_counted_and_checkpointed(two_ranks):
    trained = [per_rank["trained"] for per_rank in two_ranks]
    _, count = expected_values([r["whole"] for r in trained], 0)
    assert count == NUM_SAMPLES - 4  # rank 1's second batch of epoch 0 held a NaN
    for result in trained:
        assert result["whole"]["final"]["train/ridge_bad_batches/nonfinite_features"] == 1
        assert result["whole"]["final"]["train/ridge_bad_batches/targets_out_of_range"] == 0
    # Lightning writes rank 0's callback state: it holds the group's sums, by the ridge's name.
    (state,) = trained[0]["saved"].values()
    assert list(trained[0]["saved"]) == ["OnlineRidge{'name': 'ridge'}"]
    assert float(state["stats"]["flat"][0]) == NUM_SAMPLES - 4
    assert state["bad_counts"].tolist()[0] == 1


def test_resume_between_epochs_logs_what_the_uninterrupted_fit_did(two_ranks):
    for per_rank in two_ranks:
        result = per_rank["trained"]
        last = EPOCHS - 1
        assert result["resumed"]["logged"][-1] == result["whole"]["logged"][last]
        # The run-long bad-batch count came back from the checkpoint (the bad batch was in epoch 0).
        assert result["resumed"]["final"]["train/ridge_bad_batches/nonfinite_features"] == 1
        assert not math.isnan(result["resumed"]["logged"][-1]["eval/ridge_best_top1"])
