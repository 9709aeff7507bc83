"""Attentive and dense head families beside a training step: overhead, memory and host syncs (issues 25 and 26).

    python benchmarks/head_families.py --workload attentive          # ViT-B/16 b128 bf16 + 16 attentive heads (CUDA)
    python benchmarks/head_families.py --workload dense              # ViT-B/16 b128 bf16 + a 16-head dense bank
    python benchmarks/head_families.py --workload dense-epoch        # the service's full-resolution epoch, 512 px
    python benchmarks/head_families.py --workload attentive,dense,dense-epoch --json out.json
    python benchmarks/head_families.py --workload attentive --smoke  # tiny CPU form: every variant once

A plain-torch training loop (no Lightning: the heads' own cost, not an adapter's) runs a ViT-B/16's bf16 autocast
forward, a stand-in SSL loss on its class token, backward and AdamW, then the probe work on the detached tokens in
the same step. Variants run in rotated order every round, each from a fresh backbone; a variant's overhead is the
median over rounds of (variant / ``none`` of the same round) - 1, its time added the median of the differences, its
memory added its peak ``max_memory_allocated`` minus ``none``'s.

Every ``ProbeSet`` is built with ``overlap=False`` (the probe work on the training's stream, after its step) unless
the variant ends in ``@side``: then with ``overlap=True``, and the loop calls ``probes.mark()`` right after the
backbone's forward, so the probes' kernels can overlap its backward and optimizer step (`ProbeSet.mark`).

``attentive`` (issue 25): tokens ``(128, 197, 768)``, 1000 classes, 16 heads (4 lr x 4 weight decays, AdamW, the
head's defaults: one query, one cross-attention block, 12 attention heads, MLP ratio 4):

- ``none``: no probe;
- ``bank16``: one attentive bank (``ProbeSet`` bank, ``family="attentive"``);
- ``probes16``: 16 separate `AttentiveProbe` modules in a ``ProbeSet`` (what 16 ``OnlineProbe``s run: the engine's
  ``ProbeGroup``, one optimizer per probe);
- ``bare16``: the floor: the same 16 heads as stacked parameters through ``torch.func.vmap`` of one head's
  ``functional_call``, ``torch.optim.AdamW(fused=True)`` with a parameter group per head; no bad-data checks, no
  metrics;
- ``bank16-bf16``, ``probes16-bf16``, ``bare16-bf16``: the same three with ``compute_dtype="bfloat16"`` (the heads'
  matmuls and attention under bf16 autocast, as V-JEPA's probe evaluation runs; float32 parameters and optimizer),
  the bare loop's forward under the same autocast;
- ``bank16@side``, ``probes16@side``, ``bank16-bf16@side``, ``probes16-bf16@side`` (not run by default): on the side
  stream.

``dense`` (issue 26): patch tokens ``(128, 196, 768)`` (grid 14 x 14), 150 classes, ``(128, 224, 224)`` int64
masks with ignored pixels (255); ``dense16`` is a 16-head dense bank at the library's online default
``head_options`` (printed; ``samples_per_step=8``, ``loss_grid_scale=4``), ``dense16@side`` the same on the side
stream; ``dense16-s32`` the same with ``samples_per_step=32`` (docs/dense.md's example); not run by default:
``dense16-s16`` (``samples_per_step=16``, the default before 2026-12-07), ``dense16-s8`` (``samples_per_step=8``
given explicitly: the same bank as ``dense16`` now, kept for the command lines that name it), ``dense16-s32-c1``
also with ``loss_chunk_heads=1``, ``dense16-custom`` with ``--dense-options``, ``dense16-tf32`` and
``dense16-s8-tf32`` (the same two banks) with the bank's ``matmul_precision="high"`` (TF32 matmuls), and any of them
with ``@side``. Each prints its loss's peak memory by `DenseOptions.loss_cost` (docs/dense.md, "Cost control").

``dense-epoch`` (issue 26): no backbone (the service trains on cached features): synthetic ViT-B/16 patch tokens at
512 px (32 x 32 x 768) and 512 x 512 masks are made on the device, and a 16-head dense bank with the service's
``head_options`` (`FULL_RESOLUTION`: every sample, the loss at the masks' resolution) trains one epoch of
``--images`` images, timed over ``--epoch-steps`` of its steps (0: all) and extrapolated, at each
``--epoch-batch``: 256 (the service's default ``probes.batch_size``; chunks of 3 heads x 1 sample, 7.0 GiB by
`DenseOptions.loss_cost`) and 16 (DINOv3's linear segmentation batch).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import math
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from bench_models import ViT
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from distprobe.bank import BankConfig, ProbeBank
from distprobe.bank.families.attentive import AttentiveProbe
from distprobe.bank.families.dense import FULL_RESOLUTION, DenseOptions
from distprobe.engine import ProbeConfig
from distprobe.loop import ProbeSet

LRS = [1e-4, 3e-4, 1e-3, 3e-3]
WDS = [0.0, 1e-4, 1e-2, 5e-2]
GRID = [(lr, wd) for lr in LRS for wd in WDS]
"""The 16 heads' (lr, weight decay), in a bank's order (lr-major)."""
OPTIMIZER = {"type": "AdamW"}
SIDE = "@side"
"""A suffix of a variant in a ``ProbeSet``: built with ``overlap=True``, marked after the backbone's forward."""
BF16 = "-bf16"
"""A suffix of an attentive variant: ``compute_dtype="bfloat16"``."""
ATTENTIVE_VARIANTS = ("none", "bank16", "probes16", "bare16", "bank16-bf16", "probes16-bf16", "bare16-bf16")
"""The default attentive variants."""
ATTENTIVE_VALID = (
    *ATTENTIVE_VARIANTS,
    *(f"{v}{SIDE}" for v in ("bank16", "probes16", "bank16-bf16", "probes16-bf16")),
)
DENSE_VARIANTS = ("none", "dense16", f"dense16{SIDE}", "dense16-s32")
"""The default dense variants."""
DENSE_OPTIONS: dict[str, dict[str, Any]] = {
    "dense16": {},  # the library's defaults
    "dense16-s32": {"samples_per_step": 32},  # docs/dense.md's example
    "dense16-s16": {"samples_per_step": 16},  # the default before 2026-12-07 (+4.4% on an H100, docs/dense.md)
    "dense16-s8": {"samples_per_step": 8},  # the default's share given explicitly: the same bank as dense16
    "dense16-s32-c1": {"samples_per_step": 32, "loss_chunk_heads": 1},  # chunks of one head: the least memory
    "dense16-custom": {},  # --dense-options
    "dense16-tf32": {},  # the defaults, the heads' matmuls in TF32 (matmul_precision="high")
    "dense16-s8-tf32": {"samples_per_step": 8},  # the same bank as dense16-tf32
}


