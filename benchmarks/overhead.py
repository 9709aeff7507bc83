"""Step-time overhead of online probes: distprobe against its peers, in one run, variants interleaved.

Variants (each a real ``lightning.Trainer`` fit of the same backbone, loss, optimizer and synthetic batches):

- ``none``: no probe (the baseline of ``distprobe_*`` and ``paramgroup``);
- ``distprobe_x1`` / ``distprobe_x8``: 1 or 8 distprobe ``OnlineProbe`` linear probes, AdamW, train+eval top-1;
- ``spt_none``: a ``stable_pretraining.Module`` without probe (the baseline of ``spt_x*``; its training step is
  manual optimisation, not the plain module's);
- ``spt_x1`` / ``spt_x8``: 1 or 8 stable-pretraining ``OnlineProbe`` linear probes, same optimizer and metrics;
- ``paramgroup``: the lightly / solo-learn pattern: the probe is a parameter group of the main optimizer and its
  loss is added to the main loss.

Every round runs each variant once, in an order rotated from round to round; a run builds a fresh Trainer and model,
warms up, then times ``steps`` optimizer steps between two device synchronisations. The table gives the median,
min and max of the per-run step time over the rounds, its spread ((max - min) / median), and the overhead: the
median over rounds of (variant / baseline of the same round), with its min and max.

    python benchmarks/overhead.py                       # CUDA: vit and resnet; CPU: the mlp workload
    python benchmarks/overhead.py --workload resnet --rounds 20
    python benchmarks/overhead.py --sync-check          # host syncs per step of every variant (CUDA)
    python benchmarks/overhead.py --profile distprobe_x1 --workload resnet
    python benchmarks/overhead.py --strategy distprobe_fsdp --variants none,distprobe_x1,distprobe_x8
    python benchmarks/overhead.py --smoke               # tiny CPU form for CI (no assertion on speed)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torchmetrics
from bench_models import WORKLOADS, ParamGroupProbeModule, SSLModule, SyntheticBatches, Workload
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import StrategyRegistry
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

import distprobe.strategies  # noqa: F401 - registers the distprobe_* strategy names
from distprobe.callbacks import OnlineProbe, OnlineProbeBank, OnlineRidge

VARIANTS = ("none", "distprobe_x1", "distprobe_x8", "spt_none", "spt_x1", "spt_x8", "paramgroup")
#: Diagnostic variants, run only when named. nolog: distprobe's probe step and metric update without Lightning's
#: logging. local: probes replicated over each rank's own one-rank group, so a multi-GPU run has no probe collective
#: (the replicas then diverge: for timing only).
DIAGNOSTIC = ("nolog_x1", "nolog_x8", "local_x1", "local_x8")
#: Probe banks, run only when named: bank64 is 16 learning rates x 2 weight decays x (none, BatchNorm), SGD with
#: momentum; bank64plain the same 64 heads without the BatchNorm half (16 lr x 4 wd), at the library's defaults (TF32
#: heads since Session L); bank64tf32 is bank64plain asking ``matmul_precision="high"`` (TF32 logits and weight
#: gradient) by name, bank64ieee asking ``"highest"`` (IEEE float32: the default before Session L).
BANKS = ("distprobe_bank64", "distprobe_bank64plain", "distprobe_bank64tf32", "distprobe_bank64ieee")
#: The precision each bank variant asks for by name (the others take the family's default).
BANK_PRECISION = {"distprobe_bank64tf32": "high", "distprobe_bank64ieee": "highest"}
#: bank64plain with levers of issue 28 applied from outside the library (`bank_levers.LeveredBank`), run only when
#: named: ``+side`` (a side CUDA stream from the forward's end), ``+fused`` (the compiled SGD update), ``+tf32`` (the
#: bank's own ``matmul_precision="high"``; without it the levered bank asks ``"highest"``),
#: ``+all``; several may be joined (``distprobe_bank64plain+side+fused``).
LEVERED = "distprobe_bank64plain+"
#: Issue 27's online closed-form probe, run only when named: an `OnlineRidge` with its default lambdas, float64
#: statistics of the embedding (X^T X, X^T Y) summed on every step, solved at validation.
RIDGE = "distprobe_ridge"
BANK_LRS = [10 ** (-4 + i * 0.25) for i in range(16)]
BASELINE = {"spt_x1": "spt_none", "spt_x8": "spt_none", "spt_bank64": "spt_none"}
#: spt_bank64: stable-pretraining's AutoLinearClassifier with the same 64 heads (16 lr scalings x 4 weight decays),
#: trained as its docs show: inside the Module's forward, its loss added to the backbone's, by the Module's optimizer.
SPT_VARIANTS = {"spt_none", "spt_x1", "spt_x8", "spt_bank64"}
#: A suffix for any distprobe variant: its probes' work on the set's side CUDA stream (the default since Session J);
#: without it the serial path (``DISTPROBE_OVERLAP=0``), as released before.
SIDE = "@side"


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def say(*args: Any) -> None:
    if rank() == 0:
        print(*args, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(Callback):
    """Times steps ``warmup .. warmup + steps - 1`` between two synchronisations; must be the last callback."""

    def __init__(self, warmup: int, steps: int, device: torch.device) -> None:
        self.warmup, self.steps, self.device = warmup, steps, device
        self.t0 = 0.0
        self.seconds_per_step: float | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.warmup:
            sync(self.device)
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.warmup + self.steps - 1:
            sync(self.device)
            self.seconds_per_step = (time.perf_counter() - self.t0) / self.steps


class SyncCounter(Callback):
    """Counts host synchronisations of whole training steps (batch start to the end of the last callback).

    Uses ``torch.cuda.set_sync_debug_mode("warn")``: every synchronising CUDA call issues a warning, which is
    recorded. The first ``skip`` steps are left out (one-time first-batch checks, lazy state).
    """

    def __init__(self, skip: int) -> None:
        self.skip = skip
        self.counts: list[int] = []
        self._recorder: Any = None
        self._records: list[Any] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx < self.skip:
            return
        self._recorder = warnings.catch_warnings(record=True)
        self._records = self._recorder.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._recorder is None:
            return
        torch.cuda.set_sync_debug_mode("default")
        self._recorder.__exit__(None, None, None)
        self._recorder = None
        self.counts.append(sum("synchroniz" in str(w.message) for w in self._records))


class SyncGuard(Callback):
    """Placed before and after the probe callbacks: their ``on_train_batch_end`` runs under sync-debug ``"error"``."""

    def __init__(self, skip: int, opener: SyncGuard | None = None) -> None:
        self.skip, self.opener = skip, opener
        self.previous = 0
        self.checked_steps = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx < self.skip:
            return
        if self.opener is None:
            self.previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
        else:
            torch.cuda.set_sync_debug_mode(self.opener.previous)
            self.opener.checked_steps += 1


class ProfileRange(Callback):
    """Placed before and after the probe callbacks: a profiler range ``probe_hooks`` around their batch-end hooks."""

    def __init__(self, opener: ProfileRange | None = None) -> None:
        self.opener = opener
        self.range: Any = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.opener is None:
            self.range = torch.profiler.record_function("probe_hooks")
            self.range.__enter__()
        elif self.opener.range is not None:
            self.opener.range.__exit__(None, None, None)
            self.opener.range = None


class UnloggedOnlineProbe(OnlineProbe):
    """Diagnostic: the same engine step (train-metric update included), without the ``pl_module.log`` calls.

    Lightning's ``LightningModule.log`` costs Python time on every call (``_ResultCollection.log`` moves the whole
    result metric to the value's device each time); this variant measures how much of the probe's cost that is.
    """

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        features, targets = self._checked_features_and_targets(outputs, batch)
        self.probe.train_step(features, targets)  # the train-metric update is part of the engine step


def distprobe_metrics(num_classes: int) -> dict[str, Any]:
    return {
        "train": {"top1": MulticlassAccuracy(num_classes)},
        "val": {"top1": MulticlassAccuracy(num_classes)},
    }


def spt_metrics(num_classes: int) -> Callable[[], dict[str, Any]]:
    return lambda: {"train": MulticlassAccuracy(num_classes), "val": MulticlassAccuracy(num_classes)}


def probe_count(variant: str) -> int:
    return int(variant.rsplit("_x", 1)[1]) if "_x" in variant else 0


def build_variant(
    variant: str, workload: Workload, device: torch.device, spt: Any
) -> tuple[pl.LightningModule, list[Callback]]:
    """The LightningModule and the probe callbacks of one variant, on a freshly built backbone (same seed)."""
    torch.manual_seed(0)
    with device:
        backbone = workload.make_backbone()
    count = probe_count(variant)
    if variant == "spt_bank64":
        from peers import spt_auto_linear_module

        lr_scaling = [lr / BANK_LRS[8] for lr in BANK_LRS]  # the same 16 rates around the Module's own
        return spt_auto_linear_module(spt, backbone, workload, lr_scaling, [0.0, 1e-5, 1e-4, 1e-3]), []
    if variant in SPT_VARIANTS:
        from peers import spt_callbacks, spt_module

        module = spt_module(spt, backbone, workload.embed_dim)
        metrics = spt_metrics(workload.num_classes)
        return module, spt_callbacks(spt, module, count, workload.embed_dim, workload.num_classes, metrics)
    if variant == "paramgroup":
        return ParamGroupProbeModule(backbone, workload.embed_dim, workload.num_classes), []
    module = SSLModule(backbone, workload.embed_dim)
    if variant == RIDGE:
        ridge = OnlineRidge(
            None,
            "ridge",
            input="embedding",
            target="label",
            num_classes=workload.num_classes,
            in_features=workload.embed_dim,
        )
        return module, [ridge]
    if variant in BANKS or variant.startswith(LEVERED):
        with_bn = variant == "distprobe_bank64"
        bank_cls: Any = OnlineProbeBank
        if variant.startswith(LEVERED):
            from bank_levers import levered_bank

            bank_cls = levered_bank(variant.removeprefix(LEVERED))
        bank = bank_cls(
            None,
            name="bank",
            input="embedding",
            target="label",
            num_classes=workload.num_classes,
            lr=BANK_LRS,
            weight_decay=[0.0, 1e-4] if with_bn else [0.0, 1e-5, 1e-4, 1e-3],
            normalization=[None, "batchnorm"] if with_bn else [None],
            optimizer={"type": "SGD", "momentum": 0.9},
            metrics=("top1", "top5"),
            in_features=workload.embed_dim,
            # A levered bank sets its own from its ``+tf32`` lever (`bank_levers.lever_precision`).
            matmul_precision=BANK_PRECISION.get(variant),
        )
        return module, [bank]
    probe_cls = UnloggedOnlineProbe if variant.startswith("nolog") else OnlineProbe  # local: see make_strategy
    callbacks: list[Callback] = [
        probe_cls(
            None,
            name=f"linear{i}",
            input="embedding",
            target="label",
            probe=nn.Linear(workload.embed_dim, workload.num_classes),
            optimizer={"type": "AdamW", "lr": 1e-3, "weight_decay": 0.0},
            metrics=distprobe_metrics(workload.num_classes),
        )
        for i in range(count)
    ]
    return module, callbacks


def make_strategy(name: str, workload: Workload, variant: str = "none") -> Any:
    """The strategy by name; DeepSpeed's is told the batch size, which it cannot read from a loader of ready batches.

    (Lightning's DeepSpeed reads it from ``train_dataloader.batch_sampler``, which is None with ``batch_size=None``.)
    For the ``local`` variants the probes' group is each rank's own (see DIAGNOSTIC).
    """
    local = variant.startswith("local")
    if name not in StrategyRegistry or not (local or "deepspeed" in name):
        return name
    entry = StrategyRegistry[name]  # the registration, not `.get`, which builds an instance without the batch size
    params = dict(entry["init_params"])
    if "deepspeed" in name:
        params["logging_batch_size_per_gpu"] = workload.batch_size
    cls = entry["strategy"]
    if local:
        cls = type(f"Local{cls.__name__}", (cls,), {"probe_process_group": property(own_rank_group)})
    return cls(**params)


def own_rank_group(strategy: Any) -> Any:
    """This rank's one-rank group, made once (creating subgroups is a collective every rank enters together)."""
    if not hasattr(strategy, "_own_rank_group"):
        strategy._own_rank_group, _ = torch.distributed.new_subgroups(group_size=1)
    return strategy._own_rank_group


def run_variant(
    variant: str,
    workload: Workload,
    args: argparse.Namespace,
    device: torch.device,
    spt: Any,
    extra: Callable[[list[Callback]], tuple[list[Callback], list[Callback], list[Callback]]] | None = None,
) -> tuple[float | None, list[Callback]]:
    """Fit one variant for ``warmup + steps`` steps; return its seconds per timed step and the callbacks used.

    ``extra(probe_callbacks)`` may return callbacks to place before the probes, right after them, and last.
    """
    side = variant.endswith(SIDE)
    variant = variant.removesuffix(SIDE)
    os.environ["DISTPROBE_OVERLAP"] = "1" if side else "0"
    module, probes = build_variant(variant, workload, device, spt)
    timer = StepTimer(workload.warmup, workload.steps, device)
    before: list[Callback] = []
    after: list[Callback] = []
    last: list[Callback] = []
    if extra is not None:
        before, after, last = extra(probes)
    callbacks = [*before, *probes, *after, *last, timer]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    trainer = pl.Trainer(
        accelerator=device.type if device.type == "cpu" else "gpu",
        devices=world,
        strategy=make_strategy(args.strategy, workload, variant),
        precision=args.precision or workload.precision,
        max_steps=workload.warmup + workload.steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        benchmark=device.type == "cuda",
        callbacks=callbacks,
    )
    # An installed stable-pretraining adds its own callbacks to *every* Trainer (a Lightning entry point). They stay in
    # its variants, as its users get them, and are removed from the others; the timer goes back to the end.
    kept = [
        cb
        for cb in trainer.callbacks  # type: ignore[attr-defined]
        if variant in SPT_VARIANTS or not type(cb).__module__.startswith("stable_pretraining")
    ]
    tail = [*last, timer]
    trainer.callbacks = [cb for cb in kept if all(cb is not t for t in tail)] + tail  # type: ignore[attr-defined]
    loader = DataLoader(SyntheticBatches(workload, device), batch_size=None)
    if device.type == "cuda":
        # Peak memory of the whole fit, side stream included (its blocks come from the same allocator): the
        # table's "peak added" is this minus the `none` variant's.
        sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    trainer.fit(module, train_dataloaders=loader)
    if device.type == "cuda":
        PEAK_BYTES.setdefault(variant + (SIDE if side else ""), []).append(torch.cuda.max_memory_allocated(device))
    return timer.seconds_per_step, callbacks


#: Per variant (its name as run, ``@side`` kept), the peak CUDA memory allocated of each fit.
PEAK_BYTES: dict[str, list[int]] = {}


def summarize(times: dict[str, list[float]], variants: list[str]) -> list[dict[str, Any]]:
    rows = []
    for v in variants:
        ts = times[v]
        med = statistics.median(ts)
        row: dict[str, Any] = {
            "variant": v,
            "median_ms": med * 1e3,
            "min_ms": min(ts) * 1e3,
            "max_ms": max(ts) * 1e3,
            "spread": (max(ts) - min(ts)) / med,
            "rounds": len(ts),
        }
        base = BASELINE.get(v, "none")
        if v != base and base in times and len(times[base]) == len(ts):
            ratios = [a / b - 1 for a, b in zip(ts, times[base])]
            row.update(baseline=base, overhead=statistics.median(ratios), ov_min=min(ratios), ov_max=max(ratios))
        if v in SPT_VARIANTS and "none" in times and v != "none" and len(times["none"]) == len(ts):
            ratios = [a / b - 1 for a, b in zip(ts, times["none"])]
            row["vs_plain"] = statistics.median(ratios)
        if PEAK_BYTES.get(v) and PEAK_BYTES.get(base):
            row["peak_gib"] = max(PEAK_BYTES[v]) / 2**30
            row["peak_added_gib"] = (max(PEAK_BYTES[v]) - max(PEAK_BYTES[base])) / 2**30
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| variant | median ms/step | min | max | spread | overhead vs baseline (median [min, max] over rounds) "
        "| baseline | vs plain `none` | peak GiB (added) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error']} | | | | | | | |")
            continue
        peak = f"{r['peak_gib']:.2f} ({r['peak_added_gib']:+.2f})" if "peak_gib" in r else "-"
        ov = (
            f"{r['overhead'] * 100:+.2f}% [{r['ov_min'] * 100:+.2f}%, {r['ov_max'] * 100:+.2f}%]"
            if "overhead" in r
            else "-"
        )
        vs_plain = f"{r['vs_plain'] * 100:+.2f}%" if "vs_plain" in r else "-"
        lines.append(
            f"| {r['variant']} | {r['median_ms']:.3f} | {r['min_ms']:.3f} | {r['max_ms']:.3f} | "
            f"{r['spread'] * 100:.1f}% | {ov} | {r.get('baseline', '-')} | {vs_plain} | {peak} |"
        )
    return "\n".join(lines)


