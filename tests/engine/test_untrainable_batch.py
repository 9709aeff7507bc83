"""A micro-batch too small to train on (no sample; one sample through a probe's BatchNorm of one process, which torch
refuses in training; on two or more ranks the BatchNorm's statistics span the group, so one sample trains) never takes
the training down: it adds nothing, its window's step is skipped on every rank and counted in
``skipped_steps``, not as bad data, and every member ends as it would have without it. An epoch whose last batch holds
one sample is the common case (a dataset of 193 at batch 32)."""

import pytest
import torch
from torch import nn

from distprobe.callbacks import OnlineProbe
from distprobe.loop import ProbeSet
from helpers.dist import run_distributed
from helpers.models import EMBED_DIM, NUM_CLASSES, Backbone, loader, trainer

D, C = 5, 3


def _members(accumulate=1):
    torch.manual_seed(0)
    optimizer = {"type": "SGD", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.1}
    return ProbeSet.build(
        [
            {
                "name": "bn",
                "probe": nn.Sequential(nn.BatchNorm1d(D), nn.Linear(D, C)),
                "optimizer": optimizer,
                "accumulate_grad_batches": accumulate,
                "input": "x",
                "target": "y",
            },
            {"name": "plain", "probe": nn.Linear(D, C), "optimizer": optimizer, "input": "x", "target": "y"},
        ],
        banks=[{"name": "bank", "num_classes": C, "inputs": ["x"], "target": "y", "lr": [0.1, 0.01], "in_features": D}],
        knns=[{"name": "knn", "num_classes": C, "queue_length": 32, "k": (1,), "input": "x", "target": "y"}],
        ridges=[{"name": "ridge", "num_classes": C, "input": "x", "target": "y"}],
    )


def _batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, D, generator=g)}, {"y": torch.randint(0, C, (n,), generator=g)}


def _tensors(state, prefix=""):
    flat = {}
    for key, value in state.items():
        if isinstance(value, dict):
            flat.update(_tensors(value, f"{prefix}{key}."))
        elif isinstance(value, torch.Tensor):
            flat[f"{prefix}{key}"] = value
    return flat


def _assert_same(a, b, skip=()):
    ta, tb = _tensors(a.state_dict()), _tensors(b.state_dict())
    assert ta.keys() == tb.keys()
    for key in ta:
        if not any(part in key for part in skip):
            assert torch.equal(ta[key], tb[key]), key


def test_empty_and_one_sample_batches_change_nothing_but_the_skip_counts():
    empty, one = _batch(0, 9), _batch(1, 8)
    seen = _members()
    for batch in (_batch(6, 0), empty, _batch(6, 1), one, _batch(6, 2)):
        seen.step(*batch)
    # The BatchNorm probe skips both; the others need one sample, so only the empty batch is nothing to them.
    without_both, without_empty = _members(), _members()
    for batch in (_batch(6, 0), _batch(6, 1), _batch(6, 2)):
        without_both.step(*batch)
    for batch in (_batch(6, 0), _batch(6, 1), one, _batch(6, 2)):
        without_empty.step(*batch)

    assert int(seen.probes["bn"].skipped_steps) == 2
    assert int(seen.probes["plain"].skipped_steps) == 1
    assert int(seen.banks["bank"].skipped_steps.max()) == 1
    for name in ("bn", "plain"):
        counts = seen.probes[name].metrics.bad_batches.compute()
        assert all(float(v) == 0 for v in counts.values()), counts  # not bad data
    for name, reference in (("bn", without_both), ("plain", without_empty)):
        ours, theirs = seen.probes[name].module.state_dict(), reference.probes[name].module.state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name  # weights and BatchNorm statistics
    _assert_same(seen, without_empty, skip=("bn.", "plain.", "skipped_steps"))

    preds = seen.evaluate(*empty)  # an empty validation batch: nothing predicted, nothing counted
    assert all(p.shape[0] == 0 for p in preds.values())


