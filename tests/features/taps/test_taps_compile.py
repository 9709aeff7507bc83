"""Taps on a torch.compile'd backbone (``self.backbone = torch.compile(self.backbone)``), with a real Trainer.

The tapped blocks run inside the compiled region: Dynamo traces the tap's forward hook into the graph (the captured
tensors become graph outputs, the hook's Python state is replayed after each call). The test checks that the hook
fires every step, that it costs no graph break and no recompilation across steps, and that the tapped probe equals
its twin reading the same activation from ``training_step``'s outputs. ``eager`` runs Dynamo alone (about a second);
``inductor`` generates and builds C++ kernels, about 20-40 s on 2 CPU cores, hence ``slow``.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from torch.utils.data import DataLoader

from features.taps.models import IN_DIM, NUM_CLASSES, PAIRS, TokenModel, flat, probe_pairs
from helpers.models import RandomPoints, trainer


class CompiledModel(TokenModel):
    def __init__(self, backend: str) -> None:
        super().__init__(seed=0)
        self.backbone = torch.compile(self.backbone, backend=backend)


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_taps_inside_a_compiled_backbone(backend: str) -> None:
    torch._dynamo.reset()
    counters.clear()
    probes = probe_pairs(PAIRS[:3])  # the (B, N, D) output, its pooled forms and the last blocks
    model = CompiledModel(backend)
    loader = DataLoader(RandomPoints(16, 0, in_dim=IN_DIM, num_classes=NUM_CLASSES), batch_size=4)
    trainer(probes, max_epochs=1, limit_val_batches=0).fit(model, loader)
    assert "backbone._orig_mod.blocks.1" in dict(model.named_modules())  # the name the tap had to see through
    for i in range(3):
        tapped, explicit = probes[2 * i], probes[2 * i + 1]
        torch.testing.assert_close(flat(tapped.probe.module), flat(explicit.probe.module), rtol=0, atol=1e-6)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1  # one graph for all 4 steps: the hook's state adds no guard miss
