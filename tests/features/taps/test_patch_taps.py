"""Patch-token taps for dense heads: ``":patch"`` (prefix tokens dropped) and ``":patch+last{n}"`` (DINOv2's
concatenation of the last blocks' patch tokens), on a real module's forward."""

import pytest
import torch
from torch import nn

from distprobe.features.spec import TapSpec
from distprobe.features.taps import TapSet


class Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(*(nn.Linear(3, 3) for _ in range(3)))

    def forward(self, x):
        return self.blocks(x)


def test_patch_taps_keep_the_patch_tokens_of_one_block_or_the_last_blocks():
    assert TapSpec.parse("blocks.2:patch").pool == "patch"
    spec = TapSpec.parse("blocks:patch+last2,prefix=2")
    assert (spec.last_blocks, spec.patches, spec.prefix_tokens, spec.token_pool) == (2, True, 2, "patch")
    with pytest.raises(ValueError, match="'patch\\+last\\{n\\}' takes no '\\+mean'"):
        TapSpec.parse("blocks:patch+last2+mean")
    net = Blocks()
    hidden = []
    for block in net.blocks:
        block.register_forward_hook(lambda _m, _i, out: hidden.append(out.detach()))
    taps = TapSet()
    for text in ("blocks.2:patch", "blocks.2:patch,prefix=3", "blocks:patch+last2", "blocks:last2"):
        taps.add(text)
    taps.attach(net)
    taps.arm()
    net(torch.randn(4, 7, 3))  # 1 CLS token + 6 patches (or 3 prefix tokens + 4 patches)
    assert torch.equal(taps.take("blocks.2:patch"), hidden[2][:, 1:])
    assert torch.equal(taps.take("blocks.2:patch,prefix=3"), hidden[2][:, 3:])
    assert torch.equal(taps.take("blocks:patch+last2"), torch.cat([hidden[1][:, 1:], hidden[2][:, 1:]], -1))
    assert torch.equal(taps.take("blocks:last2"), torch.cat([hidden[1][:, 0], hidden[2][:, 0]], -1))


def test_a_patch_tap_on_an_output_without_patches_names_the_problem():
    net = Blocks()
    taps = TapSet()
    taps.add("blocks.0:patch", probe_name="seg")
    taps.attach(net)
    taps.arm()
    net(torch.randn(4, 3))
    with pytest.raises(ValueError, match="probe 'seg': argument 'input' 'blocks.0:patch': token pooling needs"):
        taps.take("blocks.0:patch")
