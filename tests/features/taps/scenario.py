"""One spawned run per strategy: a fit with tapped and explicit probes, and the same fit without probes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, DistributedSampler

from features.taps.models import IN_DIM, NUM_CLASSES, PAIRS, TokenModel, flat, our_hooks, probe_pairs
from helpers.models import RandomPoints


@dataclass
class TapRun:
    strategy: str
    kind: str = "plain"
    pairs: tuple[int, ...] = (0, 1, 2, 3)
    """Which of `PAIRS` are probed."""


#: One run per strategy the tapped-feature tests ride, by the suite's strategy ids (as tests/strategies names them).
STRATEGY_RUNS = {
    "ddp": TapRun("distprobe_ddp"),
    "fsdp1_wrapped": TapRun("fsdp1_wrapped"),
    "fsdp2": TapRun("distprobe_fsdp2", kind="fsdp2"),
    # proj is column-parallel: its output, the tapped one, is a DTensor sharded on the feature dimension.
    "fsdp2_tp_1x2": TapRun("tp_1x2", kind="tp"),
    "deepspeed_stage_1": TapRun("distprobe_deepspeed_stage_1"),
    "deepspeed_stage_2": TapRun("distprobe_deepspeed_stage_2"),
    "deepspeed_stage_3": TapRun("distprobe_deepspeed_stage_3"),
}


def _strategy(run: TapRun) -> Any:
    import distprobe.strategies  # noqa: F401 - registers the names

    if run.strategy == "fsdp1_wrapped":
        from distprobe.strategies.fsdp import ProbeFSDPStrategy
        from features.taps.models import Block

        # Every block wrapped by FSDP1 and by an activation-checkpointing wrapper: the names gain
        # `_fsdp_wrapped_module` and `_checkpoint_wrapped_module`, and each block is recomputed in the backward.
        return ProbeFSDPStrategy(auto_wrap_policy={Block}, activation_checkpointing_policy={Block})
    if run.strategy == "tp_1x2":
        from distprobe.strategies.fsdp2 import ProbeModelParallelStrategy

        return ProbeModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2)
    return run.strategy


def _dp(trainer: pl.Trainer) -> tuple[int, int]:
    kwargs = trainer.strategy.distributed_sampler_kwargs
    return kwargs["rank"], kwargs["num_replicas"]


class Data(pl.LightningDataModule):
    def _loader(self, size: int, seed: int) -> DataLoader:
        rank, replicas = _dp(self.trainer)
        dataset = RandomPoints(size, seed, in_dim=IN_DIM, num_classes=NUM_CLASSES)
        sampler = DistributedSampler(dataset, num_replicas=replicas, rank=rank, shuffle=False)
        return DataLoader(dataset, batch_size=4, sampler=sampler)

    def train_dataloader(self) -> DataLoader:
        return self._loader(32, 0)

    def val_dataloader(self) -> DataLoader:
        return self._loader(8, 1)


def _local(p: torch.Tensor) -> torch.Tensor:
    p = getattr(p, "ds_tensor", p)  # a ZeRO-3 partition
    return (p.to_local() if hasattr(p, "to_local") else p).detach().float().clone()


class Recorder(Callback):
    """Per step the main loss and this rank's (local) backbone parameters; the wrapped names once."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.backbone: list[torch.Tensor] = []
        self.names: list[str] = []
        self.tapped: dict[str, str] = {}
        self.dtensor_taps: list[str] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *_: Any) -> None:
        self.losses.append(outputs["loss"].detach().clone())
        model = trainer.strategy.model
        self.backbone = [_local(p) for n, p in model.named_parameters() if "callbacks_modules" not in n]
        if not self.names:
            from distprobe.features.tap_inputs import TapInputs

            self.names = [n for n, _ in pl_module.named_modules()]
            taps = TapInputs.of(pl_module).taps._taps.values()
            self.tapped = {tap.name: type(tap.module).__name__ for tap in taps}
            self.dtensor_taps = sorted(tap.name for tap in taps if tap._distributed is not None)


def _trainer(run: TapRun, callbacks: list[Callback], **overrides: Any) -> pl.Trainer:
    """A 2-process CPU Trainer of ``run``'s strategy: one epoch, no logger or checkpoints unless ``overrides`` say."""
    settings: dict[str, Any] = dict(
        accelerator="cpu",
        devices=2,
        strategy=_strategy(run),
        max_epochs=1,
        use_distributed_sampler=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    return pl.Trainer(**{**settings, **overrides})


def run(rank: int, world_size: int, spec: TapRun) -> dict[str, Any]:
    from distprobe.features import tap_inputs

    results: dict[str, Any] = {}
    probes = probe_pairs([PAIRS[i] for i in spec.pairs])
    recorder = Recorder()
    trainer = _trainer(spec, [*probes, recorder])
    model = TokenModel(seed=0, kind=spec.kind)
    trainer.fit(model, datamodule=Data())
    results["probes"] = {p.name: flat(p.probe.module) for p in probes}
    results["eval"] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("eval/")}
    results["losses"] = recorder.losses
    results["backbone"] = recorder.backbone
    results["names"] = recorder.names
    results["tapped"] = recorder.tapped
    results["dtensor_taps"] = recorder.dtensor_taps
    results["hooks_left"] = our_hooks(model)
    results["shared_left"] = len(tap_inputs._SHARED)

    recorder = Recorder()
    trainer = _trainer(spec, [recorder])
    trainer.fit(TokenModel(seed=0, kind=spec.kind), datamodule=Data())
    results["plain_losses"] = recorder.losses
    results["plain_backbone"] = recorder.backbone
    return results
