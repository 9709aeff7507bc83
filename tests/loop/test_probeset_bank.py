"""Banks in the plain-torch `ProbeSet`: beside probes, on 2 gloo ranks equal to one process, checkpointed by name."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from distprobe.bank import BankConfig
from distprobe.loop import ProbeSet
from helpers.dist import run_distributed

D, C = 6, 4
BANK = {
    "name": "grid",
    "input": ["a", "b"],
    "target": "y",
    "num_classes": C,
    "lr": [0.1, 0.01],
    "normalization": [None, "batchnorm"],
    "optimizer": {"type": "AdamW"},
    "accumulate_grad_batches": 2,
}


def _batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            {"a": torch.randn(8, D, generator=g), "b": torch.randn(8, D + 1, generator=g)},
            {"y": torch.randint(0, C, (8,), generator=g)},
        )
        for _ in range(n)
    ]


def _set():
    torch.manual_seed(0)
    probe = {"name": "linear", "probe": nn.Linear(D, C), "optimizer": "SGD", "input": "a", "target": "y"}
    return ProbeSet.build([probe], banks=[BANK])


def _shard(batch, rank, world):
    features, targets = batch
    return {k: v[rank::world] for k, v in features.items()}, {k: v[rank::world] for k, v in targets.items()}


def test_bank_beside_a_probe_in_one_process():
    probes = _set()
    with pytest.raises(KeyError, match="not built yet"):
        probes.bank("grid")  # no in_features: the heads come from the first step
    for features, targets in _batches(4):
        losses = probes.step(features, targets)
    assert losses["grid"].shape == (8,) and losses["linear"].shape == ()
    bank = probes.bank("grid")
    assert bank.head_ids[0] == "a/lr=0.1/wd=0/norm=none"
    features, targets = _batches(1, seed=5)[0]
    preds = probes.evaluate(features, targets)
    assert preds["grid"].shape == (8, 8, C)
    values = probes.compute_metrics()
    assert "eval/linear_top1" not in values  # the probe has no metrics; the bank reports top-1 by default
    assert f"eval/grid/{bank.head_ids[3]}_top1" in values and "eval/grid_best_top1" in values
    train = probes.compute_train_metrics()
    assert "train/grid_loss_epoch" in train and "train/grid_bad_batches/nonfinite_features" in train


def test_bad_bank_input_fails_with_a_clear_error():
    probes = _set()
    features, targets = _batches(1)[0]
    del features["b"]
    with pytest.raises(ValueError, match="grid"):
        probes.step(features, targets)


def _worker(rank, world):
    probes = _set()
    data = _batches(5)
    for batch in data[:3]:
        probes.step(*_shard(batch, rank, world))
    state = probes.state_dict()  # a collective; mid-window (3 micro-steps, windows of 2)
    saved = [state]
    dist.broadcast_object_list(saved, src=0)
    resumed = _set()
    resumed.load_state_dict(saved[0])  # the bank's heads come from the saved sizes
    for batch in data[3:]:
        probes.step(*_shard(batch, rank, world))
        resumed.step(*_shard(batch, rank, world))
    probes.bank("grid").settle()  # apply a step whose all-reduce may still be in flight
    resumed.bank("grid").settle()
    flat = probes.bank("grid").heads.flat.detach().clone()
    return flat, torch.equal(resumed.bank("grid").heads.flat, flat)


@pytest.mark.distributed
def test_two_ranks_equal_one_process_and_resume_mid_window():
    results = run_distributed(_worker, 2)
    reference = _set()
    for batch in _batches(5):
        reference.step(*batch)
    reference.bank("grid").settle()
    for flat, resumed_equal in results:
        assert resumed_equal
        torch.testing.assert_close(flat, reference.bank("grid").heads.flat.detach(), rtol=1e-4, atol=2e-5)
    assert torch.equal(results[0][0], results[1][0])


def test_bank_config_objects_are_accepted():
    config = BankConfig(name="solo", inputs=["x"], num_classes=C, in_features=D)
    probes = ProbeSet.build([], banks=[config])
    probes.step(torch.randn(4, D), torch.randint(0, C, (4,)))  # one source: a plain tensor is its features
    assert probes.bank("solo").micro_step == 1