def time_workload(
    workload: Workload, variants: list[str], args: argparse.Namespace, device: torch.device, spt: Any
) -> list[dict[str, Any]]:
    times: dict[str, list[float]] = {v: [] for v in variants}
    failed: dict[str, str] = {}
    for r in range(workload.rounds):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for v in order:
            if v in failed:
                continue
            try:
                seconds, _ = run_variant(v, workload, args, device, spt)
            except Exception as err:  # noqa: BLE001 - a variant that cannot run is reported, the others go on
                failed[v] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                say(f"  {v} failed: {failed[v]}")
                continue
            assert seconds is not None, f"variant {v} did not reach its last timed step"
            times[v].append(seconds)
        say(
            f"  round {r + 1}/{workload.rounds}: "
            + ", ".join(f"{v} {times[v][-1] * 1e3:.2f}" for v in times if times[v])
        )
    ran = [v for v in variants if v not in failed]
    rows = summarize(times, ran)
    rows += [{"variant": v, "error": e} for v, e in failed.items()]
    return rows


def sync_check(workload: Workload, variants: list[str], args: argparse.Namespace, device: torch.device, spt: Any):
    """Host syncs per step of every variant; distprobe's probe hooks also run under sync-debug ``"error"``."""
    skip = 2
    rows = []
    for v in variants:
        counter = SyncCounter(skip)
        guard_open = SyncGuard(skip)
        guard_close = SyncGuard(skip, opener=guard_open)

        def extra(probes, v=v, counter=counter, guard_open=guard_open, guard_close=guard_close):
            guards = v.startswith(("distprobe", "nolog", "local")) and probes
            return ([guard_open] if guards else []), ([guard_close] if guards else []), [counter]

        error = None
        try:
            run_variant(v, replace(workload, warmup=skip, steps=4), args, device, spt, extra)
        except RuntimeError as err:
            error = str(err).splitlines()[0]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        rows.append(
            {
                "variant": v,
                "syncs_per_step": counter.counts,
                "probe_hooks_checked_steps": guard_open.checked_steps if v.startswith("distprobe") else None,
                "error": error,
            }
        )
    return rows


