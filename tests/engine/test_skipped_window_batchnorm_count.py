"""A skipped window leaves no trace in a probe's BatchNorm, its batch count included.

``BatchNorm(momentum=None)`` keeps a cumulative average whose weights come from ``num_batches_tracked``: a skipped
window that put the statistics back but kept the count would weigh every later batch as if one more had been seen.
"""

import pytest
import torch
from torch import nn

from distprobe.loop import ProbeSet

D, C = 4, 3


def _probes(accumulate):
    torch.manual_seed(0)
    probe = nn.Sequential(nn.BatchNorm1d(D, momentum=None), nn.Linear(D, C))
    spec = {"name": "bn", "probe": probe, "optimizer": "SGD", "input": "x", "target": "y"}
    return ProbeSet.build([{**spec, "accumulate_grad_batches": accumulate}])


def _batch(seed, bad=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, D, generator=g) * (seed + 1)
    if bad:
        x[0, 0] = float("nan")
    return {"x": x}, {"y": torch.randint(0, C, (6,), generator=g)}


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_window_skipped_for_bad_data_puts_back_the_batch_count(accumulate):
    seen, without = _probes(accumulate), _probes(accumulate)
    bad_window = 1
    for step in range(4 * accumulate):
        window = step // accumulate
        last_of_window = step % accumulate == accumulate - 1
        seen.step(*_batch(step, bad=window == bad_window and last_of_window))
        if window != bad_window:
            without.step(*_batch(step))
    assert int(seen.probes["bn"].skipped_steps) == 1
    ours, theirs = seen.probes["bn"].module.state_dict(), without.probes["bn"].module.state_dict()
    assert int(ours["0.num_batches_tracked"]) == int(theirs["0.num_batches_tracked"]) == 3 * accumulate
    for key in ours:  # the running mean and variance of the batches after the skip are weighted alike too
        assert torch.equal(ours[key], theirs[key]), key


def test_a_checkpoint_inside_a_window_keeps_the_count_to_put_back():
    probes = _probes(2)
    probes.step(*_batch(0))
    state = probes.state_dict()  # mid-window: the window's start is saved with the statistics
    resumed = _probes(2)
    resumed.load_state_dict(state)
    resumed.step(*_batch(1, bad=True))  # the window is skipped: back to where it started, before batch 0
    assert int(resumed.probes["bn"].module.state_dict()["0.num_batches_tracked"]) == 0
