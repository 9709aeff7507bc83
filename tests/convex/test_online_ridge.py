"""`RidgeProbe`, the engine of `OnlineRidge`, in one process: bad data, exact evaluation, selection, checkpoints."""

import pytest
import torch

from distprobe.bank.selection import selects
from distprobe.convex import fit_ridge
from distprobe.convex.online import RidgeConfig, RidgeProbe

from .helpers import gaussian_classes

L2 = (1e-3, 1.0, 100.0)


def _probe(**kwargs) -> RidgeProbe:
    return RidgeProbe.build(RidgeConfig(name="r", num_classes=3, l2=L2, **kwargs), in_features=6)


def test_bad_batches_are_dropped_and_counted_by_reason():
    x, y, vx, vy = gaussian_classes(64, 40)
    probe = _probe()
    probe.train_step(x[:32], y[:32])
    nan_x = x[32:48].clone()
    nan_x[3, 2] = float("nan")
    probe.train_step(nan_x, y[32:48])
    probe.train_step(x[48:], torch.cat([y[48:63], torch.tensor([7])]))  # one label out of range
    probe.train_step(x[48:], y[48:].double().add(0.5))  # float labels that are not class indices
    assert float(probe.stats.count) == 32
    counts = probe.compute_train_metrics()
    assert counts == {
        "bad_batches/nonfinite_features": 1.0,
        "bad_batches/targets_out_of_range": 2.0,
        "bad_batches/nonfinite_targets": 0.0,
    }
    assert probe.start_eval_epoch()
    reference = fit_ridge(x[:32], y[:32], 3, L2)
    torch.testing.assert_close(probe.solution.weight, reference.weight)


def test_each_sample_counts_once_and_the_best_lambda_is_chosen_on_the_selection_split():
    x, y, vx, vy = gaussian_classes(90, 50)
    probe = _probe(selection_fraction=0.3)
    probe.train_step(x, y)
    assert probe.start_eval_epoch()
    # Three batches of 20, the last padded with 10 repeats (num_valid=10): only 50 samples count.
    padded_x, padded_y = torch.cat([vx, vx[:10]]), torch.cat([vy, vy[:10]])
    for start, num_valid in ((0, None), (20, None), (40, 10)):
        probe.eval_step(padded_x[start : start + 20], padded_y[start : start + 20], num_valid=num_valid)
    values = probe.compute_eval_metrics()
    correct = fit_ridge(x, y, 3, L2).predict(vx) == vy  # (L, 50)
    select = selects(torch.arange(50), 0.3)
    for i, lam in enumerate(L2):
        assert values[f"l2={lam:g}_top1"] == pytest.approx(float(correct[i].double().mean()))
    select_top1 = correct[:, select].double().mean(1)
    best = max(sorted(range(3), key=lambda i: -L2[i]), key=lambda i: float(select_top1[i]))
    assert values["best_l2"] == pytest.approx(L2[best])
    assert values["best_top1"] == pytest.approx(float(correct[best, ~select].double().mean()))


def test_no_training_sample_gives_no_solution_and_no_values():
    probe = _probe()
    assert not probe.start_eval_epoch()
    assert probe.eval_step(torch.randn(4, 6), torch.zeros(4, dtype=torch.long)) is None
    assert probe.compute_eval_metrics() == {}


def test_checkpoint_roundtrip_and_a_mismatched_width():
    x, y, _, _ = gaussian_classes(30, 1)
    probe = _probe()
    probe.train_step(x, y)
    restored = _probe()
    restored.load_state_dict(probe.state_dict())
    assert torch.equal(restored.stats.flat, probe.stats.flat)
    wider = RidgeProbe.build(RidgeConfig(name="r", num_classes=3), in_features=8)
    with pytest.raises(ValueError, match="statistics are of 6 features, this probe reads 8"):
        wider.load_state_dict(probe.state_dict())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_classes": 1}, "argument 'num_classes' got 1; expected an int >= 2"),
        ({"l2": (-1.0,)}, r"argument 'l2' got \(-1.0,\); expected one or more finite values >= 0"),
        ({"l2": ()}, r"argument 'l2' got \(\); expected one or more"),
        ({"selection_fraction": 1.0}, "argument 'selection_fraction' got 1.0; expected a share in"),
        ({"in_features": 0}, "argument 'in_features' got 0; expected an int >= 1"),
    ],
)
def test_bad_config_is_refused_with_the_argument_named(kwargs, message):
    with pytest.raises(ValueError, match=f"ridge 'r': {message}"):
        RidgeConfig(**{"name": "r", "num_classes": 3, **kwargs})


def test_repeated_lambdas_are_dropped_in_order():
    assert RidgeConfig(name="r", num_classes=3, l2=(1.0, 0.1, 1.0)).l2 == (1.0, 0.1)
