import copy

import pytest
import torch
from torch import nn

from distprobe.engine import LARS, Probe, ProbeConfig, skip


def make(module=None, **kwargs):
    torch.manual_seed(0)
    module = module or nn.Linear(8, 3)
    kwargs.setdefault("optimizer", {"type": "SGD", "lr": 0.1, "momentum": 0.9})
    return Probe.build(ProbeConfig(name="p", probe=module, **kwargs))


def data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_accumulating_four_micro_batches_equals_one_big_batch():
    x, y = data()
    big = make()
    small = make(accumulate_grad_batches=4)
    for _ in range(3):
        big.train_step(x, y)
        outs = [small.train_step(xi, yi) for xi, yi in zip(x.split(16), y.split(16))]
        assert [o.stepped for o in outs] == [False, False, False, True]
    for a, b in zip(big.module.parameters(), small.module.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_clipping_bounds_the_update(algorithm):
    x, y = data()
    x = x * 1000  # huge gradients
    probe = make(
        optimizer={"type": "SGD", "lr": 1.0, "momentum": 0.0}, gradient_clip_val=0.01, gradient_clip_algorithm=algorithm
    )
    before = [p.detach().clone() for p in probe.module.parameters()]
    probe.train_step(x, y)
    deltas = [(p.detach() - b) for p, b in zip(probe.module.parameters(), before)]
    if algorithm == "norm":
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(d) for d in deltas]))
        assert total <= 0.01 + 1e-6
    else:
        assert max(d.abs().max() for d in deltas) <= 0.01 + 1e-6
    unclipped = make(optimizer={"type": "SGD", "lr": 1.0, "momentum": 0.0})
    unclipped.train_step(x, y)
    assert any((p - b).abs().max() > 0.1 for p, b in zip(unclipped.module.parameters(), before))


def test_features_are_detached_and_cast_to_the_probe_dtype():
    backbone = nn.Linear(8, 8).to(torch.bfloat16)
    x, y = data()
    feats = backbone(x.to(torch.bfloat16))
    probe = make(module=nn.Linear(8, 3))
    out = probe.train_step(feats, y)
    assert out.preds.dtype == torch.float32
    assert backbone.weight.grad is None


def test_probe_under_autocast_trains_in_its_own_dtype():
    x, y = data()
    probe = make()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = probe.train_step(x.to(torch.bfloat16), y)
    assert out.preds.dtype == torch.float32 and out.loss.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in probe.module.parameters())


@pytest.mark.parametrize("optimizer", ["SGD", "AdamW", "LARS"])
@pytest.mark.parametrize("poison", ["nan", "inf"])
def test_non_finite_step_is_skipped_and_counted(optimizer, poison):
    x, y = data()
    probe = make(optimizer=optimizer)
    probe.train_step(x, y)
    weights = copy.deepcopy(probe.module.state_dict())
    bad = x.clone()
    bad[3, 2] = float(poison)
    probe.train_step(bad, y)
    assert int(probe.skipped_steps) == 1
    for k, v in probe.module.state_dict().items():
        assert torch.equal(v, weights[k]), k
    probe.train_step(x, y)
    assert int(probe.skipped_steps) == 1
    assert all(torch.isfinite(p).all() for p in probe.module.parameters())


def test_non_finite_first_step_leaves_a_fresh_optimizer_state():
    x, y = data()
    probe = make(optimizer="LARS")
    reference = make(optimizer="LARS")
    probe.train_step(x * float("nan"), y)
    probe.train_step(x, y)
    reference.train_step(x, y)
    for a, b in zip(probe.module.parameters(), reference.module.parameters()):
        assert torch.equal(a, b)


FUSED = [
    {"type": "AdamW", "lr": 1e-2, "fused": True},
    {"type": "Adam", "lr": 1e-2, "fused": True},
    {"type": "SGD", "lr": 0.1, "momentum": 0.9, "fused": True},
]


@pytest.mark.parametrize("optimizer", FUSED, ids=lambda o: o["type"])
def test_fused_optimizer_skips_a_non_finite_step_itself(optimizer):
    """A fused optimizer is handed `found_inf` and skips the step in its kernel: weights, state and step count stay."""
    x, y = data()
    probe = make(optimizer=optimizer)
    assert skip.skips_on_device(probe.optimizer) is False  # no state yet: the first step takes the undo path
    probe.train_step(x, y)
    assert skip.skips_on_device(probe.optimizer) is True
    weights = copy.deepcopy(probe.module.state_dict())
    state = copy.deepcopy(probe.optimizer.state_dict()["state"])
    bad = x.clone()
    bad[0, 0] = float("nan")
    probe.train_step(bad, y)
    assert int(probe.skipped_steps) == 1
    assert not hasattr(probe.optimizer, "found_inf")  # handed over for one step only, as GradScaler does
    for k, v in probe.module.state_dict().items():
        assert torch.equal(v, weights[k]), k
    for index, tensors in state.items():
        for key, value in tensors.items():
            assert torch.equal(probe.optimizer.state_dict()["state"][index][key], value), (index, key)