def test_an_empty_micro_batch_skips_its_whole_window():
    probes = _members(accumulate=2)
    probes.step(*_batch(6, 0))
    probes.step(*_batch(6, 1))  # a window closes: the probe steps
    module = probes.probes["bn"].module
    before = {k: t.clone() for k, t in module.state_dict().items()}
    probes.step(*_batch(6, 2))
    probes.step(*_batch(0, 3))  # the window's second micro-batch is empty: no step at all, not a half-window step
    # Weights, running statistics and `num_batches_tracked` are back where the window found them.
    after = {k: t.clone() for k, t in module.state_dict().items()}
    assert all(torch.equal(before[k], t) for k, t in after.items())
    assert int(probes.probes["bn"].skipped_steps) == 1
    probes.step(*_batch(6, 4))
    probes.step(*_batch(6, 5))
    assert not torch.equal(after["1.bias"], module[1].bias)  # the next window steps again


def _uneven(rank, world):
    probes = _members()
    probes.step(*_batch(6, rank))
    # One sample on rank 0: its BatchNorm normalises with the group's 5 samples, so it trains.
    probes.step(*_batch(1 if rank == 0 else 4, 10 + rank))
    one = _tensors(probes.state_dict())
    # No sample on rank 0: the window is skipped on both ranks, with no hang.
    probes.step(*_batch(0 if rank == 0 else 4, 20 + rank))
    probes.step(*_batch(6, 30 + rank))
    return one, _tensors(probes.state_dict())


@pytest.mark.distributed
def test_uneven_ranks_train_on_one_sample_skip_on_none_and_stay_identical():
    (one0, end0), (one1, end1) = run_distributed(_uneven, 2)
    for name in ("bn", "plain"):
        assert int(one0[f"{name}.skipped_steps"]) == int(one1[f"{name}.skipped_steps"]) == 0
        assert int(end0[f"{name}.skipped_steps"]) == int(end1[f"{name}.skipped_steps"]) == 1
    for rank0, rank1 in ((one0, one1), (end0, end1)):
        for key in rank0:
            if key.startswith(("bn.", "plain.")) and ".metrics." not in key:  # metric states are each rank's own
                assert torch.equal(rank0[key], rank1[key]), key  # replicas stay bitwise identical


def test_a_batchnorm_probe_survives_an_epoch_ending_in_one_sample():
    probe = OnlineProbe(
        None,
        name="linear",
        input="embedding",
        target="label",
        probe=nn.Sequential(nn.BatchNorm1d(EMBED_DIM), nn.Linear(EMBED_DIM, NUM_CLASSES)),
        optimizer="SGD",
    )
    t = trainer([probe], max_epochs=2, limit_val_batches=0)
    t.fit(Backbone(), loader(n=193))  # 6 batches of 32, then 1 sample: torch's BatchNorm refuses it in training
    assert t.state.finished
    assert float(t.callback_metrics["train/linear_skipped_steps"]) == 2  # one an epoch
    assert float(t.callback_metrics["train/linear_bad_batches/nonfinite_features"]) == 0


@pytest.mark.parametrize(
    ("family", "sample", "target"), [("attentive", (5, 8), ()), ("dense", (16, 8), (8, 8))], ids=["attentive", "dense"]
)
def test_a_token_bank_skips_an_empty_batch_and_ends_as_without_it(family, sample, target):
    def bank():
        torch.manual_seed(0)
        spec = {"name": "b", "num_classes": C, "inputs": ["x"], "target": "y", "lr": [0.1], "family": family}
        return ProbeSet.build([], banks=[spec])

    def batch(n, seed):
        g = torch.Generator().manual_seed(seed)
        return {"x": torch.randn(n, *sample, generator=g)}, {"y": torch.randint(0, C, (n, *target), generator=g)}

    seen, without = bank(), bank()
    for n, seed in ((0, 0), (4, 1), (0, 2), (4, 3)):  # the first batch is empty too: the heads are sized from shapes
        seen.step(*batch(n, seed))
        if n:
            without.step(*batch(n, seed))
    assert seen.banks["b"].skipped_steps.tolist() == [2]
    _assert_same(seen, without, skip=("skipped_steps",))
    assert all(p.shape[0] == 0 for p in seen.evaluate(*batch(0, 4)).values())
