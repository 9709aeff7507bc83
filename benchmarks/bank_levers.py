"""A 64-head bank beside a training step: what each lever buys, its exactness and the profile's split (issue 28).

    python benchmarks/bank_levers.py --workload vit       # ViT-B/16 b128 bf16, 768-d, 1000 classes (CUDA)
    python benchmarks/bank_levers.py --workload resnet    # ResNet-18 32 px b512, 512-d, 100 classes
    python benchmarks/bank_levers.py --smoke              # tiny CPU form: every variant and check once

A plain-torch training loop (no Lightning: the bank's own cost, not the adapter's) runs the backbone's bf16 forward,
its stand-in SSL loss, backward and AdamW step, then one `ProbeBank.train_step` on the detached embedding: 64 heads
(16 learning rates x 4 weight decays), SGD with momentum 0.9, top-1 and top-5. Variants, interleaved in rotated order
every round; the overhead is the median over rounds of (variant / ``none`` of the same round) - 1:

- ``none``: no bank; ``eager``: the bank on the training's stream (the serial path, the library's default
  until Session J);
- ``side``: the bank's step on a side CUDA stream that waits for the features only (`distprobe.engine.streams`);
- ``fused``: the SGD update as one compiled kernel (`distprobe.engine.fused_update`);
- ``tf32``: the logits' matmuls in TF32 (float32 weights kept), by the bank's ``matmul_precision="high"``; the
  other variants ask ``"highest"`` (IEEE float32);
- ``side+fused``, ``all``: the levers together.

Then, for ``eager`` and ``all``: the bank step alone under torch.profiler (CUDA time per step, by kind of kernel, and
host time per step), host syncs under sync-debug ``"error"``, and the exactness of each lever against ``eager`` from
the same heads and inputs (bitwise, else the largest difference).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from bench_models import WORKLOADS
from torch import nn

from distprobe.bank import BankConfig, ProbeBank
from distprobe.bank import optimizer as bank_optimizer
from distprobe.engine.fused_update import fused_sgd_update
from distprobe.engine.streams import SideStream

LRS = [10 ** (-4 + i * 0.25) for i in range(16)]
WDS = [0.0, 1e-5, 1e-4, 1e-3]
VARIANTS = ("none", "eager", "side", "fused", "tf32", "side+fused", "all")
#: One entry per fused update run: shows that the patch reached the bank's optimizer.
FUSED_CALLS: list[int] = []


def say(*args: Any) -> None:
    print(*args, flush=True)


# --- levers applied from outside the bank (the same calls the bank's hooks make) -------------------------------------


@contextlib.contextmanager
def fused_update(enabled: bool, compiled: bool = True) -> Iterator[None]:
    """Route the bank optimizer's SGD maths through `fused_sgd_update` (the cleaning of skipped heads included).

    Patches the maths module the bank optimizer calls (``bank.optim`` before the engine's functional layer,
    ``engine.functional`` after it), so that this benchmark measures either layout. The bank's own choice of the
    compiled update on CUDA (``fused_sgd_available``) is turned off either way: the variant decides, so ``eager``
    stays the eager maths.
    """
    gate = getattr(bank_optimizer, "fused_sgd_available", None)
    if gate is not None:
        bank_optimizer.fused_sgd_available = lambda device: False
    try:
        with _routed_to_fused(enabled, compiled):
            yield
    finally:
        if gate is not None:
            bank_optimizer.fused_sgd_available = gate


@contextlib.contextmanager
def _routed_to_fused(enabled: bool, compiled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    ns = getattr(bank_optimizer, "optim", None) or bank_optimizer.functional
    clean_name = "clean_skipped" if hasattr(ns, "clean_skipped") else "zero_skipped"
    original_clean, original_sgd = getattr(ns, clean_name), ns.sgd_update

    def sgd(params, grads, buffers, rates, *, decays=True, **kw):
        FUSED_CALLS.append(1)
        spec = kw.get("spec")
        (p,), (g,), (buf,) = params, grads, buffers
        fused_sgd_update(
            p,
            g,
            buf if buf.numel() else None,
            rates,
            spec_momentum=spec.momentum if spec is not None else float(kw.get("uses_momentum", True)),
            dampening=spec.dampening if spec is not None else kw.get("dampening", 0.0),
            nesterov=spec.nesterov if spec is not None else kw.get("nesterov", False),
            decays=decays,
            compiled=compiled,
        )

    setattr(ns, clean_name, lambda grads, keep: None)  # the fused kernel drops skipped heads' gradients itself
    ns.sgd_update = sgd
    try:
        yield
    finally:
        setattr(ns, clean_name, original_clean)
        ns.sgd_update = original_sgd


LEVERS = ("side", "fused", "tf32")


def parse_levers(variant: str) -> set[str]:
    """The levers a variant names: ``eager`` none, ``all`` every one, else those joined by ``+``."""
    on = set() if variant == "eager" else set(LEVERS) if variant == "all" else set(variant.split("+"))
    unknown = on - set(LEVERS)
    if unknown:
        raise SystemExit(f"unknown levers {sorted(unknown)}; valid: {', '.join(LEVERS)}, all (or eager: none)")
    return on


def lever_precision(on: set[str]) -> str:
    """The bank's own ``matmul_precision`` for these levers, as a user sets it: TF32 only with the ``tf32`` lever
    (the library's default for linear heads is TF32 since Session L, so the other variants ask IEEE by name)."""
    return "high" if "tf32" in on else "highest"


class Levers:
    """A bank's train step with the named levers on."""

    def __init__(self, bank: ProbeBank, variant: str) -> None:
        self.bank = bank
        on = parse_levers(variant)
        self.side = SideStream(bank.device, enabled="side" in on)
        self.fused = "fused" in on
        bank.config.matmul_precision = lever_precision(on)  # type: ignore[assignment]

    def mark(self) -> None:
        self.side.mark()

    def step(self, x: torch.Tensor, y: torch.Tensor) -> Any:
        with self.side.launch([x, y]), fused_update(self.fused):
            out = self.bank.train_step([x], y)
        self.side.join([out.loss, out.preds, out.bad])
        return out


def levered_bank(levers: str) -> type:
    """`OnlineProbeBank` with levers (``side``, ``fused``, ``tf32``, joined by ``+``, or ``all``) applied around it.

    The side stream waits for an event recorded in ``on_before_backward``: the features exist, the backward has not
    been queued yet, so the bank's step can overlap it. Logged values are read after the training's stream waited
    on the side stream's event (`SideStream.join`), a device-side wait.
    """
    from lightning.pytorch.callbacks import Callback

    from distprobe.callbacks import OnlineProbeBank

    on = parse_levers(levers)

    class LeveredBank(OnlineProbeBank):
        side: SideStream | None = None

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **{**kwargs, "matmul_precision": lever_precision(on)})

        def _side(self, device: torch.device) -> SideStream:
            if self.side is None:
                self.side = SideStream(device, enabled="side" in on)
            return self.side

        def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
            getattr(super(), "on_before_backward", Callback.on_before_backward)(trainer, pl_module, loss)
            self._side(pl_module.device).mark()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            side = self._side(pl_module.device)
            inputs = [t for t in (outputs.get("embedding"), batch.get("label")) if isinstance(t, torch.Tensor)]
            with side.launch(inputs), fused_update("fused" in on):
                super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            side.join()

    LeveredBank.__name__ = f"OnlineProbeBank[{levers}]"
    return LeveredBank


