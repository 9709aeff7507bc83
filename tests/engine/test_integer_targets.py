"""Class-index targets of any integer type train as int64 ones: a probe, a linear bank and an attentive bank.

numpy gives int32 labels on some platforms and datasets store them as int16 or uint8; torch's cross-entropy takes
int64 (or uint8) only. A bank failed with "expected target dtype to be Long or Byte" at its first step (and the
Lightning probe's first-batch loss check refused such labels: tests/callbacks/test_integer_targets_fit.py). The
probe engine's own step already took them; its test pins that.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distprobe.bank import BankConfig, ProbeBank
from distprobe.engine import Probe, ProbeConfig

D, C, B = 6, 4, 8


def _stream(seed: int = 0, tokens: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shape = (B, 3, D) if tokens else (B, D)
    return [(torch.randn(shape, generator=g), torch.randint(0, C, (B,), generator=g)) for _ in range(4)]


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_a_probe_trains_on_integer_targets_of_any_type_as_on_int64(dtype: torch.dtype) -> None:
    def run(cast: torch.dtype) -> torch.Tensor:
        torch.manual_seed(0)
        probe = Probe.build(ProbeConfig(name="p", probe=nn.Linear(D, C), optimizer={"type": "SGD", "lr": 0.1}))
        for x, y in _stream():
            probe.train_step(x, y.to(cast))
        return probe.module.weight.detach().clone()

    assert torch.equal(run(dtype), run(torch.long))


@pytest.mark.parametrize("head", ["linear", "attentive"])
@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8])
def test_a_bank_trains_on_integer_targets_of_any_type_as_on_int64(head: str, dtype: torch.dtype) -> None:
    def run(cast: torch.dtype) -> torch.Tensor:
        config = BankConfig(
            name="bank",
            inputs=["x"],
            num_classes=C,
            lr=[0.1, 0.01],
            family=head,
            head_options={"num_heads": 2} if head == "attentive" else None,
            in_features=D,
        )
        bank = ProbeBank.build(config, seed=0)
        for x, y in _stream(tokens=head == "attentive"):
            out = bank.train_step([x], y.to(cast))
        bank.settle()
        assert not bool(out.bad)
        return bank.heads.flat.detach().clone()

    assert torch.equal(run(dtype), run(torch.long))
