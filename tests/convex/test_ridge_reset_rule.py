"""Who starts a ridge probe's statistics anew (`RidgeConfig.reset_statistics`), in a plain `ProbeSet` and in Lightning.

A set resets them at the first training batch after an evaluation by default; ``"by_owner"`` leaves that to the code
that owns the probe. `OnlineRidge` trains through its Trainer's `ProbeSet` and owns its rule: one epoch's statistics,
whatever validations run inside it.
"""

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from tests.helpers.models import Backbone, loader, trainer

from distprobe.callbacks import OnlineRidge
from distprobe.callbacks.coordinator import Coordinator
from distprobe.convex import RidgeConfig, fit_ridge
from distprobe.loop import ProbeSet

from .helpers import gaussian_classes

L2 = (1e-3, 1.0)


def _top1(rows: torch.Tensor, x, y, vx, vy) -> dict[str, float]:
    correct = fit_ridge(x[rows], y[rows], 3, L2).predict(vx) == vy
    return {f"l2={lam:g}_top1": float(correct[i].double().mean()) for i, lam in enumerate(L2)}


def test_the_set_resets_after_an_evaluation_unless_the_owner_does():
    x, y, vx, vy = gaussian_classes(80, 23)
    specs = [
        {"name": "reset", "num_classes": 3, "l2": L2, "input": "emb", "target": "y"},
        {"name": "owned", "num_classes": 3, "l2": L2, "input": "emb", "target": "y", "reset_statistics": "by_owner"},
    ]
    probes = ProbeSet.build([], ridges=specs)

    def train(batches: range) -> None:
        for b in batches:
            probes.step({"emb": x[b * 10 : (b + 1) * 10]}, {"y": y[b * 10 : (b + 1) * 10]})

    def evaluate() -> dict[str, float]:
        probes.evaluate({"emb": vx}, {"y": vy})
        return {k: float(v) for k, v in probes.compute_metrics().items()}

    train(range(8))
    first = evaluate()
    train(range(2, 4))
    second = evaluate()
    probes.ridges["owned"].reset_train()  # the owner's own rule
    train(range(4, 6))
    third = evaluate()

    everything = torch.arange(80)
    twice = torch.cat([everything, torch.arange(20, 40)])  # the owned probe kept the first 8 batches' sums
    expected = {
        "reset": (everything, torch.arange(20, 40), torch.arange(40, 60)),
        "owned": (everything, twice, torch.arange(40, 60)),
    }
    for name, rows in expected.items():
        for logged, want in zip((first, second, third), rows, strict=True):
            for key, value in _top1(want, x, y, vx, vy).items():
                assert logged[f"eval/{name}/{key}"] == pytest.approx(value, abs=1e-6), (name, key)
    assert second["eval/reset/l2=0.001_top1"] != second["eval/owned/l2=0.001_top1"]  # the two rules differ here


def test_an_unknown_reset_rule_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"ridge 'r': argument 'reset_statistics' got 'never'.*'by_owner'"):
        RidgeConfig(name="r", num_classes=3, reset_statistics="never")  # type: ignore[arg-type]


class _SeesTheSet(Callback):
    """Records, at each training batch, whether the ridge's engine is its Trainer's `ProbeSet` member."""

    def __init__(self, ridge: OnlineRidge) -> None:
        self.ridge = ridge
        self.in_set: list[bool] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        ridges = Coordinator.of(trainer).probe_set.ridges
        self.in_set.append(ridges.get("ridge") is self.ridge.ridge)


def test_online_ridge_trains_in_the_set_and_keeps_an_epoch_over_a_mid_epoch_validation():
    """A validation halfway through the epoch solves the first half; the epoch's end still holds all of it."""
    ridge = OnlineRidge(None, "ridge", input="embedding", target="label", num_classes=3, l2=L2)
    sees = _SeesTheSet(ridge)
    fit = trainer([ridge, sees], max_epochs=1, val_check_interval=3, limit_val_batches=2)
    fit.fit(Backbone(lr=0.0), loader(), loader(64, seed=1))
    assert sees.in_set == [True] * 6
    assert ridge.config.reset_statistics == "by_owner"
    assert float(ridge.ridge.stats.count) == 192  # both halves: the mid-epoch validation reset nothing
    assert "eval/ridge_best_top1" in fit.callback_metrics
