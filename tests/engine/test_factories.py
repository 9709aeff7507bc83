import functools

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from distprobe.engine import LARS, build_module, build_optimizer, build_scheduler, optimizer_names, scheduler_names


def params():
    return list(nn.Linear(4, 2).parameters())


@pytest.mark.parametrize("name", ["LARS", "SGD", "AdamW", "Adam", "RMSprop", "Adagrad"])
def test_every_optimizer_name_works_without_lr(name):
    opt = build_optimizer(name, params(), probe_name="p")
    assert type(opt).__name__ == name
    assert opt.param_groups[0]["lr"] > 0


def test_default_optimizer_is_the_documented_lars():
    opt = build_optimizer(None, params(), probe_name="p")
    assert isinstance(opt, LARS)
    group = opt.param_groups[0]
    assert (group["lr"], group["clip_lr"], group["eta"], group["exclude_bias_n_norm"], group["weight_decay"]) == (
        0.1,
        True,
        0.02,
        True,
        0.0,
    )


@pytest.mark.parametrize(
    "spec",
    [
        {"type": "AdamW", "lr": 0.5},
        {"type": torch.optim.AdamW, "lr": 0.5},
        functools.partial(torch.optim.AdamW, lr=0.5),
        lambda ps: torch.optim.AdamW(ps, lr=0.5),
        {"_target_": "torch.optim.AdamW", "lr": 0.5},
        OmegaConf.create({"_target_": "torch.optim.AdamW", "lr": 0.5}),
    ],
)
def test_optimizer_forms(spec):
    opt = build_optimizer(spec, params(), probe_name="p")
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["lr"] == 0.5


def test_named_optimizers_stay_unfused_on_cpu_and_keep_the_users_implementation_choice():
    """`fused=True` is a CUDA default (a GPU test checks it); on CPU, and whenever the user picks, torch decides."""
    assert not build_optimizer("AdamW", params(), probe_name="p").defaults.get("fused")
    chosen = build_optimizer({"type": "AdamW", "foreach": False}, params(), probe_name="p")
    assert chosen.defaults["foreach"] is False and not chosen.defaults.get("fused")
    assert build_optimizer({"type": "SGD", "fused": True}, params(), probe_name="p").defaults["fused"] is True


def test_optimizer_class_gets_defaults():
    assert isinstance(build_optimizer(torch.optim.SGD, params(), probe_name="p"), torch.optim.SGD)


def test_optimizer_instance_must_own_the_probe_parameters():
    ps = params()
    opt = torch.optim.SGD(ps, lr=0.1)
    assert build_optimizer(opt, ps, probe_name="p") is opt
    with pytest.raises(ValueError, match="probe 'p'.*optimizer instance whose parameters are not exactly"):
        build_optimizer(opt, params(), probe_name="p")


def test_unknown_optimizer_lists_valid_names():
    with pytest.raises(ValueError, match=r"probe 'p'.*'optimizer'.*'Adamw'.*valid names: \[.*'AdamW'.*'LARS'"):
        build_optimizer("Adamw", params(), probe_name="p")
    assert "LBFGS" not in optimizer_names()


def test_optimizer_dict_without_type_is_rejected():
    with pytest.raises(ValueError, match="has no 'type'"):
        build_optimizer({"lr": 0.1}, params(), probe_name="p")


@pytest.mark.parametrize("name", scheduler_names())
def test_every_scheduler_name_builds_with_defaults(name):
    opt = torch.optim.SGD(params(), lr=0.1)
    sched = build_scheduler(name, opt, total_steps=50, probe_name="p")
    assert type(sched).__name__ == name
    opt.step()
    sched.step()


def test_cosine_takes_t_max_from_total_steps():
    opt = torch.optim.SGD(params(), lr=0.1)
    assert build_scheduler("CosineAnnealingLR", opt, total_steps=77, probe_name="p").T_max == 77


def test_scheduler_forms():
    opt = torch.optim.SGD(params(), lr=0.1)
    assert build_scheduler({"type": "StepLR", "step_size": 3}, opt, total_steps=9, probe_name="p").step_size == 3
    assert isinstance(
        build_scheduler(
            functools.partial(torch.optim.lr_scheduler.StepLR, step_size=2), opt, total_steps=9, probe_name="p"
        ),
        torch.optim.lr_scheduler.StepLR,
    )
    inst = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    assert build_scheduler(inst, opt, total_steps=9, probe_name="p") is inst
    default = build_scheduler(None, opt, total_steps=9, probe_name="p")
    assert isinstance(default, torch.optim.lr_scheduler.ConstantLR)
    assert default.get_last_lr() == [0.1]
    with pytest.raises(ValueError, match="another optimizer"):
        build_scheduler(inst, torch.optim.SGD(params(), lr=0.1), total_steps=9, probe_name="p")


def test_unknown_scheduler_lists_valid_names():
    opt = torch.optim.SGD(params(), lr=0.1)
    with pytest.raises(ValueError, match=r"probe 'p'.*'scheduler'.*'Cosine'.*valid names: \[.*'CosineAnnealingLR'"):
        build_scheduler("Cosine", opt, total_steps=9, probe_name="p")


def test_module_forms():
    owner = object()
    assert isinstance(build_module(nn.Linear(2, 2), probe_name="p"), nn.Linear)
    assert isinstance(build_module(lambda: nn.Linear(2, 2), probe_name="p"), nn.Linear)
    seen = []
    build_module(lambda m: seen.append(m) or nn.Linear(2, 2), owner=owner, probe_name="p")
    assert seen == [owner]
    cfg = {"_target_": "torch.nn.Linear", "in_features": 2, "out_features": 3}
    assert build_module(cfg, probe_name="p").out_features == 3
    assert build_module(OmegaConf.create(cfg), probe_name="p").out_features == 3
    with pytest.raises(ValueError, match="probe 'p': argument 'probe' got 3"):
        build_module(3, probe_name="p")
    with pytest.raises(ValueError, match="not an nn.Module"):
        build_module(lambda: 3, probe_name="p")
