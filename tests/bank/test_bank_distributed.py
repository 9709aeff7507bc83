"""A bank on real gloo ranks: identical replicas, N ranks equal to one process, one all-reduce per optimizer step,
resume mid-window from rank 0's state, and a best head chosen without ever seeing its report split."""

import pytest
import torch
import torch.distributed as dist
from tests.helpers.dist import run_distributed

from distprobe.bank import BankConfig, ProbeBank

pytestmark = pytest.mark.distributed

D, C, B = 6, 5, 8
STEPS = 9


def _config(**overrides):
    options = dict(
        name="grid",
        inputs=["a", "b"],
        num_classes=C,
        lr=[0.2, 0.02],
        weight_decay=[0.0, 0.01],
        optimizer={"type": "AdamW"},
        accumulate_grad_batches=2,
        gradient_clip_val=1.0,
        in_features={"a": D, "b": D + 2},
    )
    options.update(overrides)
    return BankConfig(**options)


def _data(steps=STEPS, world=1, seed=0):
    """The global batches; rank r of `world` takes rows r, r + world, ... of each."""
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(B * 2, D, generator=g),
            torch.randn(B * 2, D + 2, generator=g),
            torch.randint(0, C, (B * 2,), generator=g),
        )
        for _ in range(steps)
    ]


def _shard(batch, rank, world):
    return [t[rank::world] for t in batch]


def _train(bank, data, rank, world):
    for batch in data:
        a, b, y = _shard(batch, rank, world)
        bank.train_step([a, b], y)
    bank.settle()


def _worker(rank, world, overrides):
    count = {"all_reduce": 0, "bytes": 0}
    original = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        count["all_reduce"] += 1
        count["bytes"] += tensor.numel() * tensor.element_size()
        return original(tensor, *args, **kwargs)

    bank = ProbeBank.build(_config(**overrides), dp_group=dist.group.WORLD)
    dist.all_reduce = counting
    try:
        _train(bank, _data(), rank, world)
    finally:
        dist.all_reduce = original
    flat = bank.heads.flat.detach().clone()
    everyone = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(everyone, flat)
    return {
        "flat": flat,
        "identical": all(torch.equal(everyone[0], f) for f in everyone),
        **count,
        "numel": flat.numel(),
    }


@pytest.mark.parametrize("world", [2, 4])
def test_replicas_identical_and_equal_to_one_process_with_one_all_reduce_per_step(world):
    results = run_distributed(_worker, world, {})
    reference = ProbeBank.build(_config())
    _train(reference, _data(), 0, 1)
    for r in results:
        assert r["identical"]
        torch.testing.assert_close(r["flat"], reference.heads.flat.detach(), atol=2e-6, rtol=1e-5)
        # 9 micro-steps, windows of 2: 4 optimizer steps, each one all-reduce of exactly the flat gradient.
        assert r["all_reduce"] == 4
        assert r["bytes"] == 4 * r["numel"] * 4


def test_batchnorm_heads_equal_one_process():
    results = run_distributed(_worker, 2, {"normalization": [None, "batchnorm"]})
    reference = ProbeBank.build(_config(normalization=[None, "batchnorm"]))
    _train(reference, _data(), 0, 1)
    for r in results:
        assert r["identical"]
        torch.testing.assert_close(r["flat"], reference.heads.flat.detach(), atol=2e-5, rtol=1e-4)


def _resume_worker(rank, world, stop):
    data = _data()
    full = ProbeBank.build(_config(), dp_group=dist.group.WORLD)
    _train(full, data, rank, world)
    first = ProbeBank.build(_config(), dp_group=dist.group.WORLD)
    _train(first, data[:stop], rank, world)
    state = first.state_dict()  # a collective; Lightning would save rank 0's only
    saved = [state]
    dist.broadcast_object_list(saved, src=0)
    resumed = ProbeBank.build(_config(), dp_group=dist.group.WORLD, seed=123)  # other weights until loaded
    resumed.load_state_dict(saved[0])
    _train(resumed, data[stop:], rank, world)
    return torch.equal(resumed.heads.flat, full.heads.flat), (resumed.heads.flat - full.heads.flat).abs().max().item()


@pytest.mark.parametrize("stop", [3, 4])  # mid-window (3 micro-steps of windows of 2) and at a window's close
def test_resume_from_rank0_state_equals_uninterrupted_run(stop):
    for equal, diff in run_distributed(_resume_worker, 2, stop):
        assert equal, diff


def test_best_head_never_sees_its_report_split():
    """Relabelling the report split cannot change the chosen head; relabelling the selection split can."""
    config = BankConfig(
        name="grid", inputs=["x"], num_classes=C, lr=[1.0, 0.1, 0.01], in_features=D, selection_fraction=0.3
    )
    bank = ProbeBank.build(config)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        x = torch.randn(32, D, generator=g)
        bank.train_step([x], (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long())
    x = torch.randn(400, D, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    from distprobe.bank.selection import global_positions, selects

    select = selects(global_positions(0, 400, 0, 1, torch.device("cpu")), 0.3)
    assert 0.2 < select.float().mean() < 0.4

    def best_with(labels):
        bank.start_eval_epoch()
        for start in range(0, 400, 64):  # any batching gives the same split
            bank.eval_step([x[start : start + 64]], labels[start : start + 64])
        values = bank.compute_eval_metrics()
        return int(bank.best_index), float(values["best_top1"])

    base, reported = best_with(y)
    # Every report-split label replaced by each head's worst guess: the choice stays, the reported value moves.
    scrambled = torch.where(select, y, (y + 1) % C)
    again, reported_again = best_with(scrambled)
    assert again == base
    assert reported_again < reported
    # The selection split's labels made to favour another head: the choice follows the selection split.
    preds = bank.predict([x])
    other = (base + 1) % 3
    favour_other = torch.where(select, preds[:, other].argmax(-1), y)
    assert best_with(favour_other)[0] == other
