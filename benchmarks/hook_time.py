"""Wall time inside the OnlineProbes' ``on_train_batch_end`` per training step, on an `overhead.py` workload.

Whole-step medians cannot resolve a probe's millisecond on a shared CPU host; the probe hooks' own time can. Each fit
is `overhead.run_variant`; the hooks are timed with ``time.perf_counter`` after the warm-up steps.

    python benchmarks/hook_time.py distprobe_x8 --steps 40 --fits 3
    PYTHONPATH=<old>/src python benchmarks/hook_time.py distprobe_x1     # the same for another version
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from dataclasses import replace
from typing import Any

import overhead
import torch
from bench_models import WORKLOADS

from distprobe.callbacks import OnlineProbe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variant", help="distprobe_x1 or distprobe_x8")
    p.add_argument("--workload", default="mlp")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--fits", type=int, default=3)
    args = p.parse_args()
    logging.getLogger("lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    original = OnlineProbe.on_train_batch_end
    seconds: list[float] = []

    def timed(self: OnlineProbe, trainer: Any, *rest: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        original(self, trainer, *rest, **kwargs)
        if trainer.global_step >= workload.warmup:
            seconds.append(time.perf_counter() - start)

    OnlineProbe.on_train_batch_end = timed  # type: ignore[method-assign]
    workload = replace(WORKLOADS[args.workload], steps=args.steps)
    probes = overhead.probe_count(args.variant)
    options = overhead.parse_args(["--workload", args.workload])
    for fit in range(args.fits):
        seconds.clear()
        step, _ = overhead.run_variant(args.variant, workload, options, torch.device("cpu"), None)
        hooks = sum(seconds) / (len(seconds) / probes) * 1e3
        print(f"{args.variant} fit {fit}: step {step * 1e3:.2f} ms, probe hooks {hooks:.3f} ms/step", flush=True)


if __name__ == "__main__":
    main()
