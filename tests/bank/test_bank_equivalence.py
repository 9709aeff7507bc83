"""Every head of a bank equals a separately trained probe with its hyper-parameters (the engine's `Probe`)."""

import copy

import pytest
import torch

from distprobe.bank import BankConfig, ProbeBank
from distprobe.engine import Probe, ProbeConfig

D, C, B = 8, 4, 16
LRS = [0.3, 0.03]
WDS = [0.0, 0.05]

OPTIMIZERS = {
    "SGD": ({"type": "SGD", "momentum": 0.9}, {"momentum": 0.9}),
    "SGD-nesterov": ({"type": "SGD", "momentum": 0.9, "nesterov": True}, {"momentum": 0.9, "nesterov": True}),
    "SGD-plain": ({"type": "SGD", "momentum": 0.0}, {"momentum": 0.0}),
    "AdamW": ({"type": "AdamW", "betas": (0.9, 0.99)}, {"betas": (0.9, 0.99)}),
    "LARS": ({"type": "LARS"}, {"momentum": 0.9, "eta": 0.02, "clip_lr": True, "exclude_bias_n_norm": True}),
}


def _batches(steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, D, generator=g) * 3 + 1, torch.randint(0, C, (B,), generator=g)) for _ in range(steps)]


def _references(bank, bank_opt, ref_kwargs, accumulate, clip, algorithm, scheduler=None):
    refs = {}
    for head in bank.heads.head_list:
        module = copy.deepcopy(bank.head(head.head_id)).train()
        options = {"type": bank_opt["type"], "lr": head.lr, "weight_decay": head.weight_decay, **ref_kwargs}
        if options["type"] in ("SGD", "AdamW"):
            options["foreach"] = False
        refs[head.head_id] = Probe.build(
            ProbeConfig(
                name=f"ref{head.index}",
                probe=module,
                optimizer=options,
                accumulate_grad_batches=accumulate,
                gradient_clip_val=clip,
                gradient_clip_algorithm=algorithm,
                scheduler=scheduler,
            )
        )
    return refs


def assert_heads_equal_references(bank, refs, label=""):
    """Each head's weights, bias and (behind a BatchNorm) running statistics are its reference probe's."""
    for head_id, ref in refs.items():
        got = bank.head(head_id)
        got_linear = got if isinstance(got, torch.nn.Linear) else got[1]
        w, b = _reference_weights(ref)
        torch.testing.assert_close(got_linear.weight, w, atol=1e-5, rtol=1e-5, msg=f"{label} {head_id} weight")
        torch.testing.assert_close(got_linear.bias, b, atol=1e-5, rtol=1e-5, msg=f"{label} {head_id} bias")
        if not isinstance(got, torch.nn.Linear):
            torch.testing.assert_close(got[0].running_mean, ref.module[0].running_mean, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got[0].running_var, ref.module[0].running_var, atol=1e-5, rtol=1e-4)


def _reference_weights(probe):
    linear = probe.module if isinstance(probe.module, torch.nn.Linear) else probe.module[1]
    return linear.weight.detach(), linear.bias.detach()


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize(("accumulate", "clip", "algorithm"), [(1, None, "norm"), (2, 0.5, "norm"), (3, 0.05, "value")])
def test_every_head_equals_a_separate_probe(optimizer, accumulate, clip, algorithm):
    bank_opt, ref_kwargs = OPTIMIZERS[optimizer]
    config = BankConfig(
        name="grid",
        inputs=["x"],
        num_classes=C,
        lr=LRS,
        weight_decay=WDS,
        normalization=[None, "batchnorm"],
        optimizer=bank_opt,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=clip,
        gradient_clip_algorithm=algorithm,
        in_features=D,
    )
    bank = ProbeBank.build(config)
    refs = _references(bank, bank_opt, ref_kwargs, accumulate, clip, algorithm)
    for x, y in _batches(12):
        bank.train_step([x], y)
        for ref in refs.values():
            ref.train_step(x, y)
    assert_heads_equal_references(bank, refs, optimizer)
    assert int(bank.skipped_steps.sum()) == 0


