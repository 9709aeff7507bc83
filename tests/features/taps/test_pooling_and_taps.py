"""Unit tests of the torch-only core: spec parsing, pooling, names through wrappers, the capture rule."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from distprobe.features import TapNotCapturedError, TapSet, TapSpec, is_tap_spec, pool_tokens
from distprobe.features.names import canonical_modules, find_module


def test_parse_every_form() -> None:
    assert TapSpec.parse("a.b") == TapSpec(text="a.b", module_path="a.b")
    spec = TapSpec.parse("a.b:cls+mean,prefix=5")
    assert (spec.module_path, spec.pool, spec.prefix_tokens, spec.last_blocks) == ("a.b", "cls+mean", 5, None)
    spec = TapSpec.parse("blocks:last4+mean")
    assert (spec.pool, spec.last_blocks, spec.with_mean, spec.token_pool) == ("last4+mean", 4, True, "cls")
    assert TapSpec.parse("blocks:last2").with_mean is False


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("a:avg", "unknown pooling 'avg'"),
        ("a:last0", "needs n >= 1"),
        ("a..b:cls", "empty or blank segment"),
        (":cls", "empty or blank segment"),
        ("a:cls,registers=4", "unknown option 'registers=4'; valid options: \\['prefix'\\]"),
        ("a:mean,prefix=0", "'prefix' must be a whole number >= 1"),
    ],
)
def test_bad_specs_say_what_is_wrong_and_what_is_valid(spec: str, why: str) -> None:
    with pytest.raises(
        ValueError, match=rf"probe 'lin': argument 'input' got '{re.escape(spec)}': .*{why}.*expected 'path"
    ):
        TapSpec.parse(spec, probe_name="lin")


def test_pools() -> None:
    x = torch.randn(2, 7, 3)
    assert torch.equal(pool_tokens(x, "cls"), x[:, 0])
    torch.testing.assert_close(pool_tokens(x, "mean"), x[:, 1:].mean(1))
    torch.testing.assert_close(pool_tokens(x, "mean", prefix_tokens=5), x[:, 5:].mean(1))  # CLS + 4 registers
    torch.testing.assert_close(pool_tokens(x, "cls+mean"), torch.cat([x[:, 0], x[:, 1:].mean(1)], -1))
    with pytest.raises(ValueError, match="needs a \\(batch, tokens, dim\\) output"):
        pool_tokens(torch.randn(2, 3), "cls")
    with pytest.raises(ValueError, match="no patch token is left"):
        pool_tokens(x, "mean", prefix_tokens=7)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(3, 3) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def test_last_n_and_tuple_outputs() -> None:
    net = Net()
    hidden = []
    for block in net.blocks:
        block.register_forward_hook(lambda m, a, out: hidden.append(out.detach()))
    taps = TapSet()
    for spec in ("blocks:last2", "blocks:last2+mean,prefix=2", "blocks.0"):
        taps.add(spec)
    taps.attach(net)
    taps.arm()
    net(torch.randn(4, 6, 3))
    assert torch.equal(taps.take("blocks:last2"), torch.cat([hidden[1][:, 0], hidden[2][:, 0]], -1))
    want = torch.cat([hidden[1][:, 0], hidden[2][:, 0], hidden[2][:, 2:].mean(1)], -1)
    torch.testing.assert_close(taps.take("blocks:last2+mean,prefix=2"), want)
    assert torch.equal(taps.take("blocks.0"), hidden[0])
    assert len({id(t) for t in taps._taps.values()}) == 3  # one hook per module, however many specs

    class Pair(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x * 2, x

    root = nn.Sequential(Pair())
    taps = TapSet()
    taps.add("0")
    taps.attach(root)
    taps.arm()
    x = torch.randn(2, 3)
    root[0](x)
    assert torch.equal(taps.take("0"), x * 2)  # a tuple: its first element


def test_first_forward_per_step_only_and_errors() -> None:
    net = Net()
    taps = TapSet()
    taps.add("blocks.1")
    taps.attach(net)
    a, b = torch.randn(2, 3), torch.randn(2, 3)
    net(a)  # not armed: not captured
    taps.arm()
    with pytest.raises(TapNotCapturedError, match="module 'blocks.1' did not run a forward in this step"):
        taps.take("blocks.1")
    net(a)
    net(b)  # a second call in the same step (another crop, a recomputation) is ignored
    assert taps._taps[id(net.blocks[1])].forwards_since_arm == 2
    assert torch.equal(taps.take("blocks.1"), net.blocks[1](net.blocks[0](a)).detach())
    taps.arm()
    net(b)
    assert torch.equal(taps.take("blocks.1"), net.blocks[1](net.blocks[0](b)).detach())
    taps.remove()
    assert not net.blocks[1]._forward_hooks


def test_in_place_change_after_the_forward_is_refused() -> None:
    net = nn.Sequential(nn.Linear(3, 3), nn.ReLU(inplace=True))
    taps = TapSet()
    taps.add("0")
    taps.add("0:cls")
    taps.attach(net)
    taps.arm()
    net(torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="was changed in place after its forward"):
        taps.take("0")
    assert taps.take("0:cls").shape == (2, 3)  # copied at the forward


def test_names_through_wrappers() -> None:
    net = Net()
    net.blocks[1] = checkpoint_wrapper(net.blocks[1])
    compiled_like = nn.Module()
    compiled_like._orig_mod = net  # what torch.compile's OptimizedModule holds
    ddp_like = type("DistributedDataParallel", (nn.Module,), {})()
    ddp_like.module = compiled_like
    modules = canonical_modules(ddp_like)
    assert modules["blocks.1"] is net.blocks[1]  # the outermost: the wrapper, which runs once per call
    assert find_module(ddp_like, "module._orig_mod.blocks.1._checkpoint_wrapped_module") is net.blocks[1]
    assert is_tap_spec("blocks.1:cls", ddp_like) and is_tap_spec("blocks", ddp_like)
    assert not is_tap_spec("blocks.7", ddp_like) and not is_tap_spec("label", ddp_like)
    user = nn.Module()
    user.module = nn.Linear(2, 2)  # a user's own submodule called "module" keeps its name
    assert find_module(user, "module") is user.module and "" in canonical_modules(user)