def say(*args: Any) -> None:
    print(*args, flush=True)


@dataclass(frozen=True)
class Shapes:
    """The backbone and the probe targets of one form (full or smoke)."""

    image: int = 224
    patch: int = 16
    dim: int = 768
    depth: int = 12
    heads: int = 12
    batch: int = 128
    attentive_classes: int = 1000
    dense_classes: int = 150
    epoch_image: int = 512
    """dense-epoch: the image size (its grid is ``epoch_image // patch``)."""
    epoch_batches: tuple[int, ...] = (256, 16)
    """dense-epoch: the service's default ``probes.batch_size``, then DINOv3's linear head's batch."""
    epoch_images: int = 20_000

    @property
    def grid(self) -> int:
        return self.image // self.patch


FULL = Shapes()
SMOKE = Shapes(
    image=32,
    patch=8,
    dim=64,
    depth=2,
    heads=2,
    batch=4,
    attentive_classes=10,
    dense_classes=5,
    epoch_image=64,
    epoch_batches=(4,),
    epoch_images=16,
)


class TokenViT(ViT):
    """`bench_models.ViT` returning every normalised token ``(B, 1 + N, D)`` (CLS first), not the class token alone."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def masks(
    batch: int, size: int, classes: int, generator: torch.Generator, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``(B, size, size)`` int64 masks: blocks of classes, about 10% of the pixels ignored (255)."""
    coarse = torch.randint(0, classes, (batch, 1, size // 8, size // 8), generator=generator, device=device)
    out = F.interpolate(coarse.float(), size=(size, size), mode="nearest")[:, 0].long()
    out[torch.rand(out.shape, generator=generator, device=device) < 0.1] = 255
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- the probe work of each variant ----------------------------------------------------------------------------------


class BareAttentive:
    """The floor: K attentive heads with stacked parameters, one vmapped forward, fused AdamW, nothing else.

    Each head's tensors stay leaves of their own (a parameter group per head carries its lr and weight decay);
    the forward stacks them (one copy of the heads' weights per step) and runs one head's ``functional_call``
    under ``torch.func.vmap`` over the head dimension, the tokens shared.
    """

    def __init__(self, dim: int, classes: int, device: torch.device, bf16: bool) -> None:
        # bf16: the stacked weights and the tokens are cast to bf16 and the heads run in bf16 (the logits' loss in
        # float32), not under autocast: under autocast the backward of the vmapped math attention fails on CUDA with
        # torch 2.11 ("expected input and grad types to match", Session J). Autocast would keep LayerNorm and
        # softmax in float32; as a floor, bf16 throughout is, if anything, cheaper.
        self.compute_dtype = torch.bfloat16 if bf16 else torch.float32
        g = torch.Generator().manual_seed(0)
        self.heads = [AttentiveProbe(dim, classes, generator=g).to(device) for _ in GRID]
        self.base = copy.deepcopy(self.heads[0]).to("meta")
        self.names = [n for n, _ in self.heads[0].named_parameters()]
        groups = [
            {"params": list(h.parameters()), "lr": lr, "weight_decay": wd} for h, (lr, wd) in zip(self.heads, GRID)
        ]
        self.opt = torch.optim.AdamW(
            groups, fused=device.type == "cuda", foreach=None if device.type == "cuda" else True
        )

        def one(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(self.base, params, (x,))

        self.forward = torch.func.vmap(one, in_dims=(0, None))

    def step(self, tokens: torch.Tensor, labels: torch.Tensor) -> None:
        dtype = self.compute_dtype
        stacked = (torch.stack(ps).to(dtype) for ps in zip(*(h.parameters() for h in self.heads)))
        params = dict(zip(self.names, stacked))
        # The math attention: vmap batches its matmuls over the heads, where a fused kernel without a batching rule
        # would fall back to a loop over the heads (CPU flash attention has none). One query: its cost is small.
        with sdpa_kernel([SDPBackend.MATH]):
            logits = self.forward(params, tokens.to(dtype)).float()  # (K, B, C), the loss in float32
        k, b, c = logits.shape
        loss = F.cross_entropy(logits.reshape(k * b, c), labels.repeat(k), reduction="none").view(k, b).mean(1).sum()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class InSet:
    """Probes or a bank in a `ProbeSet`, fed the detached tokens (what a torchrun user's loop runs).

    ``side``: the set runs on its side stream, and `after_forward` marks where the features are ready.
    """

    def __init__(
        self,
        device: torch.device,
        side: bool,
        specs: list[ProbeConfig] | None = None,
        banks: list[BankConfig] | None = None,
    ) -> None:
        self.probes = ProbeSet.build(specs or [], banks=banks or [], device=device, overlap=side)
        self.after_forward = self.probes.mark if side else None

    def step(self, tokens: torch.Tensor, targets: torch.Tensor) -> None:
        self.probes.step(tokens, targets)


def make_prober(variant: str, shapes: Shapes, device: torch.device) -> Any:
    """The probe work of ``variant``: an object with ``step(features, targets)``, or None for ``none``."""
    d = shapes.dim
    name, side = variant.removesuffix(SIDE), variant.endswith(SIDE)
    name, bf16 = name.removesuffix(BF16), name.endswith(BF16)
    attentive_options = {"compute_dtype": "bfloat16"} if bf16 else {}
    if name == "none":
        return None
    if name == "bank16":
        bank = BankConfig(
            name="bank",
            family="attentive",
            inputs=["tokens"],
            num_classes=shapes.attentive_classes,
            lr=LRS,
            weight_decay=WDS,
            optimizer=OPTIMIZER,
            in_features=d,
            head_options=attentive_options,
        )
        return InSet(device, side, banks=[bank])
    if name == "probes16":
        g = torch.Generator().manual_seed(0)
        specs = [
            ProbeConfig(
                name=f"attentive{i}",
                probe=AttentiveProbe(d, shapes.attentive_classes, attentive_options, generator=g),
                optimizer={**OPTIMIZER, "lr": lr, "weight_decay": wd},
            )
            for i, (lr, wd) in enumerate(GRID)
        ]
        return InSet(device, side, specs=specs)
    if name == "bare16":
        return BareAttentive(d, shapes.attentive_classes, device, bf16)
    if name in DENSE_OPTIONS:
        bank = BankConfig(
            name="seg",
            family="dense",
            inputs=["patch"],
            num_classes=shapes.dense_classes,
            lr=LRS,
            weight_decay=WDS,
            optimizer=OPTIMIZER,
            in_features=d,
            head_options=DENSE_OPTIONS[name],
            matmul_precision="high" if name.endswith("-tf32") else None,
        )
        return InSet(device, side, banks=[bank])
    raise AssertionError(f"variant {variant!r} was not checked by chosen()")


# --- the training step -----------------------------------------------------------------------------------------------


class Trainer:
    """The backbone's step in plain torch (bf16 autocast forward, stand-in SSL loss, backward, AdamW), then the probe
    work on the detached tokens: all of them (attentive) or the patch tokens with masks (dense)."""

    def __init__(self, workload: str, shapes: Shapes, device: torch.device) -> None:
        torch.manual_seed(0)
        with device:
            self.backbone = TokenViT(shapes.image, shapes.patch, shapes.dim, shapes.depth, shapes.heads)
            self.projector = nn.Linear(shapes.dim, 256)
        params = [*self.backbone.parameters(), *self.projector.parameters()]
        self.opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)
        g = torch.Generator().manual_seed(0)
        dense = workload == "dense"
        self.batches = [
            (
                torch.randn(shapes.batch, 3, shapes.image, shapes.image, generator=g).to(device),
                (
                    masks(shapes.batch, shapes.image, shapes.dense_classes, g)
                    if dense
                    else torch.randint(0, shapes.attentive_classes, (shapes.batch,), generator=g)
                ).to(device),
            )
            for _ in range(4)
        ]
        self.dense = dense
        self.device = device
        self.i = 0

    def backbone_step(self, after_forward: Callable[[], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.batches[self.i % len(self.batches)]
        self.i += 1
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            tokens = self.backbone(x)
            loss = self.projector(tokens[:, 0]).float().pow(2).mean()
        if after_forward is not None:  # a side stream's mark: the features are ready, the backward not queued yet
            after_forward()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        tokens = tokens.detach()
        return (tokens[:, 1:] if self.dense else tokens), y

    def step(self, prober: Any) -> None:
        features, targets = self.backbone_step(getattr(prober, "after_forward", None))
        if prober is not None:
            prober.step(features, targets)


class Clock:
    """Milliseconds of the work between `start` and `stop`: CUDA events on a GPU, else the host's clock."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def start(self) -> None:
        sync(self.device)
        if self.device.type == "cuda":
            self.begin, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.begin.record()
        self.t0 = time.perf_counter()

    def stop(self) -> float:
        if self.device.type == "cuda":
            self.end.record()
            sync(self.device)
            return self.begin.elapsed_time(self.end)
        return (time.perf_counter() - self.t0) * 1e3


def time_steps(
    step: Callable[[int], None],
    warmup: int,
    steps: int,
    device: torch.device,
    finish: Callable[[], None] = lambda: None,
) -> float:
    """Milliseconds per ``step(i)`` over ``steps`` calls after ``warmup`` untimed ones (``finish`` after each part)."""
    for i in range(warmup):
        step(i)
    finish()
    clock = Clock(device)
    clock.start()
    for i in range(steps):
        step(i)
    finish()
    return clock.stop() / steps


def failure(err: BaseException) -> str:
    """One line for a failed run (out of memory, or anything else with its traceback on stderr)."""
    if not isinstance(err, torch.cuda.OutOfMemoryError):
        traceback.print_exc()
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]


def fresh_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def run_once(
    workload: str, variant: str, shapes: Shapes, args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    """One variant from a fresh backbone: ms/step over ``--steps`` after ``--warmup``, and its peak memory."""
    fresh_memory(device)
    if device.type == "cuda" and torch.cuda.memory_allocated(device) > 2**28:
        # Left over by an earlier run: it would count in this run's peak.
        say(f"  warning: {torch.cuda.memory_allocated(device) / 2**30:.2f} GiB still allocated before {variant}")
    try:
        trainer = Trainer(workload, shapes, device)
        prober = make_prober(variant, shapes, device)
        ms = time_steps(lambda _: trainer.step(prober), args.warmup, args.steps, device)
        return {"ms": ms, "peak_gib": peak_gib(device)}
    except Exception as err:  # noqa: BLE001  (one failed variant must not cost the GPU run the others)
        return {"ms": math.nan, "peak_gib": peak_gib(device), "error": failure(err)}
    finally:
        trainer = prober = None  # type: ignore[assignment]
        fresh_memory(device)


def host_syncs(step: Callable[[], None], device: torch.device, steps: int = 3) -> dict[str, Any]:
    """Host syncs of ``step`` under ``torch.cuda.set_sync_debug_mode("warn")``, counted (never raised)."""
    if device.type != "cuda":
        return {"count": None, "note": "CPU: no sync debug mode"}
    sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    found = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    # Other warnings of the step, such as a vmap fallback ("performance drop"): each one once.
    other = sorted({str(w.message).splitlines()[0][:160] for w in caught if "synchroniz" not in str(w.message)})
    return {"count": len(found), "steps": steps, "first": found[0] if found else None, "other_warnings": other}


def sync_check(workload: str, variant: str, shapes: Shapes, args: argparse.Namespace, device: torch.device) -> Any:
    """The probe work alone of ``variant`` (not the backbone's step) under the sync debug mode, after a warm-up."""
    fresh_memory(device)
    try:
        trainer = Trainer(workload, shapes, device)
        prober = make_prober(variant, shapes, device)
        for _ in range(2):  # the first batch's checks sync once, by design
            trainer.step(prober)
        features, targets = trainer.backbone_step(getattr(prober, "after_forward", None))
        return host_syncs(lambda: prober.step(features, targets), device)
    except Exception as err:  # noqa: BLE001
        return {"count": None, "note": failure(err)}
    finally:
        trainer = prober = None  # type: ignore[assignment]
        fresh_memory(device)


def median_of(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def time_variants(
    workload: str, variants: list[str], shapes: Shapes, args: argparse.Namespace, device: torch.device
) -> dict[str, dict[str, Any]]:
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    failed: set[str] = set()
    for r in range(args.rounds):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for v in order:
            if v in failed:  # an out-of-memory variant is not retried: it would fail again, at a cost
                runs[v].append({"ms": math.nan, "peak_gib": None, "error": runs[v][-1]["error"]})
                continue
            runs[v].append(run_once(workload, v, shapes, args, device))
            if "error" in runs[v][-1]:
                failed.add(v)
                say(f"  {v}: {runs[v][-1]['error']}")
        say(f"round {r + 1}: " + ", ".join(f"{v} {runs[v][-1]['ms']:.2f} ms" for v in variants))
    rows: dict[str, dict[str, Any]] = {}
    base = runs.get("none")
    for v in variants:
        ms = [run["ms"] for run in runs[v]]
        peaks = [run["peak_gib"] for run in runs[v] if run["peak_gib"] is not None and "error" not in run]
        row: dict[str, Any] = {"ms_per_step": median_of(ms), "ms_rounds": ms, "peak_gib": max(peaks) if peaks else None}
        if base is not None:
            ratios = [t / b["ms"] - 1 for t, b in zip(ms, base, strict=True)]
            added = [t - b["ms"] for t, b in zip(ms, base, strict=True)]
            row.update(overhead=median_of(ratios), overhead_rounds=ratios, ms_added=median_of(added))
            base_peaks = [b["peak_gib"] for b in base if b["peak_gib"] is not None]
            if peaks and base_peaks:
                row["peak_added_gib"] = max(peaks) - max(base_peaks)
        if any("error" in run for run in runs[v]):
            row["error"] = next(run["error"] for run in runs[v] if "error" in run)
        rows[v] = row
    return rows


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:{spec}}{suffix}"


def print_table(rows: dict[str, dict[str, Any]]) -> None:
    say("| variant | ms/step | overhead vs none [min, max] | ms added | peak GiB | peak added GiB |")
    say("|---|---|---|---|---|---|")
    for v, row in rows.items():
        spread = [o for o in row.get("overhead_rounds", []) if math.isfinite(o)]
        span = f" [{min(spread) * 100:+.1f}, {max(spread) * 100:+.1f}]" if spread else ""
        overhead = fmt(row.get("overhead", math.nan) * 100, "+.2f", "%") + span
        peak_added = fmt(row.get("peak_added_gib"), "+.2f")
        cells = [
            fmt(row["ms_per_step"], ".2f"),
            overhead,
            fmt(row.get("ms_added"), "+.2f"),
            fmt(row["peak_gib"], ".2f"),
        ]
        say(f"| {v} | " + " | ".join([*cells, peak_added]) + (f" ({row['error']})" if "error" in row else "") + " |")


def check(name: str, value: float | None, limit: float | None, text: str) -> dict[str, Any]:
    ok = (
        None
        if value is None or limit is None or not (math.isfinite(value) and math.isfinite(limit))
        else value <= limit
    )
    verdict = {None: "n/a", True: "PASS", False: "FAIL"}[ok]
    say(f"check {name}: {text}: {fmt(value, '.4g')} <= {fmt(limit, '.4g')}: {verdict}")
    return {"value": value, "limit": limit, "pass": ok}


# --- the workloads ---------------------------------------------------------------------------------------------------


def chosen(args: argparse.Namespace, default: tuple[str, ...], valid: tuple[str, ...]) -> list[str]:
    """``--variants`` (else ``default``), refused before any run when one is not of this workload."""
    variants = args.variants.split(",") if args.variants else list(default)
    unknown = [v for v in variants if v not in valid]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown} for workload {args.workload!r}; valid: {list(valid)}")
    return variants


def attentive(shapes: Shapes, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    variants = chosen(args, ATTENTIVE_VARIANTS, ATTENTIVE_VALID)
    say(
        f"tokens ({shapes.batch}, {shapes.grid**2 + 1}, {shapes.dim}), {shapes.attentive_classes} classes, "
        f"16 heads: lr {LRS} x wd {WDS}, AdamW, head defaults (num_queries=1, depth=1, num_heads=D//64, mlp_ratio=4)"
    )
    rows = time_variants("attentive", variants, shapes, args, device)
    print_table(rows)
    out: dict[str, Any] = {"rows": rows, "checks": {}}
    for suffix in ("", BF16):  # like with like: float32 heads against float32 ones, bf16 against bf16
        bank, probes, bare = (f"{v}{suffix}" for v in ("bank16", "probes16", "bare16"))
        if {"none", bank, probes} <= set(rows):
            out["checks"][f"bank_vs_probes{suffix}"] = check(
                f"{bank} vs {probes}",
                rows[bank]["overhead"],
                rows[probes]["overhead"] / 3,
                "bank overhead <= 1/3 of 16 separate probes' overhead",
            )
        if {"none", bank, bare} <= set(rows):
            out["checks"][f"bank_vs_bare{suffix}"] = check(
                f"{bank} vs {bare}",
                rows[bank]["ms_added"],
                rows[bare]["ms_added"] * 1.25,
                "bank ms added <= 1.25 x the bare fused loop's ms added",
            )
    out["host_syncs"] = {v: sync_check("attentive", v, shapes, args, device) for v in variants if v != "none"}
    for v, found in out["host_syncs"].items():
        say(f"host syncs of {v}'s step (sync debug 'warn'): {json.dumps(found)}")
    return out


def loss_gib(options: DenseOptions, batch: int, classes: int, grid: int, image: int) -> float:
    """The loss's peak memory of a 16-head step on ``batch`` samples by `DenseOptions.loss_cost` (docs/dense.md)."""
    return options.loss_cost(len(GRID), batch, classes, (grid, grid), (image, image)).peak_bytes / 2**30


def dense(shapes: Shapes, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    variants = chosen(args, DENSE_VARIANTS, ("none", *DENSE_OPTIONS, *(f"{v}{SIDE}" for v in DENSE_OPTIONS)))
    defaults = dataclasses.asdict(DenseOptions())
    say(
        f"patch tokens ({shapes.batch}, {shapes.grid**2}, {shapes.dim}) grid {shapes.grid}x{shapes.grid}, "
        f"{shapes.dense_classes} classes, masks ({shapes.batch}, {shapes.image}, {shapes.image}) with ~10% ignored; "
        f"16 heads lr {LRS} x wd {WDS}, AdamW; default head_options {defaults}"
    )
    estimates = {}
    for v in (v for v in variants if v != "none"):
        head_options = DENSE_OPTIONS[v.removesuffix(SIDE)]
        options = DenseOptions.parse(head_options, "seg")
        estimates[v] = loss_gib(options, shapes.batch, shapes.dense_classes, shapes.grid, shapes.image)
        say(f"{v}: head_options {head_options}, loss memory by DenseOptions.loss_cost {estimates[v]:.3g} GiB")
    rows = time_variants("dense", variants, shapes, args, device)
    print_table(rows)
    out: dict[str, Any] = {
        "default_head_options": defaults,
        "variant_head_options": {v: DENSE_OPTIONS[v.removesuffix(SIDE)] for v in variants if v != "none"},
        "loss_gib_estimate": estimates,
        "rows": rows,
    }
    out["checks"] = {}
    for suffix in ("", SIDE):
        v = f"dense16{suffix}"
        if v in rows and "none" in rows:
            out["checks"][f"overhead{suffix}"] = check(
                f"{v} overhead", rows[v].get("overhead"), 0.03, "step overhead <= +3%"
            )
            out["checks"][f"memory{suffix}"] = check(
                f"{v} memory", rows[v].get("peak_added_gib"), 4.0, "peak memory added <= 4 GiB"
            )
    out["host_syncs"] = {v: sync_check("dense", v, shapes, args, device) for v in variants if v != "none"}
    for v, found in out["host_syncs"].items():
        say(f"host syncs of {v}'s step (sync debug 'warn'): {json.dumps(found)}")
    return out


def dense_epoch(shapes: Shapes, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """One epoch of a 16-head dense bank at full resolution on synthetic cached features, per batch size."""
    batches = [int(b) for b in args.epoch_batch.split(",")] if args.epoch_batch else list(shapes.epoch_batches)
    runs = {str(batch): epoch_run(batch, shapes, args, device) for batch in batches}
    return {"runs": runs}


def epoch_run(batch: int, shapes: Shapes, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """An epoch of ``--images`` at batch size ``batch`` (timed over ``--epoch-steps`` of it), with no backbone."""
    images = args.images or shapes.epoch_images
    grid, size = shapes.epoch_image // shapes.patch, shapes.epoch_image
    steps_per_epoch = images // batch  # the service drops the last partial batch
    timed = steps_per_epoch if not args.epoch_steps else min(args.epoch_steps, steps_per_epoch)
    # The service's protocol (not the online defaults): every sample, the loss at the masks' resolution.
    options = dict(FULL_RESOLUTION)
    if args.loss_chunk_heads is not None:
        options["loss_chunk_heads"] = args.loss_chunk_heads
    parsed = DenseOptions.parse(options, "seg")
    out: dict[str, Any] = {
        "images": images,
        "batch": batch,
        "image_px": size,
        "grid": grid,
        "steps_per_epoch": steps_per_epoch,
        "timed_steps": timed,
        "head_options": dataclasses.asdict(parsed),
        "loss_gib_estimate": loss_gib(parsed, batch, shapes.dense_classes, grid, size),
    }
    say(
        f"{images} images of {size} px: patch tokens ({batch}, {grid * grid}, {shapes.dim}), masks ({batch}, {size}, "
        f"{size}), {shapes.dense_classes} classes, 16 heads, batch {batch}: {steps_per_epoch} steps per epoch "
        f"({timed} timed); head_options {out['head_options']}; loss memory by DenseOptions.loss_cost "
        f"{out['loss_gib_estimate']:.3g} GiB"
    )
    fresh_memory(device)
    # Any: both are None again in `finally` (their memory freed before the next batch size), never inside `try`.
    cache: Any = None
    bank: Any = None
    try:
        if steps_per_epoch < 1:
            raise ValueError(f"--images {images} is fewer than one batch of {batch}")
        g = torch.Generator(device=device).manual_seed(0)
        cache = [
            (
                torch.randn(batch, grid * grid, shapes.dim, generator=g, device=device),
                masks(batch, size, shapes.dense_classes, g, device),
            )
            for _ in range(4)
        ]
        bank = ProbeBank.build(
            BankConfig(
                name="seg",
                family="dense",
                inputs=["patch"],
                num_classes=shapes.dense_classes,
                lr=LRS,
                weight_decay=WDS,
                optimizer=OPTIMIZER,
                in_features=shapes.dim,
                head_options=options,
            ),
            device=device,
        )
        ms = time_steps(
            lambda i: bank.train_step([cache[i % 4][0]], cache[i % 4][1]), args.warmup, timed, device, bank.settle
        )
        out.update(ms_per_step=ms, s_per_epoch=ms * steps_per_epoch / 1e3, peak_gib=peak_gib(device))
        scope = "measured" if timed == steps_per_epoch else f"{timed} steps timed, x {steps_per_epoch}"
        say(
            f"dense-epoch batch {batch}: {ms:.2f} ms/step, {out['s_per_epoch']:.1f} s/epoch ({scope}), peak "
            f"{fmt(out['peak_gib'], '.2f')} GiB (the 4 cached batches included)"
        )
        x, y = cache[0]
        out["host_syncs"] = host_syncs(lambda: bank.train_step([x], y), device)
        say(f"host syncs of the bank's step (sync debug 'warn'): {json.dumps(out['host_syncs'])}")
    except Exception as err:  # noqa: BLE001
        out.update(error=failure(err), peak_gib=peak_gib(device))
        say(f"dense-epoch batch {batch}: {out['error']}")
    finally:
        bank = cache = None
        fresh_memory(device)
    return out


WORKLOADS = {"attentive": attentive, "dense": dense, "dense-epoch": dense_epoch}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="attentive", help=f"one or more of {list(WORKLOADS)}, comma-separated")
    p.add_argument("--variants", help="comma-separated variants of one workload (default: all of it)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="timed steps per run (dense-epoch: see --epoch-steps)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--images", type=int, help="dense-epoch: images per epoch (default 20000)")
    p.add_argument(
        "--epoch-batch",
        help="dense-epoch: batch sizes, comma-separated (default 256,16: the service's default, DINOv3's)",
    )
    p.add_argument(
        "--epoch-steps",
        type=int,
        default=60,
        help="dense-epoch: steps timed, the epoch's time extrapolated (0: the whole epoch)",
    )
    p.add_argument("--loss-chunk-heads", type=int, help="dense-epoch: head_options['loss_chunk_heads'] (default 4)")
    p.add_argument(
        "--dense-options", type=json.loads, default={}, help="dense: head_options of variant dense16-custom (JSON)"
    )
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, every variant once")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    workloads = args.workload.split(",")
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        raise SystemExit(f"unknown workload(s) {unknown}; valid: {list(WORKLOADS)}")
    if args.variants and len(workloads) > 1:
        raise SystemExit("--variants names one workload's variants: give one --workload with it")
    shapes = SMOKE if args.smoke else FULL
    DENSE_OPTIONS["dense16-custom"] = dict(args.dense_options)
    if args.smoke:
        args.rounds, args.steps, args.warmup, args.epoch_steps = 1, 2, 1, 0
        say("smoke: tiny shapes, 2 steps a variant; the times and checks below mean nothing")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    say(
        f"## head families on {name}, torch {torch.__version__}; {args.rounds} rounds x {args.steps} steps after "
        f"{args.warmup}"
    )
    results: dict[str, Any] = {
        "device": name,
        "torch": torch.__version__,
        "shapes": dataclasses.asdict(shapes),
        "args": {k: v for k, v in vars(args).items() if k != "json"},
        "workloads": {},
    }
    failed = []
    for w in workloads:
        say(f"### {w}")
        t0 = time.perf_counter()
        try:
            results["workloads"][w] = WORKLOADS[w](shapes, args, device)
        except Exception as err:  # noqa: BLE001  (the next workload still runs)
            results["workloads"][w] = {"error": failure(err)}
            failed.append(w)
        results["workloads"][w]["wall_s"] = time.perf_counter() - t0
        say(f"### {w}: {results['workloads'][w]['wall_s']:.0f} s")
        if args.json:  # after each workload: a later one that fails leaves the earlier results
            args.json.write_text(json.dumps(results, indent=2, default=str))
    if failed:
        say(f"failed workloads: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