@pytest.mark.parametrize("optimizer", ["SGD", "AdamW", "LARS"])
def test_a_head_driven_to_inf_is_skipped_alone(optimizer):
    bank_opt, ref_kwargs = OPTIMIZERS[optimizer]
    config = BankConfig(
        name="grid",
        inputs=["x"],
        num_classes=C,
        lr=LRS,
        weight_decay=WDS,
        optimizer=bank_opt,
        in_features=D,
        accumulate_grad_batches=2,
        gradient_clip_val=1.0,
    )
    bank = ProbeBank.build(config)
    refs = _references(bank, bank_opt, ref_kwargs, 2, 1.0, "norm")
    broken = bank.head_ids[1]
    batches = _batches(10, seed=1)
    for i, (x, y) in enumerate(batches):
        if i == 4:  # a window's start: from here on, the broken head's gradient is never finite
            with torch.no_grad():
                weight = bank.heads.views(bank.heads.flat)[0].parts[0]  # (K, C, D)
                weight[1, 0, 0] = float("inf")
        bank.train_step([x], y)
        for ref in refs.values():
            ref.train_step(x, y)
    skipped = bank.skipped_steps.tolist()
    assert skipped == [0, 3, 0, 0], skipped  # windows closing at steps 5, 7, 9
    for head_id, ref in refs.items():
        if head_id == broken:
            continue
        got = bank.head(head_id)
        w, b = _reference_weights(ref)
        torch.testing.assert_close(got.weight, w, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.bias, b, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(bank.head(bank.head_ids[0]).weight).all()


def test_bad_data_skips_every_head_and_is_counted():
    config = BankConfig(
        name="grid", inputs=["x"], num_classes=C, lr=LRS, in_features=D, normalization=[None, "batchnorm"]
    )
    bank = ProbeBank.build(config)
    before = bank.heads.flat.detach().clone()
    stats = [b.clone() for b in bank.heads.statistics()]
    x, y = _batches(1)[0]
    x[3, 2] = float("nan")
    out = bank.train_step([x], y)
    assert bool(out.bad)
    torch.testing.assert_close(bank.heads.flat.detach(), before, rtol=0, atol=0)
    for saved, now in zip(stats, bank.heads.statistics(), strict=True):
        torch.testing.assert_close(now, saved, rtol=0, atol=0)
    y2 = y.clone()
    y2[0] = C + 3
    bank.train_step([_batches(1)[0][0]], y2)
    values = bank.compute_train_metrics()
    assert float(values["bad_batches/nonfinite_features"]) == 1
    assert float(values["bad_batches/targets_out_of_range"]) == 1
    assert bank.skipped_steps.tolist() == [2, 2, 2, 2]


SCHEDULERS = {
    "cosine": {"type": "CosineAnnealingLR", "T_max": 5, "eta_min": 0.01},
    "onecycle": "OneCycleLR",  # cycles momentum and peaks at each head's own lr
    "warmup": {"type": "LinearLR", "start_factor": 0.1, "total_iters": 3},
}


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
@pytest.mark.parametrize("optimizer", ["SGD", "AdamW"])
def test_every_head_follows_the_schedule_of_a_separate_probe(scheduler, optimizer):
    bank_opt, ref_kwargs = OPTIMIZERS[optimizer]
    spec = SCHEDULERS[scheduler]
    config = BankConfig(
        name="grid",
        inputs=["x"],
        num_classes=C,
        lr=LRS,
        weight_decay=WDS,
        optimizer=bank_opt,
        in_features=D,
        scheduler=spec,
    )
    bank = ProbeBank.build(config, total_steps=8)
    refs = _references(bank, bank_opt, ref_kwargs, 1, None, "norm", scheduler=spec)
    for ref in refs.values():
        ref.set_total_steps(8)
    for x, y in _batches(8, seed=2):
        bank.train_step([x], y)
        for ref in refs.values():
            ref.train_step(x, y)
    for head_id, ref in refs.items():
        w, b = _reference_weights(ref)
        got = bank.head(head_id)
        torch.testing.assert_close(got.weight, w, atol=1e-5, rtol=1e-5, msg=f"{scheduler} {head_id}")
        torch.testing.assert_close(got.bias, b, atol=1e-5, rtol=1e-5)
    assert bank.optimizer.rates.current_lrs() == pytest.approx([ref.current_lr() for ref in refs.values()])