def make_bank(dim: int, classes: int, device: torch.device) -> ProbeBank:
    config = BankConfig(
        name="bank",
        inputs=["x"],
        num_classes=classes,
        lr=LRS,
        weight_decay=WDS,
        optimizer={"type": "SGD", "momentum": 0.9},
        metrics=("top1", "top5"),
        in_features=dim,
    )
    return ProbeBank.build(config, device=device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- the timed loop ---------------------------------------------------------------------------------------------------


class Trainer:
    """The backbone's training step in plain torch: bf16 autocast forward, stand-in SSL loss, backward, AdamW."""

    def __init__(self, workload: Any, device: torch.device, batch: int) -> None:
        torch.manual_seed(0)
        with device:
            self.backbone = workload.make_backbone()
            self.projector = nn.Linear(workload.embed_dim, 256)
        params = [*self.backbone.parameters(), *self.projector.parameters()]
        self.opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)
        g = torch.Generator().manual_seed(0)
        self.batches = [
            (
                torch.randn(batch, *workload.input_shape, generator=g).to(device),
                torch.randint(0, workload.num_classes, (batch,), generator=g).to(device),
            )
            for _ in range(4)
        ]
        self.device = device
        self.i = 0

    def step(self, levers: Levers | None) -> None:
        x, y = self.batches[self.i % len(self.batches)]
        self.i += 1
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            emb = self.backbone(x)
            loss = self.projector(emb).float().pow(2).mean()
        if levers is not None:
            levers.mark()  # the features are ready: the side stream need not wait for the backward
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if levers is not None:
            levers.step(emb.detach(), y)


