"""Launch distprobe trainings on clusters: submitit launcher, sbatch templates, preemption-safe requeue.

- `submit(entry_point, ClusterConfig(...))` submits through `submitit.AutoExecutor` (``slurm``, ``local``, ``debug``).
- `PreemptionCheckpoint` + `last_checkpoint()` make a preempted job save on every rank, requeue and resume.
- `render_sbatch(template, config, program)` fills the editable templates of ``slurm/``.

The Lightning parts load on first use: a task running a plain-torch entry point does not import Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from distprobe.cluster.config import ClusterConfig
from distprobe.cluster.signals import PreemptionSignal, last_checkpoint, preemption_signal
from distprobe.cluster.submitit_launcher import LaunchedTask, make_executor, submit

if TYPE_CHECKING:
    from distprobe.cluster.preemption import PreemptionCheckpoint, PreemptionSetupError, lightning_plugins
    from distprobe.cluster.sbatch import render_sbatch

_LAZY = {
    "PreemptionCheckpoint": "distprobe.cluster.preemption",
    "PreemptionSetupError": "distprobe.cluster.preemption",
    "lightning_plugins": "distprobe.cluster.preemption",
    "render_sbatch": "distprobe.cluster.sbatch",
}

__all__ = [
    "ClusterConfig",
    "LaunchedTask",
    "PreemptionCheckpoint",
    "PreemptionSetupError",
    "PreemptionSignal",
    "last_checkpoint",
    "lightning_plugins",
    "make_executor",
    "preemption_signal",
    "render_sbatch",
    "submit",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'distprobe.cluster' has no attribute {name!r}")
