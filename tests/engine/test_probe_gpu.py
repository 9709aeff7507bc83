"""The probe on a real CUDA device: no host sync in the step, mixed precision, sharded strategies on one GPU.

Run on a GPU machine with ``pytest -m gpu tests``; without CUDA every test here is skipped by the conftest.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

import distprobe.strategies  # noqa: F401 - registers the distprobe_* names
from distprobe.callbacks import OnlineProbe
from distprobe.engine import Probe, ProbeConfig
from helpers.gpu import (
    EMBED_DIM,
    NUM_CLASSES,
    Backbone,
    Recorder,
    SyncGuard,
    loaders,
    probe_params,
    reference_sgd_step,
    trainer_kwargs,
)
from helpers.optimizers import optimizer_tensor_ids

pytestmark = pytest.mark.gpu

LR = 0.5


def metrics() -> dict[str, Any]:
    return {
        "train": {"top1": MulticlassAccuracy(NUM_CLASSES), "f1": MulticlassF1Score(NUM_CLASSES, average="macro")},
        "val": {"top1": MulticlassAccuracy(NUM_CLASSES, average="micro")},
    }


@pytest.mark.parametrize(
    "optimizer",
    [None, "SGD", {"type": "AdamW", "lr": 1e-3}, {"type": "Adam", "lr": 1e-3, "capturable": True}],
    ids=["LARS-default", "SGD", "AdamW", "Adam-capturable"],
)
@pytest.mark.parametrize("accumulate", [1, 3])
def test_engine_train_and_eval_steps_never_sync(optimizer: Any, accumulate: int) -> None:
    device = torch.device("cuda")
    probe = Probe.build(
        ProbeConfig(
            name="linear",
            probe=nn.Linear(EMBED_DIM, NUM_CLASSES),
            optimizer=optimizer,
            accumulate_grad_batches=accumulate,
            gradient_clip_val=0.5,
            metrics=metrics(),
        ),
        device=device,
    )
    x = torch.randn(16, EMBED_DIM, device=device, dtype=torch.bfloat16)
    y = torch.randint(0, NUM_CLASSES, (16,), device=device)
    probe.train_step(x, y)  # lazy optimizer state and cuBLAS handles are created outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2 * accumulate):
            probe.train_step(x, y)
            probe.eval_step(x, y, num_valid=13)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(p).all() for p in probe.module.parameters())


@pytest.mark.parametrize("name", ["AdamW", "Adam", "SGD"])
def test_named_optimizers_are_fused_on_cuda_and_skip_a_non_finite_step_in_the_kernel(name: str) -> None:
    device = torch.device("cuda")
    probe = Probe.build(
        ProbeConfig(name="linear", probe=nn.Linear(EMBED_DIM, NUM_CLASSES), optimizer=name), device=device
    )
    assert probe.optimizer.defaults["fused"] is True
    x = torch.randn(16, EMBED_DIM, device=device)
    y = torch.randint(0, NUM_CLASSES, (16,), device=device)
    probe.train_step(x, y)
    weights = [p.detach().clone() for p in probe.module.parameters()]
    state = [{k: v.clone() for k, v in probe.optimizer.state[p].items()} for p in probe.module.parameters()]
    bad = x.clone()
    bad[0, 0] = float("inf")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        probe.train_step(bad, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(probe.skipped_steps) == 1
    for p, w, st in zip(probe.module.parameters(), weights, state):
        assert torch.equal(p, w)
        assert all(torch.equal(probe.optimizer.state[p][k], v) for k, v in st.items())


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed", "32-true"])
@pytest.mark.parametrize("clip", [1e-3, 1e3], ids=["clip-active", "clip-inactive-unless-scaled"])
def test_precision_probe_matches_float64_reference(precision: str, clip: float) -> None:
    """Every probe step equals a float64 SGD step on the same features, clipped on the *unscaled* gradients.

    Under 16-mixed the main model's GradScaler scales its loss by 2**16: had the probe's gradients gone through it,
    the 1e3 clip would cut every step (scaled norm >> 1e3 > true norm) and the weights would differ. The fit also
    shows that the probe's optimizer never meets the scaler ("No inf checks were recorded" would be raised).
    """
    probe = OnlineProbe(
        None,
        name="linear",
        input="embedding",
        target="label",
        probe=nn.Linear(EMBED_DIM, NUM_CLASSES),
        optimizer={"type": "SGD", "lr": LR, "momentum": 0.0},
        gradient_clip_val=clip,
        metrics=metrics(),
    )
    before = Recorder(probe, "before")
    after = Recorder(probe, "after", before.steps)
    train, val = loaders()
    trainer = pl.Trainer(**trainer_kwargs(precision=precision, callbacks=[before, probe, after]))
    trainer.fit(Backbone(), train, val)
    if precision == "16-mixed":
        scaler = trainer.precision_plugin.scaler  # type: ignore[attr-defined]
        assert scaler is not None and scaler.get_scale() > 1e3
    assert len(before.steps) == 4
    for step in before.steps:
        w, b = step["before"]
        ref_w, ref_b, true_norm = reference_sgd_step(w, b, step["features"], step["label"], LR, clip)
        assert true_norm < 1e3 or clip < 1
        torch.testing.assert_close(step["after"][0].double(), ref_w, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(step["after"][1].double(), ref_b, rtol=1e-4, atol=1e-5)
    assert "eval/linear_top1" in trainer.callback_metrics
    assert "train/linear_loss" in trainer.callback_metrics


def test_online_probe_hook_in_a_trainer_never_syncs() -> None:
    """The callback's whole ``on_train_batch_end`` (engine step, metrics, logging) under sync-debug ``"error"``."""
    probes = [
        OnlineProbe(
            None,
            name=f"linear{i}",
            input="embedding",
            target="label",
            probe=nn.Linear(EMBED_DIM, NUM_CLASSES),
            optimizer={"type": "AdamW", "lr": 1e-3},
            accumulate_grad_batches=2,
            gradient_clip_val=1.0,
            metrics=metrics(),
        )
        for i in range(3)
    ]
    opener = SyncGuard()
    train, val = loaders(train=48)
    trainer = pl.Trainer(
        **trainer_kwargs(precision="bf16-mixed", callbacks=[opener, *probes, SyncGuard(opener)], max_epochs=2)
    )
    trainer.fit(Backbone(), train, val)
    assert opener.checked == 2 * (6 - 1)  # batch 0 of each epoch is left out
    assert "eval/linear2_top1" in trainer.callback_metrics


