"""The backbone's own gradient clipping never sees a probe registered in the LightningModule.

A probe in the user's ``nn.ModuleDict`` keeps its open accumulation window in its parameters' ``.grad``. Clipping the
whole module by norm in ``configure_gradient_clipping`` (FSDP1's ``model.clip_grad_norm_``, the way to clip under
FSDP1 since Lightning's FSDP precision refuses ``gradient_clip_algorithm="norm"``; ``clip_grad_norm_`` over
``self.parameters()`` elsewhere) counted the probe's gradients in the backbone's norm and scaled them: the backbone
trained differently with the probe than without it (from the second step on).

One spawn of 2 gloo ranks: per strategy a fit with a probe accumulating 2 micro-batches and a fit without; the main
losses and the backbone's (local) parameters must be bitwise the same. Also with manual optimization, where the user
clips the whole module inside ``training_step``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from helpers.dist import run_distributed
from strategies.scenario import EMBED_DIM, NUM_CLASSES, Backbone, DataModule, FSDP2Backbone, Spec, _trainer

SPECS = {
    "ddp": Spec("distprobe_ddp"),
    "fsdp1": Spec("distprobe_fsdp"),
    "fsdp2": Spec("distprobe_fsdp2", kind="fsdp2"),
    # Manual optimization: the user clips the whole module inside training_step.
    "ddp_manual": Spec("distprobe_ddp"),
    # DeepSpeed clips inside its engine: only the gradients seen at on_before_optimizer_step are compared.
    "deepspeed_stage_2": Spec("distprobe_deepspeed_stage_2"),
}


def _clip_whole_module(module: pl.LightningModule) -> None:
    wrapped = module.trainer.strategy.model
    if hasattr(wrapped, "clip_grad_norm_"):  # FSDP1
        wrapped.clip_grad_norm_(1e-3)
    else:
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1e-3)


class ClippedBackbone(Backbone):
    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: Any = None, gradient_clip_algorithm: Any = None
    ) -> None:
        _clip_whole_module(self)


class ClippedFSDP2Backbone(FSDP2Backbone):
    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: Any = None, gradient_clip_algorithm: Any = None
    ) -> None:
        _clip_whole_module(self)


class ManualClippedBackbone(Backbone):
    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.automatic_optimization = False

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        optimizer = self.optimizers()
        outputs = super().training_step(batch, batch_idx)
        self.manual_backward(outputs["loss"])
        torch.nn.utils.clip_grad_norm_(self.parameters(), 1e-3)
        optimizer.step()
        optimizer.zero_grad()
        outputs["loss"] = outputs["loss"].detach()
        outputs["embedding"] = outputs["embedding"].detach()
        return outputs


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.backbone: list[torch.Tensor] = []
        self.with_grad: list[list[str]] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        # What a gradient-norm log over the module (lightning.pytorch.utilities.grad_norm) would read. The hook also
        # runs for every probe optimizer step (distprobe calls it with the probe's optimizer): only the main one counts.
        if not any(optimizer is main for main in trainer.optimizers):
            return
        self.with_grad.append(sorted(n for n, p in pl_module.named_parameters() if p.grad is not None))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *_: Any) -> None:
        self.losses.append(outputs["loss"].detach().clone())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for p in pl_module.encoder.parameters():
            self.backbone.append((p.to_local() if hasattr(p, "to_local") else p).detach().clone())


def _run_every_strategy(rank: int, world_size: int) -> dict[str, Any]:
    import distprobe.strategies  # noqa: F401 - registers the strategy names
    from distprobe.callbacks import OnlineProbe

    results = {}
    for name, spec in SPECS.items():
        cls = ClippedFSDP2Backbone if spec.kind == "fsdp2" else ClippedBackbone
        if name.endswith("manual"):
            cls = ManualClippedBackbone
        if name.startswith("deepspeed"):
            cls = Backbone
        runs = {}
        for probed in (True, False):
            recorder = LossRecorder()
            callbacks: list[Callback] = [recorder]
            if probed:
                probe = OnlineProbe(
                    None,
                    name="linear",
                    input="embedding",
                    target="label",
                    probe=nn.Linear(EMBED_DIM, NUM_CLASSES),
                    accumulate_grad_batches=2,
                )
                callbacks.insert(0, probe)
            trainer = _trainer(spec, world_size, callbacks, enable_checkpointing=False)
            trainer.fit(cls(seed=0), datamodule=DataModule())
            runs["probed" if probed else "plain"] = (recorder.losses, recorder.backbone, recorder.with_grad)
        results[name] = runs
    return results


@pytest.fixture(scope="module")
def every_strategy() -> list[dict[str, Any]]:
    return run_distributed(_run_every_strategy, 2, timeout=300.0)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("name", list(SPECS))
def test_backbone_clipping_is_the_same_with_and_without_probes(name: str, every_strategy: list[dict[str, Any]]) -> None:
    for rank in every_strategy:
        (probed_losses, probed_backbone, probed_grads), (plain_losses, plain_backbone, plain_grads) = (
            rank[name]["probed"],
            rank[name]["plain"],
        )
        assert probed_grads == plain_grads  # no probe gradient in sight of the main step
        assert len(probed_losses) == len(plain_losses) > 2
        for step, (got, want) in enumerate(zip(probed_losses, plain_losses, strict=True)):
            assert torch.equal(got, want), step
        for got, want in zip(probed_backbone, plain_backbone, strict=True):
            assert torch.equal(got, want)
