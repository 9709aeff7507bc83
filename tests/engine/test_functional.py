"""The engine's functional layer: per-head maths on (K, ...) tensors equals torch's for K separate heads.

Also the shared plumbing written once: training options (probe and bank alike), the first-batch check, resuming an
accumulation window, the deferred folding, and the collectives' declared reductions.
"""

import pytest
import torch
from torch import nn

from distprobe.bank import BankConfig
from distprobe.engine import LARS, ProbeConfig, functional
from distprobe.engine.checks import class_index_problem
from distprobe.engine.collectives import REDUCTIONS
from distprobe.engine.deferred import DeferredSteps, Folded
from distprobe.engine.state import resume_window

K = 3


def _heads(seed=0):
    """K separate linear layers with gradients, and their (K, ...) stacks."""
    torch.manual_seed(seed)
    layers = [nn.Linear(5, 4) for _ in range(K)]
    x = torch.randn(8, 5)
    for i, layer in enumerate(layers):
        (layer(x).pow(2).sum() * (i + 1)).backward()
    return layers


def _stack(layers, attr, grad=False):
    return torch.stack([(getattr(layer, attr).grad if grad else getattr(layer, attr)).detach() for layer in layers])


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_lars_update_per_head_equals_the_lars_optimizer_on_each_head(weight_decay):
    """Replaces the bank's and the probe's two LARS copies: both run `lars_update` now."""
    layers = _heads()
    reference = _heads()  # the same layers and gradients (a deep copy would drop the gradients)
    weights, biases = _stack(layers, "weight"), _stack(layers, "bias")
    grads = [_stack(layers, "weight", grad=True), _stack(layers, "bias", grad=True)]
    buffers = [torch.zeros_like(weights), torch.zeros_like(biases)]
    lr = torch.tensor([0.1, 0.5, 1.0])
    for _ in range(2):
        functional.lars_update(
            [weights, biases],
            [g.clone() for g in grads],
            buffers,
            [False, True],
            functional.StepRates(lr=lr, weight_decay=torch.full((K,), weight_decay), momentum=torch.full((K,), 0.9)),
            decays=weight_decay > 0,
        )
    for i, layer in enumerate(reference):
        opt = LARS(layer.parameters(), lr=float(lr[i]), weight_decay=weight_decay)
        opt.step()
        opt.step()  # the same gradient twice, as above
        torch.testing.assert_close(weights[i], layer.weight.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(biases[i], layer.bias.detach(), rtol=1e-6, atol=1e-7)


def test_a_skipped_head_is_left_bitwise_alone_by_every_update():
    torch.manual_seed(0)
    params, grads = torch.randn(K, 4, 3), torch.randn(K, 4, 3)
    grads[1, 0, 0] = float("nan")
    keep = functional.finite_heads([grads])
    assert keep.tolist() == [True, False, True]
    functional.zero_skipped([grads], keep)
    assert torch.equal(grads[1], torch.zeros(4, 3))
    hyper = {"lr": torch.full((K,), 0.1), "weight_decay": torch.full((K,), 0.01), "steps": torch.ones(K), "keep": keep}
    rates = functional.StepRates(momentum=torch.full((K,), 0.9), **hyper)
    for update in ("sgd", "adamw", "lars"):
        p, buf, buf2 = params.clone(), torch.randn(K, 4, 3), torch.rand(K, 4, 3)
        before = (p[1].clone(), buf[1].clone(), buf2[1].clone())
        if update == "sgd":
            functional.sgd_update([p], [grads.clone()], [buf], rates)
        elif update == "adamw":
            functional.adamw_update([p], [grads.clone()], [buf], [buf2], rates, beta2=torch.full((K,), 0.999))
        else:
            functional.lars_update([p], [grads.clone()], [buf], [False], rates)
        assert torch.equal(p[1], before[0]) and torch.equal(buf[1], before[1]) and torch.equal(buf2[1], before[2])
        assert not torch.equal(p[0], params[0]), update


def test_sgd_and_adamw_without_step_counts_say_what_is_missing():
    rates = functional.StepRates(lr=torch.ones(K), weight_decay=torch.zeros(K), momentum=torch.zeros(K))
    p, g = torch.zeros(K, 2), torch.ones(K, 2)
    with pytest.raises(ValueError, match=r"sgd_update: StepRates.steps is None; pass each head's optimizer steps"):
        functional.sgd_update([p], [g], [torch.zeros_like(p)], rates)
    with pytest.raises(ValueError, match=r"adamw_update: StepRates.steps is None"):
        functional.adamw_update([p], [g], [torch.zeros_like(p)], [torch.zeros_like(p)], rates, beta2=torch.ones(K))
    assert torch.equal(p, torch.zeros(K, 2))  # refused before any change


def test_clipping_by_norm_per_head_equals_clip_grad_norm_of_each_head():
    layers = _heads()
    grads = torch.stack([torch.cat([layer.weight.grad.flatten(), layer.bias.grad]) for layer in layers])
    norms = functional.head_norms([grads])
    functional.clip([grads], 1.0, "norm")
    for i, layer in enumerate(layers):
        total = torch.nn.utils.clip_grad_norm_(layer.parameters(), 1.0)
        torch.testing.assert_close(norms[i], total)
        torch.testing.assert_close(grads[i], torch.cat([layer.weight.grad.flatten(), layer.bias.grad]))


def test_one_probe_is_one_head_for_clipping_and_the_non_finite_flag():
    layer = _heads()[0]
    grads = [p.grad for p in layer.parameters()]
    expected = [g.clone() for g in grads]
    norm = functional.clip_gradients(grads, 1.0, "norm")
    torch.testing.assert_close(norm, torch.linalg.vector_norm(torch.cat([g.flatten() for g in expected])))
    factor = min(1.0, 1.0 / (float(norm) + functional.grads.CLIP_EPS))
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e * factor)
    assert functional.clip_gradients(grads, None, "norm") is None
    functional.clip(grads, 1e-3, "value")
    assert all(bool(g.abs().max() <= torch.tensor(1e-3)) for g in grads)  # the float32 bound
    assert float(functional.nonfinite_flag(grads)) == 0.0