def run(variant: str, workload: Any, args: argparse.Namespace, device: torch.device) -> float:
    trainer = Trainer(workload, device, args.batch or workload.batch_size)
    levers = None if variant == "none" else Levers(make_bank(workload.embed_dim, workload.num_classes, device), variant)
    for _ in range(args.warmup):
        trainer.step(levers)
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.step(levers)
    sync(device)
    return (time.perf_counter() - start) / args.steps


def time_variants(workload: Any, args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    variants = args.variants.split(",")
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.rounds):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for v in order:
            times[v].append(run(v, workload, args, device))
        say(f"round {r + 1}: " + ", ".join(f"{v} {times[v][-1] * 1e3:.2f} ms" for v in variants))
    rows = []
    for v in variants:
        ratios = [t / b - 1 for t, b in zip(times[v], times["none"], strict=True)] if "none" in times else [0.0]
        rows.append(
            {
                "variant": v,
                "median_ms": statistics.median(times[v]) * 1e3,
                "overhead": statistics.median(ratios),
                "min": min(ratios),
                "max": max(ratios),
            }
        )
    return rows


# --- the bank step alone: profile, syncs, exactness -------------------------------------------------------------------

KINDS: list[tuple[str, Callable[[str], bool]]] = [
    ("matmul (logits, weight gradient)", lambda n: "gemm" in n or "sm90" in n or "cutlass" in n or "Kernel2" in n),
    ("cross-entropy / softmax", lambda n: "softmax" in n.lower() or "nll" in n.lower() or "log_softmax" in n),
    ("top-k / sort (metrics)", lambda n: "topk" in n.lower() or "sort" in n.lower() or "radix" in n.lower()),
    ("compiled update (triton)", lambda n: n.startswith("triton")),
    ("reductions (sums, norms, non-finite)", lambda n: "reduce" in n.lower()),
    ("copies, cat, transpose", lambda n: "copy" in n.lower() or "cat" in n.lower() or "Memcpy" in n),
    ("scatter / index (metrics)", lambda n: "scatter" in n.lower() or "index" in n.lower()),
    ("elementwise (update, masks, checks)", lambda n: "elementwise" in n.lower() or "vectorized" in n.lower()),
]


def kind_of(name: str) -> str:
    return next((k for k, test in KINDS if test(name)), "other")


