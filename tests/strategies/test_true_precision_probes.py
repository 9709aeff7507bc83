"""Precision plugins cast the LightningModule; probes in its ModuleDict keep their own dtype, buffers included.

- ``*-true``: DeepSpeed casts in its ``setup``, before the engine is built, so hiding the probes while the engine was
  built was not enough: under ``distprobe_deepspeed_stage_{2,3}`` with ``bf16-true`` the probes trained in bfloat16.
  ModelParallel (FSDP2) casts inside the part of ``setup`` where the probes are hidden.
- FSDP1 with ``bf16-mixed`` casts every buffer it does not ignore to bf16 at each forward: with the probes ignored as
  parameters only, a BatchNorm probe's running statistics became bf16 and its first batch failed ("expected scalar
  type Float but found BFloat16", reported as a size mismatch).

One spawn of 2 gloo ranks runs them all.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch import nn

from helpers.dist import run_distributed
from strategies.scenario import EMBED_DIM, NUM_CLASSES, DataModule, Spec, _module, _trainer

SPECS = {
    "deepspeed_stage_2": Spec("distprobe_deepspeed_stage_2", precision="bf16-true"),
    "deepspeed_stage_3": Spec("distprobe_deepspeed_stage_3", precision="bf16-true"),
    "fsdp2": Spec("distprobe_fsdp2", kind="fsdp2", precision="bf16-true"),
    "fsdp1_bf16_mixed_batchnorm": Spec("distprobe_fsdp", precision="bf16-mixed"),
}


class DtypeRecorder(Callback):
    """At the end of training: the dtypes of the probe and of the backbone, and the probe's weights on every rank."""

    def __init__(self) -> None:
        self.facts: dict[str, Any] = {}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from distprobe.callbacks import OnlineProbe

        probe = next(cb for cb in trainer.callbacks if isinstance(cb, OnlineProbe)).probe.module
        mine = torch.cat([p.detach().reshape(-1).float() for p in probe.parameters()])
        every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(every, mine)
        self.facts = {
            "probe_dtypes": sorted(
                {str(t.dtype) for t in [*probe.parameters(), *probe.buffers()] if t.is_floating_point()}
            ),
            "backbone_dtype": str(pl_module.encoder[0].weight.dtype),
            "replicas_equal": all(torch.equal(other, mine) for other in every),
            "probe_finite": bool(torch.isfinite(mine).all()),
        }


def _run_every_strategy(rank: int, world_size: int) -> dict[str, Any]:
    import distprobe.strategies  # noqa: F401 - registers the strategy names
    from distprobe.callbacks import OnlineProbe

    results = {}
    for name, spec in SPECS.items():
        torch.manual_seed(rank)
        head: nn.Module = nn.Linear(EMBED_DIM, NUM_CLASSES)
        if "batchnorm" in name:
            head = nn.Sequential(nn.BatchNorm1d(EMBED_DIM), head)
        probe = OnlineProbe(None, name="linear", input="embedding", target="label", probe=head)
        recorder = DtypeRecorder()
        trainer = _trainer(spec, world_size, [probe, recorder], enable_checkpointing=False)
        trainer.fit(_module(spec, seed=0), datamodule=DataModule())
        results[name] = recorder.facts
    return results


@pytest.fixture(scope="module")
def every_strategy() -> list[dict[str, Any]]:
    return run_distributed(_run_every_strategy, 2, timeout=300.0)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("name", list(SPECS))
def test_probe_keeps_float32_under_bf16_precision(name: str, every_strategy: list[dict[str, Any]]) -> None:
    for rank in every_strategy:
        facts = rank[name]
        if SPECS[name].precision == "bf16-true":
            assert facts["backbone_dtype"] == "torch.bfloat16", facts  # the cast did happen
        assert facts["probe_dtypes"] == ["torch.float32"], facts
        assert facts["replicas_equal"] and facts["probe_finite"], facts


def test_fsdp1_ignores_registered_probes_as_modules_unless_the_user_names_parameters() -> None:
    from distprobe.strategies.fsdp import fsdp_ignored_states

    module = nn.Module()
    module.encoder = nn.Linear(2, 2)
    module.frozen = nn.Linear(2, 2)
    module.callbacks_modules = nn.ModuleDict({"linear": nn.Sequential(nn.BatchNorm1d(2), nn.Linear(2, 3))})
    probes = module.callbacks_modules
    # As modules, FSDP also leaves the probes' buffers (BatchNorm statistics) out of its mixed-precision cast.
    assert fsdp_ignored_states(module, {}) == [probes]
    assert fsdp_ignored_states(module, {"ignored_modules": [module.frozen]}) == [probes, module.frozen]
    # FSDP takes parameters or modules, not a mix: parameters named by the user turn everything into parameters.
    ignored = fsdp_ignored_states(module, {"ignored_states": [module.frozen.weight]})
    assert [id(p) for p in ignored] == [id(p) for p in [*probes.parameters(), module.frozen.weight]]