def profile_variant(workload: Workload, variant: str, args: argparse.Namespace, device: torch.device, spt: Any):
    """Profile the timed steps of one variant; print the top entries and the CPU time of the probe hooks."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=activities)

    class Window(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == workload.warmup:
                prof.__enter__()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == workload.warmup + workload.steps - 1:
                sync(device)
                prof.__exit__(None, None, None)

    def extra(probes):
        opener = ProfileRange()
        return [opener], [ProfileRange(opener)], [Window()]

    seconds, _ = run_variant(variant, workload, args, device, spt, extra)
    averages = prof.key_averages()
    steps = workload.steps

    def device_time(e: Any) -> float:
        return getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0))

    hooks = [e for e in averages if e.key == "probe_hooks"]
    hook_cpu_ms = hooks[0].cpu_time_total / 1e3 / steps if hooks else 0.0
    # Kernels only: user ranges (probe_hooks, Optimizer.step#...) also carry a device time, spanning their kernels.
    kernels = [e for e in averages if e.key != "probe_hooks" and not e.key.startswith(("Optimizer.", "aten::"))]
    busy_ms = sum(device_time(e) for e in kernels) / 1e3 / steps
    say(f"\n### profile of {variant} on {workload.name}")
    say(
        f"wall {seconds * 1e3 if seconds else float('nan'):.3f} ms/step (profiled), device busy {busy_ms:.3f} ms/step, "
        f"CPU time inside the probe callbacks' on_train_batch_end {hook_cpu_ms:.3f} ms/step"
    )
    say("top entries by self CPU time:")
    say(averages.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))
    if device.type == "cuda":
        say("top entries by self device time:")
        say(averages.table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60))
    return {
        "variant": variant,
        "wall_ms": seconds * 1e3 if seconds else None,
        "busy_ms": busy_ms,
        "hook_ms": hook_cpu_ms,
    }


def environment(device: torch.device, spt_status: Any) -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "torchmetrics": torchmetrics.__version__,
        "stable_pretraining": spt_status,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", help=f"comma-separated, from {list(WORKLOADS)}")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {list(VARIANTS)}")
    p.add_argument("--rounds", type=int)
    p.add_argument("--steps", type=int, help="timed steps per run")
    p.add_argument("--warmup", type=int)
    p.add_argument("--precision", help="overrides the workload's (bf16-mixed, 16-mixed, 32-true)")
    p.add_argument("--strategy", default="auto", help="a Lightning strategy name, e.g. distprobe_fsdp")
    p.add_argument("--sync-check", action="store_true", help="count host syncs per step instead of timing (CUDA)")
    p.add_argument("--profile", help="comma-separated variants to profile instead of timing")
    p.add_argument("--smoke", action="store_true", help="tiny CPU form for CI: every variant once, a few steps")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
    warnings.filterwarnings("ignore", message=".*log\\('.*'\\) called.*")
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    names = (args.workload or ("tiny" if args.smoke else "vit,resnet" if cuda else "mlp")).split(",")
    variants = [v for v in args.variants.split(",") if v]
    known = VARIANTS + DIAGNOSTIC + BANKS + ("spt_bank64", RIDGE)
    unknown = [v for v in variants if v.removesuffix(SIDE) not in known and not v.startswith(LEVERED)]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; valid: {list(known)}")
    local = [v for v in variants if v.startswith("local")]
    if local and args.strategy not in StrategyRegistry:
        raise SystemExit(
            f"variants {local} replace the probes' group of a registered strategy; got --strategy {args.strategy!r}. "
            "Pass one such as --strategy distprobe_ddp."
        )

    # Imported whenever it is installed, even for distprobe-only runs: its Lightning entry point loads its callbacks
    # (and their imports) into every Trainer, so the stand-ins must be in place first.
    from peers import import_stable_pretraining

    spt, detail = import_stable_pretraining()
    spt_status: Any
    if spt is None:
        spt_status = f"skipped: {detail}"
        variants = [v for v in variants if v not in SPT_VARIANTS]
    else:
        spt_status = {"version": spt.__version__, "stood_in_modules": detail}
    env = environment(device, spt_status)
    say("## environment")
    for k, v in env.items():
        say(f"- {k}: {v}")
    say(f"- strategy: {args.strategy}; variants: {variants}")

    results: dict[str, Any] = {"environment": env, "args": vars(args) | {"json": str(args.json)}, "workloads": {}}
    for name in names:
        workload = WORKLOADS[name]
        overrides = {k: getattr(args, k) for k in ("rounds", "steps", "warmup") if getattr(args, k) is not None}
        workload = replace(workload, **overrides)
        precision = args.precision or workload.precision
        say(f"\n## {workload.name}, {precision}, strategy {args.strategy}")
        if args.sync_check:
            rows = sync_check(workload, variants, args, device, spt)
            say("| variant | host syncs per step (whole step, steps 3-6) | probe hooks under sync-debug 'error' |")
            say("|---|---|---|")
            for r in rows:
                guard = (
                    f"{r['probe_hooks_checked_steps']} steps, no sync"
                    if r["probe_hooks_checked_steps"] and not r["error"]
                    else (r["error"] or "-")
                )
                say(f"| {r['variant']} | {r['syncs_per_step']} | {guard} |")
        elif args.profile:
            rows = [profile_variant(workload, v, args, device, spt) for v in args.profile.split(",")]
        else:
            say(f"{workload.rounds} rounds x {workload.steps} timed steps (after {workload.warmup} warm-up steps)")
            rows = time_workload(workload, variants, args, device, spt)
            say("")
            say(markdown(rows))
        results["workloads"][name] = {"precision": precision, "rows": rows}
    if args.json and rank() == 0:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    if torch.distributed.is_initialized():
        # Under torchrun the Trainers leave the process group up; tearing it down at interpreter exit instead
        # sometimes aborts a gloo rank ("terminate called without an active exception") after a successful run.
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
