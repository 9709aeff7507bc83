"""The framework-agnostic probe engine: torch and torchmetrics only, never Lightning.

`ProbeConfig` says what a probe is; `Probe.build` resolves it over a process group; `Probe.train_step` trains it.
Under it, shared by probes and banks alike: `distprobe.engine.functional` (the per-head maths on ``(K, ...)`` tensors,
a probe being K = 1), `distprobe.engine.collectives` (every collective, with how it reduces), `TrainingOptions`
(accumulation, clipping, scheduler, checked once), `distprobe.engine.checks` (the first-batch check) and
`distprobe.engine.state` (resuming a window at any world size).
"""

from distprobe.engine.config import ProbeConfig
from distprobe.engine.factories import build_module, build_optimizer, build_scheduler, optimizer_names, scheduler_names
from distprobe.engine.group import ProbeGroup
from distprobe.engine.lars import LARS
from distprobe.engine.options import TrainingOptions
from distprobe.engine.probe import Probe, StepOutput

__all__ = [
    "LARS",
    "Probe",
    "ProbeConfig",
    "ProbeGroup",
    "StepOutput",
    "TrainingOptions",
    "build_module",
    "build_optimizer",
    "build_scheduler",
    "optimizer_names",
    "scheduler_names",
]
