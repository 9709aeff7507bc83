"""The head-family interface: a family written in one class plugs into the bank's engine unchanged.

The family below (bias-free linear heads) exists only here. It gives stacked parameters, a batched forward and its
views; the engine does the rest (optimizer, accumulation, clipping, skips, checkpoints by head id), and each head
still equals a separate probe.
"""

import pytest
import torch
from torch import nn

from distprobe.bank import BankConfig, ProbeBank
from distprobe.bank.families import FAMILIES, HeadFamily, LinearHeads, ParamView
from distprobe.engine import Probe, ProbeConfig

D, C, LRS = 6, 3, [0.2, 0.02]


class BiasFreeHeads(HeadFamily):
    """K ``nn.Linear(D, C, bias=False)`` heads over one source."""

    def initial_flat(self, generator, device):
        (d,) = self.in_features.values()
        self.shape = (self.num_heads, self.config.num_classes, d)
        return torch.empty(self.shape).uniform_(-(d**-0.5), d**-0.5, generator=generator).flatten()

    def views(self, flat):
        weights = flat.view(self.shape)
        return [ParamView(heads=slice(0, self.num_heads), whole=weights, parts=(weights,), bias_like=(False,))]

    def forward(self, features, group=None):
        (x,) = features
        return torch.einsum("kcd,bd->kbc", self.flat.view(self.shape), x.flatten(1)).contiguous()

    def export(self, index):
        layer = nn.Linear(self.shape[2], self.shape[1], bias=False, device=self.flat.device)
        with torch.no_grad():
            layer.weight.copy_(self.flat.view(self.shape)[index])
        return layer


@pytest.fixture
def bias_free(monkeypatch):
    monkeypatch.setitem(FAMILIES, "bias_free", BiasFreeHeads)


def _batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, D, generator=g), torch.randint(0, C, (8,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("optimizer", ["SGD", "LARS"])
def test_a_new_family_trains_each_head_as_a_separate_probe(bias_free, optimizer):
    config = BankConfig(
        name="nb",
        family="bias_free",
        inputs=["x"],
        num_classes=C,
        lr=LRS,
        in_features=D,
        optimizer=optimizer,
        accumulate_grad_batches=2,
        gradient_clip_val=0.5,
    )
    bank = ProbeBank.build(config)
    assert isinstance(bank.heads, BiasFreeHeads)
    refs = {}
    for head_id, lr in zip(bank.head_ids, LRS, strict=True):
        kind = {"type": "SGD", "momentum": 0.9} if optimizer == "SGD" else {"type": "LARS"}
        probe = ProbeConfig(
            name="ref",
            probe=bank.head(head_id),
            optimizer={**kind, "lr": lr},
            accumulate_grad_batches=2,
            gradient_clip_val=0.5,
        )
        refs[head_id] = Probe.build(probe)
    for x, y in _batches(6):
        bank.train_step([x], y)
        for ref in refs.values():
            ref.train_step(x, y)
    for head_id, ref in refs.items():
        torch.testing.assert_close(bank.head(head_id).weight, ref.module.weight, atol=1e-5, rtol=1e-5)
    state = bank.state_dict()
    resumed = ProbeBank.build(config, seed=7)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.heads.flat, bank.heads.flat)


def test_linear_heads_are_the_default_family_and_an_unknown_family_is_refused():
    bank = ProbeBank.build(BankConfig(name="g", inputs=["x"], num_classes=C, lr=LRS, in_features=D))
    assert isinstance(bank.heads, LinearHeads) and bank.heads.metric_kind == "classification"
    with pytest.raises(
        ValueError, match=r"bank 'g': argument 'family' got 'conv'; expected one of \['attentive', 'dense', 'linear'\]"
    ):
        BankConfig(name="g", inputs=["x"], num_classes=C, family="conv")
