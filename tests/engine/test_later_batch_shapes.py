"""A probe's later batch of other shapes than its first is bad data for the engine itself: skipped, counted, warned.

The engine compares each batch with the shapes its first training batch established (the number of dimensions and
the feature width), on the host. A probe trained alone or in a group ends as if that batch had held no sample; what
the probe reads in any size (the number of tokens) still trains.
"""

import logging

import torch
from torch import nn

from distprobe.engine import Probe, ProbeConfig, ProbeGroup

D, C = 6, 3


def _probe(name="p", module=None):
    torch.manual_seed(0)
    config = ProbeConfig(
        name=name, probe=module or nn.Linear(D, C), optimizer={"type": "SGD", "lr": 0.1, "momentum": 0.9}
    )
    return Probe.build(config)


def _batch(seed, sample=(D,), n=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *sample, generator=g), torch.randint(0, C, (n,), generator=g)


def _wrong_shapes(probe):
    return int(probe.batch_shapes.counts.compute()[f"train/{probe.name}_bad_batches/wrong_shape"])


def test_a_wider_batch_is_skipped_counted_and_warned_once(caplog):
    seen, without = _probe(), _probe()
    with caplog.at_level(logging.WARNING, logger="distprobe"):
        for step in range(5):
            odd = step in (2, 3)
            seen.train_step(*_batch(step, sample=(D + 2,) if odd else (D,)))
            if not odd:
                without.train_step(*_batch(step))
    assert _wrong_shapes(seen) == 2 and _wrong_shapes(without) == 0
    assert int(seen.skipped_steps) == 2
    assert all(torch.equal(a, b) for a, b in zip(seen.module.parameters(), without.module.parameters(), strict=True))
    warnings = [r.getMessage() for r in caplog.records if "differs from it" in r.getMessage()]
    assert len(warnings) == 1
    assert "probe 'p'" in warnings[0] and "input 'features' has shape (4, 8), expected (batch, 6)" in warnings[0]


def test_a_group_skips_only_the_probe_whose_batch_differs():
    odd, usual = _probe("odd"), _probe("usual")
    group = ProbeGroup([odd, usual])
    group.train_step([_batch(0), _batch(0)])
    group.train_step([_batch(1, sample=(D + 1,)), _batch(1)])
    assert int(odd.skipped_steps) == 1 and int(usual.skipped_steps) == 0
    assert _wrong_shapes(odd) == 1 and _wrong_shapes(usual) == 0


class MeanTokens(nn.Module):
    """A linear probe on the mean token: it reads any number of tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(D, C)

    def forward(self, tokens):
        return self.linear(tokens.mean(dim=1))


def test_tokens_of_another_count_still_train_and_the_count_survives_a_checkpoint():
    probe = _probe(module=MeanTokens())
    probe.train_step(*_batch(0, sample=(5, D)))
    probe.train_step(*_batch(1, sample=(7, D)))
    assert int(probe.skipped_steps) == 0 and _wrong_shapes(probe) == 0
    probe.train_step(*_batch(2, sample=(5, D + 1)))
    assert _wrong_shapes(probe) == 1
    resumed = _probe(module=MeanTokens())
    resumed.load_state_dict(probe.state_dict())
    assert _wrong_shapes(resumed) == 1
