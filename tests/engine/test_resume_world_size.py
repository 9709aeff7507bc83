"""A probe and a bank resume an open accumulation window at another world size, both through `resume_window`.

Two gloo ranks stop mid-window and one process resumes from their state, and the other way round; either way the
run equals one process that was never interrupted (N ranks on shards of a batch equal one process on the batch).
One spawn serves both directions for both kinds.
"""

import pytest
import torch
import torch.distributed as dist
from tests.helpers.dist import run_distributed
from torch import nn

from distprobe.bank import BankConfig, ProbeBank
from distprobe.engine import Probe, ProbeConfig

pytestmark = pytest.mark.distributed

D, C, B, STEPS, STOP = 6, 4, 8, 6, 2  # windows of 3 micro-steps: STOP = 2 is inside the first one


def _data():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(2 * B, D, generator=g), torch.randint(0, C, (2 * B,), generator=g)) for _ in range(STEPS)]


def _probe(group):
    torch.manual_seed(1)
    sgd = {"type": "SGD", "lr": 0.5, "momentum": 0.9}
    config = ProbeConfig(name="p", probe=nn.Linear(D, C), optimizer=sgd, accumulate_grad_batches=3)
    return Probe.build(config, dp_group=group)


def _bank(group):
    config = BankConfig(name="b", inputs=["x"], num_classes=C, lr=[0.5, 0.05], in_features=D, accumulate_grad_batches=3)
    return ProbeBank.build(config, dp_group=group)


def _train(model, data, rank, world):
    for x, y in data:
        x, y = x[rank::world], y[rank::world]
        model.train_step([x] if isinstance(model, ProbeBank) else x, y)
    if isinstance(model, ProbeBank):
        model.settle()


def _weights(model):
    if isinstance(model, ProbeBank):
        return model.heads.flat.detach().clone()
    return torch.cat([p.detach().flatten() for p in model.module.parameters()])


def _worker(rank, world):
    data, group = _data(), dist.group.WORLD
    out = {}
    for kind, build in (("probe", _probe), ("bank", _bank)):
        straight = build(None)  # one process, never interrupted
        _train(straight, data, 0, 1)
        # N ranks stop mid-window; one process resumes from their state (here on every rank, with no group).
        ranks = build(group)
        _train(ranks, data[:STOP], rank, world)
        saved = ranks.state_dict()  # a collective: every rank's window gradients
        assert len(saved["window_grads_per_rank"]) == world
        single = build(None)
        single.load_state_dict(saved)
        _train(single, data[STOP:], 0, 1)
        # One process stops mid-window; N ranks resume from its state.
        alone = build(None)
        _train(alone, data[:STOP], 0, 1)
        resumed = build(group)
        resumed.load_state_dict(alone.state_dict())
        _train(resumed, data[STOP:], rank, world)
        reference = _weights(straight)
        out[kind] = (
            (_weights(single) - reference).abs().max().item(),
            (_weights(resumed) - reference).abs().max().item(),
        )
    return out


def test_probe_and_bank_resume_a_window_at_another_world_size():
    for result in run_distributed(_worker, 2):
        for kind, (fewer_ranks, more_ranks) in result.items():
            assert fewer_ranks < 1e-5, (kind, fewer_ranks)
            assert more_ranks < 1e-5, (kind, more_ranks)
