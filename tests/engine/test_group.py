"""`ProbeGroup` against each probe's own `Probe.train_step`: same weights, skips, verdicts, losses and state."""

import copy

import pytest
import torch
from torch import nn

from distprobe.engine import Probe, ProbeConfig, ProbeGroup
from distprobe.engine.skip import can_step_fused

STEPS = 9


def make_probes(seed=0):
    """Probes that differ in optimizer, accumulation (windows close at different micro-steps) and clipping."""
    torch.manual_seed(seed)
    configs = [
        dict(name="sgd", optimizer={"type": "SGD", "lr": 0.1, "momentum": 0.9}, accumulate_grad_batches=1),
        dict(name="adamw", optimizer={"type": "AdamW", "lr": 1e-2}, accumulate_grad_batches=2, gradient_clip_val=0.5),
        dict(name="lars", optimizer="LARS", accumulate_grad_batches=3),
        dict(
            name="value_clip",
            optimizer={"type": "Adam", "lr": 1e-2},
            accumulate_grad_batches=2,
            gradient_clip_val=0.01,
            gradient_clip_algorithm="value",
        ),
        dict(name="user_foreach", optimizer={"type": "SGD", "lr": 0.05, "foreach": False}),
    ]
    return [Probe.build(ProbeConfig(probe=nn.Linear(8, 4), **c)) for c in configs]


def batches(seed=1, bad_at=None, inf_probe=None):
    """Per step, one (features, targets) pair per probe; bad data for every probe at ``bad_at``, and probe
    ``inf_probe``'s features scaled by 1e38 at step 4 (its logits overflow: a non-finite step, no bad data)."""
    g = torch.Generator().manual_seed(seed)
    steps = []
    for step in range(STEPS):
        pairs = []
        for i in range(5):
            x, y = torch.randn(6, 8, generator=g), torch.randint(0, 4, (6,), generator=g)
            if step == bad_at and i == 1:
                y[0] = 17  # label out of range
            if step == 4 and i == inf_probe:
                x = x * 1e38
            pairs.append((x, y))
        steps.append(pairs)
    return steps


def state_of(probe):
    params = [p.detach().clone() for p in probe.module.parameters()]
    moments = [
        v.detach().clone()
        for p in probe.module.parameters()
        for v in probe.optimizer.state.get(p, {}).values()
        if isinstance(v, torch.Tensor)
    ]
    return params, moments, int(probe.skipped_steps), probe.micro_step, probe.scheduler.last_epoch


def assert_same(separate, grouped):
    for a, b in zip(separate, grouped, strict=True):
        sa, sb = state_of(a), state_of(b)
        for x, y in zip(sa[0] + sa[1], sb[0] + sb[1], strict=True):
            torch.testing.assert_close(y, x, atol=1e-6, rtol=1e-6, msg=f"probe {a.name}")
        assert sa[2:] == sb[2:], a.name


@pytest.mark.parametrize(("bad_at", "inf_probe"), [(None, None), (3, None), (None, 0), (5, 0)])
def test_grouped_steps_equal_separate_steps(bad_at, inf_probe):
    separate, grouped = make_probes(), make_probes()
    group = ProbeGroup(grouped)
    for pairs in batches(bad_at=bad_at, inf_probe=inf_probe):
        outs_a = [p.train_step(x, y) for p, (x, y) in zip(separate, pairs, strict=True)]
        outs_b = group.train_step(pairs)
        for a, b in zip(outs_a, outs_b, strict=True):
            assert a.stepped == b.stepped and bool(a.bad) == bool(b.bad)
            torch.testing.assert_close(b.loss, a.loss, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(b.preds, a.preds, atol=1e-5, rtol=1e-5)
    assert_same(separate, grouped)
    if inf_probe is not None:
        assert int(grouped[inf_probe].skipped_steps) == 1
    if bad_at is not None:
        assert int(grouped[1].skipped_steps) == 1
    for a, b in zip(separate, grouped, strict=True):
        assert a.compute_train_metrics().keys() == b.compute_train_metrics().keys()


def test_the_users_implementation_choice_is_kept():
    probes = make_probes()
    for _ in range(2):  # every window closed once: the optimizers' state exists
        ProbeGroup(probes).train_step([(torch.randn(6, 8), torch.randint(0, 4, (6,)))] * 5)
    assert [can_step_fused(p.optimizer) for p in probes] == [True, True, False, True, False]
    assert all(g.get("fused") is None for p in probes for g in p.optimizer.param_groups)  # restored after each step


def test_resume_mid_window_from_a_grouped_run_equals_the_uninterrupted_run():
    steps = batches()
    straight = make_probes()
    for pairs in steps:
        ProbeGroup(straight).train_step(pairs)
    first = make_probes()
    for pairs in steps[:4]:  # inside the windows of the probes accumulating 3 and... 4 % 2 == 0: adamw at a boundary
        ProbeGroup(first).train_step(pairs)
    saved = copy.deepcopy([p.state_dict() for p in first])
    resumed = make_probes(seed=99)
    for probe, state in zip(resumed, saved, strict=True):
        probe.load_state_dict(state)
    for pairs in steps[4:]:
        ProbeGroup(resumed).train_step(pairs)
    for a, b in zip(straight, resumed, strict=True):
        sa, sb = state_of(a), state_of(b)
        assert all(torch.equal(x, y) for x, y in zip(sa[0] + sa[1], sb[0] + sb[1], strict=True)), a.name
        assert sa[2:] == sb[2:]


def test_a_probe_trained_alone_between_grouped_steps_keeps_its_window():
    """Mixing: the window opened by grouped steps is closed by the probe's own step, as if all were its own."""
    separate, mixed = make_probes(), make_probes()
    for step, pairs in enumerate(batches()):
        for p, (x, y) in zip(separate, pairs, strict=True):
            p.train_step(x, y)
        if step % 2:
            for p, (x, y) in zip(mixed, pairs, strict=True):
                p.train_step(x, y)
        else:
            ProbeGroup(mixed).train_step(pairs)
    assert_same(separate, mixed)


def test_a_group_refuses_a_probe_twice_and_a_wrong_number_of_inputs():
    probes = make_probes()
    with pytest.raises(ValueError, match="appears twice"):
        ProbeGroup([probes[0], probes[0]])
    with pytest.raises(ValueError, match="one pair per probe"):
        ProbeGroup(probes).train_step([(torch.randn(6, 8), torch.zeros(6, dtype=torch.long))])
