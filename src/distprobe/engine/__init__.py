"""The framework-agnostic probe engine: torch and torchmetrics only, never Lightning.

`ProbeConfig` says what a probe is; `Probe.build` resolves it over a process group; `Probe.train_step` trains it.
"""

from distprobe.engine.config import ProbeConfig
from distprobe.engine.factories import build_module, build_optimizer, build_scheduler, optimizer_names, scheduler_names
from distprobe.engine.group import ProbeGroup
from distprobe.engine.lars import LARS
from distprobe.engine.probe import Probe, StepOutput

__all__ = [
    "LARS",
    "Probe",
    "ProbeConfig",
    "ProbeGroup",
    "StepOutput",
    "build_module",
    "build_optimizer",
    "build_scheduler",
    "optimizer_names",
    "scheduler_names",
]
