"""Single-process checks of the exclusion functions and of the registered strategy names."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import StrategyRegistry
from torch import nn

import distprobe.callbacks  # noqa: F401 - importing the callbacks registers the strategy names
from distprobe.strategies import (
    STRATEGIES,
    ProbeDDPStrategy,
    ProbeDeepSpeedStrategy,
    ProbeFSDPStrategy,
    ProbeModelParallelStrategy,
    drop_from_optimizers,
    hidden_probes,
    probe_parameters,
)
from distprobe.strategies.exclusion import probe_state_names, unregister_probes


class WithProbes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 4)
        self.callbacks_modules = nn.ModuleDict({"linear": nn.Linear(4, 2), "bn": nn.BatchNorm1d(2)})
        self.head = nn.Linear(4, 1)


def test_probe_parameters_from_module_dict_and_plain_dict():
    module = WithProbes()
    assert {id(p) for p in probe_parameters(module)} == {id(p) for p in module.callbacks_modules.parameters()}
    assert "callbacks_modules.bn.running_mean" in probe_state_names(module)
    assert all(name.startswith("callbacks_modules.") for name in probe_state_names(module))

    plain = nn.Linear(4, 4)
    probe = nn.Linear(4, 2)
    object.__setattr__(plain, "callbacks_modules", {"linear": probe})
    assert [id(p) for p in probe_parameters(plain)] == [id(p) for p in probe.parameters()]
    assert probe_state_names(plain) == []


def test_hidden_probes_hides_and_restores_in_order():
    module = WithProbes()
    keys = list(module.state_dict())
    container = module.callbacks_modules
    with hidden_probes(module):
        assert not any(n.startswith("callbacks_modules") for n, _ in module.named_parameters())
        assert module.callbacks_modules is container  # still reachable by name
        assert probe_parameters(module)  # and still found
    assert list(module.state_dict()) == keys
    assert module.callbacks_modules is container
    assert "callbacks_modules" not in module.__dict__


def test_unregister_probes_without_container_is_a_noop():
    module = nn.Linear(2, 2)
    reregister = unregister_probes(module)
    reregister()
    assert list(module.state_dict()) == ["weight", "bias"]


def test_drop_from_optimizers_removes_params_and_state_keeps_groups():
    module = WithProbes()
    optimizer = torch.optim.SGD(
        [{"params": list(module.encoder.parameters())}, {"params": list(module.callbacks_modules.parameters())}],
        lr=0.1,
        momentum=0.9,
    )
    for p in module.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    removed = drop_from_optimizers([optimizer], probe_parameters(module))
    assert removed == len(list(module.callbacks_modules.parameters()))
    assert len(optimizer.param_groups) == 2
    assert optimizer.param_groups[1]["params"] == []
    assert set(optimizer.state) == set(module.encoder.parameters())
    optimizer.step()  # an emptied group still steps


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("distprobe_ddp", ProbeDDPStrategy),
        ("distprobe_ddp_spawn", ProbeDDPStrategy),
        ("distprobe_fsdp", ProbeFSDPStrategy),
        ("distprobe_fsdp2", ProbeModelParallelStrategy),
        ("distprobe_model_parallel", ProbeModelParallelStrategy),
        ("distprobe_deepspeed", ProbeDeepSpeedStrategy),
        ("distprobe_deepspeed_stage_1", ProbeDeepSpeedStrategy),
        ("distprobe_deepspeed_stage_2", ProbeDeepSpeedStrategy),
        ("distprobe_deepspeed_stage_3", ProbeDeepSpeedStrategy),
    ],
)
def test_registered_names_build_a_cpu_trainer(name, cls):
    assert name in StrategyRegistry and name in STRATEGIES
    trainer = pl.Trainer(strategy=name, accelerator="cpu", devices=2, logger=False, enable_progress_bar=False)
    assert type(trainer.strategy) is cls
    assert trainer.strategy.probe_process_group is None  # no process group outside fit
    if name.startswith("distprobe_deepspeed_stage_"):
        assert trainer.strategy.config["zero_optimization"]["stage"] == int(name[-1])