def test_group_moments_and_running_stats_equal_batchnorm_without_a_group():
    torch.manual_seed(0)
    x = torch.randn(16, 6) * 3 + 1
    norm = nn.BatchNorm1d(6, affine=False)
    norm(x)
    mean, var, n = functional.group_moments(x, None)
    torch.testing.assert_close(mean, x.mean(dim=0))
    torch.testing.assert_close(var, x.var(dim=0, unbiased=False))
    assert float(n) == 16
    running_mean, running_var = torch.zeros(6), torch.ones(6)
    functional.update_running_stats(running_mean, running_var, mean, var, n, 0.1)
    torch.testing.assert_close(running_mean, norm.running_mean)
    torch.testing.assert_close(running_var, norm.running_var)


def test_deferred_steps_fold_batch_weighted_losses_without_skipped_steps():
    got: list[Folded] = []
    deferred = DeferredSteps(got.append, lambda: True)
    preds, targets, keep = torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.bool)
    reasons = torch.tensor([0, 1, 0])
    deferred.add(torch.tensor([1.0, 2.0]), torch.tensor(False), 2, reasons, preds, targets, keep)
    deferred.add(torch.tensor([float("nan"), 9.0]), torch.tensor(True), 4, reasons, preds, targets, keep)  # skipped
    deferred.add(torch.tensor([4.0, 5.0]), torch.tensor(False), 6, reasons, preds, targets, keep)
    assert not got  # nothing folded before it is due
    deferred.fold()
    (folded,) = got
    torch.testing.assert_close(folded.loss_total, torch.tensor([2.0 + 24.0, 4.0 + 30.0], dtype=torch.float64))
    assert float(folded.loss_count) == 8
    assert folded.reasons.tolist() == [0, 3, 0]
    assert folded.predictions is not None and folded.predictions[0].shape == (6, 3)
    deferred.fold()  # nothing kept: nothing folded
    assert len(got) == 1


@pytest.mark.parametrize("config", [ProbeConfig, BankConfig], ids=["probe", "bank"])
@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"accumulate_grad_batches": True}, r"'accumulate_grad_batches' got True; expected an int >= 1"),
        ({"accumulate_grad_batches": 0}, r"'accumulate_grad_batches' got 0"),
        ({"gradient_clip_algorithm": "l2"}, r"'gradient_clip_algorithm' got 'l2'; expected one of \['norm', 'value'\]"),
        ({"gradient_clip_val": -1.0}, r"'gradient_clip_val' got -1.0; expected a positive number"),
    ],
)
def test_probe_and_bank_refuse_the_same_training_options_alike(config, options, match):
    """One `TrainingOptions` check: a bank no longer accepts accumulate_grad_batches=True while a probe refuses it."""
    kind = {"probe": ProbeConfig, "bank": BankConfig}
    args = (
        {"name": "p", "probe": nn.Linear(2, 2)}
        if config is ProbeConfig
        else {"name": "p", "inputs": ["x"], "num_classes": 2}
    )
    owner = "probe 'p'" if config is kind["probe"] else "bank 'p'"
    with pytest.raises(ValueError, match=f"{owner}: argument {match}"):
        config(**args, **options)


def test_class_index_check_names_the_owner_and_the_problem():
    y = torch.tensor([0, 1, 4])
    assert class_index_problem("kNN 'k'", {"x": torch.zeros(3, 2)}, y, 5) is None
    assert "kNN 'k': target labels range over [0, 4] but num_classes=3" in class_index_problem(
        "kNN 'k'", {"x": torch.zeros(3, 2)}, y, 3
    )
    assert "bank 'b': input 'x' must be a (batch, features...) tensor with the target's batch size 3" in (
        class_index_problem("bank 'b'", {"x": torch.zeros(2, 2)}, y, 5)
    )
    float_labels = class_index_problem("bank 'b'", {}, y.float(), 5)
    assert "must be a 1-D integer tensor of class indices; got Tensor (3,) of torch.float32 (cast it with .long())" in (
        float_labels
    )


def test_resume_window_takes_its_own_at_the_same_world_size_and_the_mean_at_another():
    per_rank = [[torch.tensor([1.0, 2.0])], [torch.tensor([3.0, 6.0])]]
    (mean,) = resume_window(per_rank, None)  # one process resumes what two ranks saved
    torch.testing.assert_close(mean, torch.tensor([2.0, 4.0]))
    assert resume_window(per_rank[:1], None)[0] is per_rank[0][0]  # same size: its own, bitwise


def test_every_collective_declares_how_it_reduces():
    assert REDUCTIONS == {
        "sum_over_group": "sum",
        "start_mean": "mean",
        "agree_on_max": "max",
        "gather_over_group": "gather",
        "broadcast_from_global_rank0": "broadcast",
        "raise_if_any_rank_failed": "any",
    }