@pytest.mark.parametrize("optimizer", FUSED, ids=lambda o: o["type"])
def test_fused_optimizer_after_a_non_finite_first_step_trains_like_a_fresh_one(optimizer):
    """Fused SGD leaves a first momentum buffer uninitialised when it skips; the undo path covers the first step."""
    x, y = data()
    probe = make(optimizer=optimizer)
    reference = make(optimizer=optimizer)
    probe.train_step(x * float("nan"), y)
    for _ in range(2):
        probe.train_step(x, y)
        reference.train_step(x, y)
    for a, b in zip(probe.module.parameters(), reference.module.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_lars_trust_ratio_excludes_bias_and_moves_weights():
    layer = nn.Linear(4, 2)
    opt = LARS(layer.parameters(), lr=0.1, weight_decay=0.1)
    before = layer.weight.detach().clone()
    layer(torch.randn(8, 4)).pow(2).sum().backward()
    opt.step()
    assert not torch.equal(before, layer.weight)
    with pytest.raises(ValueError, match="lr must be > 0"):
        LARS(layer.parameters(), lr=0)


def test_state_dict_round_trip_mid_window_reproduces_the_run():
    x, y = data()
    chunks = list(zip(x.split(16), y.split(16)))
    straight = make(accumulate_grad_batches=3, optimizer="AdamW", scheduler="CosineAnnealingLR", metrics=None)
    for xi, yi in chunks:
        straight.train_step(xi, yi)
    first = make(accumulate_grad_batches=3, optimizer="AdamW", scheduler="CosineAnnealingLR")
    for xi, yi in chunks[:2]:  # stop inside the first window
        first.train_step(xi, yi)
    state = copy.deepcopy(first.state_dict())
    assert state["micro_step"] == 2 and state["window_grads_per_rank"] is not None
    resumed = make(accumulate_grad_batches=3, optimizer="AdamW", scheduler="CosineAnnealingLR")
    resumed.load_state_dict(state)
    for xi, yi in chunks[2:]:
        resumed.train_step(xi, yi)
    for a, b in zip(straight.module.parameters(), resumed.module.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"gradient_clip_algorithm": "l2"},
            r"probe 'p': argument 'gradient_clip_algorithm' got 'l2'.*\['norm', 'value'\]",
        ),
        ({"accumulate_grad_batches": 0}, r"probe 'p': argument 'accumulate_grad_batches' got 0"),
        ({"accumulate_grad_batches": -2}, r"argument 'accumulate_grad_batches' got -2"),
        ({"gradient_clip_val": -1.0}, r"argument 'gradient_clip_val' got -1.0"),
        ({"loss_fn": "ce"}, r"argument 'loss_fn' got 'ce'"),
    ],
)
def test_bad_config_is_rejected_with_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ProbeConfig(name="p", probe=nn.Linear(2, 2), **kwargs)


def test_eval_metrics_count_only_valid_samples_and_reset():
    import torchmetrics

    probe = make(metrics={"top1": torchmetrics.classification.MulticlassAccuracy(3, average="micro")})
    x, y = data(n=10)
    preds = probe.eval_step(x, y, num_valid=7)  # the last 3 are a sampler's padding
    expected = (preds[:7].argmax(-1) == y[:7]).float().mean()
    values = probe.compute_eval_metrics()
    torch.testing.assert_close(values["eval/p_top1"], expected)
    assert probe.metrics.val["eval/p_top1"]._update_count == 0  # reset for the next epoch


@pytest.mark.parametrize("scheduler", ["LinearLR", "CosineAnnealingLR", None])
def test_setting_total_steps_later_equals_knowing_them_at_build(scheduler):
    early = Probe.build(
        ProbeConfig(name="p", probe=nn.Linear(8, 3), scheduler=scheduler, optimizer="SGD"), total_steps=9
    )
    late = Probe.build(ProbeConfig(name="p", probe=nn.Linear(8, 3), scheduler=scheduler, optimizer="SGD"))
    late.set_total_steps(9)
    assert type(late.scheduler) is type(early.scheduler)
    x, y = data()
    for _ in range(4):
        early.train_step(x, y)
        late.train_step(x, y)
        assert late.optimizer.param_groups[0]["lr"] == pytest.approx(early.optimizer.param_groups[0]["lr"])
    late.set_total_steps(100)  # too late: the scheduler has stepped
    assert late.optimizer.param_groups[0]["lr"] == pytest.approx(early.optimizer.param_groups[0]["lr"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nonfinite_flag_is_found_inf_and_leaves_gradients_unchanged(dtype):
    from distprobe.engine import functional

    grads = [torch.randn(4, 3, dtype=dtype), torch.randn(3, dtype=dtype)]
    before = [g.clone() for g in grads]
    flag = functional.nonfinite_flag(grads)
    assert flag.dtype == torch.float32 and flag.shape == () and float(flag) == 0.0
    assert all(torch.equal(g, b) for g, b in zip(grads, before))
    for poison in (float("nan"), float("inf"), -float("inf")):
        bad = [g.clone() for g in grads]
        bad[1][2] = poison
        assert float(functional.nonfinite_flag(bad)) == 1.0