STRATEGIES = ["distprobe_fsdp", "distprobe_fsdp2", "distprobe_deepspeed_stage_2", "distprobe_deepspeed_stage_3"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_on_one_gpu_trains_a_full_probe(strategy: str) -> None:
    """Under FSDP1, FSDP2 and ZeRO-2/3 on one GPU (bf16): the probe stays whole, out of the main optimizer, trains
    exactly as a float64 reference on the features it saw, and its eval metric is exact."""
    if "deepspeed" in strategy and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    probe = OnlineProbe(
        None,
        name="linear",
        input="embedding",
        target="label",
        probe=nn.Linear(EMBED_DIM, NUM_CLASSES),
        optimizer={"type": "SGD", "lr": LR, "momentum": 0.0},
        metrics=metrics(),
    )
    before = Recorder(probe, "before")
    after = Recorder(probe, "after", before.steps)
    opener = SyncGuard()
    train, val = loaders()
    trainer = pl.Trainer(
        **trainer_kwargs(
            strategy=strategy,
            precision="bf16-mixed",
            callbacks=[before, opener, probe, SyncGuard(opener), after],
        )
    )
    trainer.fit(Backbone(), train, val)
    params = list(probe.probe.module.parameters())
    assert [tuple(p.shape) for p in params] == [(NUM_CLASSES, EMBED_DIM), (NUM_CLASSES,)]
    device = trainer.strategy.root_device
    assert all(type(p) is nn.Parameter and p.device == device and p.dtype == torch.float32 for p in params)
    assert not {id(p) for p in params} & optimizer_tensor_ids(trainer)
    assert opener.checked == 3
    for step in before.steps:
        w, b = step["before"]
        ref_w, ref_b, _ = reference_sgd_step(w, b, step["features"], step["label"], LR, None)
        torch.testing.assert_close(step["after"][0].double(), ref_w, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(step["after"][1].double(), ref_b, rtol=1e-4, atol=1e-5)
    final = probe_params(probe)
    correct = sum(int(((feats @ final[0].T + final[1]).argmax(1) == labels).sum()) for feats, labels in after.val)
    assert sum(len(labels) for _, labels in after.val) == 10
    assert trainer.callback_metrics["eval/linear_top1"].item() == pytest.approx(correct / 10, abs=1e-6)


class CorruptOnGPU(pl.Callback):
    """Placed before the probe: a label of 99 for a 4-class probe, or a NaN feature, on batch 6 of a 12-batch fit."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step != 6:
            return
        if self.kind == "label":
            batch["label"] = batch["label"].clone()
            batch["label"][2] = 99
        else:
            outputs["embedding"] = outputs["embedding"].clone()
            outputs["embedding"][1, 0] = float("nan")


@pytest.mark.parametrize("kind", ["label", "nan_feature"])
def test_bad_data_late_in_a_cuda_fit_is_skipped_without_a_device_side_assert(kind: str) -> None:
    """Before the bad-data policy, a label of 99 at step 6 killed the process's CUDA context (device-side assert)."""
    probe = OnlineProbe(
        None,
        name="linear",
        input="embedding",
        target="label",
        probe=nn.Linear(EMBED_DIM, NUM_CLASSES),
        optimizer="SGD",
        metrics=metrics(),
    )
    train, val = loaders(train=96)
    opener = SyncGuard()
    trainer = pl.Trainer(
        **trainer_kwargs(
            precision="bf16-mixed",
            callbacks=[CorruptOnGPU(kind), opener, probe, SyncGuard(opener)],
            max_epochs=1,
            log_every_n_steps=1,
        )
    )
    trainer.fit(Backbone(), train, val)
    torch.cuda.synchronize()  # the CUDA context is alive: a device-side assert would raise here or earlier
    assert trainer.state.finished
    assert int(probe.probe.skipped_steps) == 1
    reason = "targets_out_of_range" if kind == "label" else "nonfinite_features"
    assert float(trainer.callback_metrics[f"train/linear_bad_batches/{reason}"]) == 1.0
    assert all(torch.isfinite(p).all() for p in probe.probe.module.parameters())
    assert opener.checked == 12 - 1  # every hook but the first ran under sync-debug "error", the bad one included