def bank_alone(workload: Any, args: argparse.Namespace, device: torch.device, variant: str) -> dict[str, Any]:
    batch = args.batch or workload.batch_size
    bank = make_bank(workload.embed_dim, workload.num_classes, device)
    levers = Levers(bank, variant)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, workload.embed_dim, generator=g).to(device, torch.bfloat16)
    y = torch.randint(0, workload.num_classes, (batch,), generator=g).to(device)
    for _ in range(5):
        levers.step(x, y)
    sync(device)
    # Host time per step: the launches alone (the device runs behind; 20 steps fit in its queue).
    n = 20
    start = time.perf_counter()
    for _ in range(n):
        levers.step(x, y)
    host_ms = (time.perf_counter() - start) / n * 1e3
    sync(device)
    result: dict[str, Any] = {"variant": variant, "host_ms_per_step": host_ms}
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(n):
            levers.step(x, y)
        end.record()
        sync(device)
        result["device_ms_per_step"] = begin.elapsed_time(end) / n
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                levers.step(x, y)
            result["host_syncs"] = "0 (sync-debug 'error', 3 steps)"
        except RuntimeError as err:
            result["host_syncs"] = f"synced: {str(err).splitlines()[0]}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
        from torch.profiler import ProfilerActivity, profile

        steps = 10
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                levers.step(x, y)
            sync(device)
        split: dict[str, float] = {}
        for e in prof.key_averages():
            if e.device_type != torch.autograd.DeviceType.CUDA and not getattr(e, "self_device_time_total", 0):
                continue
            own = getattr(e, "self_device_time_total", 0.0)
            # Kernels only: an op on the host (aten::bmm, a compiled graph's launcher, which bears its kernel's
            # name) is attributed its kernels' device time too, and counting it would count that time twice.
            if own <= 0 or e.self_cpu_time_total > 0 or e.key.startswith(("aten::", "Optimizer", "cuda")):
                continue
            split[kind_of(e.key)] = split.get(kind_of(e.key), 0.0) + own / 1e3 / steps
        result["kernel_ms_per_step"] = dict(sorted(split.items(), key=lambda kv: -kv[1]))
        result["kernel_ms_total"] = sum(split.values())
        if args.verbose:
            say(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=20, max_name_column_width=70))
    return result


def exactness(workload: Any, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Each lever against ``eager``: same heads, same 6 inputs, one with a non-finite feature (a skipped step)."""
    batch = args.batch or workload.batch_size
    g = torch.Generator().manual_seed(2)
    inputs = []
    for i in range(6):
        x = torch.randn(batch, workload.embed_dim, generator=g).to(device, torch.bfloat16)
        if i == 3:
            x[0, 0] = float("nan")
        inputs.append((x, torch.randint(0, workload.num_classes, (batch,), generator=g).to(device)))

    def final(variant: str) -> torch.Tensor:
        bank = make_bank(workload.embed_dim, workload.num_classes, device)
        levers = Levers(bank, variant)
        for x, y in inputs:
            levers.step(x, y)
        bank.settle()
        levers.side.join()
        return torch.cat([bank.heads.flat.detach(), *bank.optimizer.state.values()]).clone()

    reference = final("eager")
    out: dict[str, Any] = {}
    FUSED_CALLS.clear()
    for v in ("side", "fused", "tf32", "all"):
        got = final(v)
        diff = (got - reference).abs().max().item()
        scale = reference.abs().max().item()
        out[v] = {"bitwise": bool(torch.equal(got, reference)), "max_abs_diff": diff, "relative": diff / scale}
    out["fused_update_calls"] = len(FUSED_CALLS)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="vit")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=6)
    p.add_argument("--batch", type=int, help="overrides the workload's batch size")
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--verbose", action="store_true", help="print the top kernels of each profile")
    p.add_argument("--smoke", action="store_true", help="tiny CPU form")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    workload = WORKLOADS["tiny" if args.smoke else args.workload]
    if args.smoke:
        args.rounds, args.steps, args.warmup = 1, 2, 1
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    say(f"## {workload.name} on {name}, torch {torch.__version__}")
    results: dict[str, Any] = {"device": name, "torch": torch.__version__, "workload": workload.name}
    results["exactness"] = exactness(workload, args, device)
    say("exactness against eager:", json.dumps(results["exactness"]))
    results["alone"] = [bank_alone(workload, args, device, v) for v in ("eager", "fused", "tf32", "all")]
    for r in results["alone"]:
        say(json.dumps(r))
    if not args.skip_timing:
        rows = time_variants(workload, args, device)
        results["timing"] = rows
        say(f"{args.rounds} rounds x {args.steps} steps after {args.warmup}; overhead vs none, median [min, max]")
        say("| variant | ms/step | overhead |")
        say("|---|---|---|")
        for r in rows:
            say(
                f"| {r['variant']} | {r['median_ms']:.2f} | {r['overhead'] * 100:+.2f}% "
                f"[{r['min'] * 100:+.2f}, {r['max'] * 100:+.2f}] |"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
