"""`RidgeProbe` edges: a fractional float label is no class in evaluation either, and a checkpoint of another
``num_classes`` is refused naming the probe, both values and the fix.

Before: training dropped a batch with the label 2.5 (``targets_out_of_range``) but evaluation counted a sample with
it as class 2; and a resume with another ``num_classes`` raised "RidgeStatistics: checkpoint holds dim=4,
num_classes=10; this probe has ..." without the probe's name or a fix.
"""

from __future__ import annotations

import pytest
import torch

from distprobe.convex import RidgeConfig, RidgeProbe
from distprobe.loop import ProbeSet

from .helpers import gaussian_classes


def _trained(num_classes: int = 3) -> RidgeProbe:
    x, y, _, _ = gaussian_classes(90, 1)
    probe = RidgeProbe.build(RidgeConfig(name="ridge", num_classes=num_classes, l2=(1e-3, 1.0)), in_features=6)
    probe.train_step(x, y)
    return probe


def _top1(probe: RidgeProbe, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    probe.start_eval_epoch()
    probe.eval_step(x, y)
    return {k: float(v) for k, v in probe.compute_eval_metrics().items()}


def test_a_fractional_label_is_not_counted_in_evaluation_as_in_training():
    _, _, vx, vy = gaussian_classes(1, 40)
    probe = _trained()
    labels = vy.double()
    labels[[3, 8]] = torch.tensor([vy[3] + 0.5, vy[8] - 0.25], dtype=torch.float64)  # .long(): the right class
    # Kept in place (the selection split is by position), as labels out of range, which were never counted.
    out_of_range = vy.clone()
    out_of_range[[3, 8]] = -1
    assert _top1(probe, vx, labels) == _top1(probe, vx, out_of_range)
    probe.train_step(vx[:2], labels[2:4])  # training drops such a batch
    assert float(probe.compute_train_metrics()["bad_batches/targets_out_of_range"]) == 1


def test_a_checkpoint_of_another_num_classes_is_refused_by_name():
    saved = _trained(num_classes=10).state_dict()
    with pytest.raises(ValueError, match=r"ridge 'ridge': .*num_classes=10, this probe has num_classes=3; resume with"):
        _trained(num_classes=3).load_state_dict(saved)
    probes = ProbeSet.build([], ridges=[{"name": "ridge", "num_classes": 3, "input": "x", "target": "y"}])
    with pytest.raises(ValueError, match=r"ridge 'ridge': .*num_classes=10.*new name"):
        probes.load_state_dict({"ridge": saved})
