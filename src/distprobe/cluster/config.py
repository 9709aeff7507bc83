"""`ClusterConfig`: the cluster parameters shared by the submitit launcher and the sbatch templates.

Everything here is checked before anything is submitted: a wrong value raises `ValueError` naming the field, the
value received and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from distprobe.arguments import require_count

ClusterKind = Literal["slurm", "local", "debug"]

# sbatch options that ClusterConfig sets from its own fields (or submitit sets): given again through
# `sbatch_options` they would silently fight the field, so they are refused with the field to use instead.
_OWNED_SBATCH_OPTIONS = {
    "job-name": "job_name",
    "partition": "partition",
    "nodes": "nodes",
    "ntasks-per-node": "tasks_per_node",
    "gpus-per-node": "gpus_per_node",
    "cpus-per-task": "cpus_per_task",
    "mem": "mem_gb",
    "time": "time_min",
    "signal": "signal_delay_s",
    "output": "folder",
    "error": "folder",
}
_SBATCH_OPTION_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")


def check_shell_safe(owner: str, value: str) -> None:
    """Reject characters that no quoting makes safe in a one-line `#SBATCH` directive or shell word.

    Args:
        owner: what the value is, for the error message (e.g. ``"ClusterConfig.partition"``).
        value: the string to check.

    Raises:
        ValueError: if `value` holds a newline, a carriage return or a NUL byte.
    """
    for char, name in (("\n", "a newline"), ("\r", "a carriage return"), ("\0", "a NUL byte")):
        if char in value:
            raise ValueError(
                f"{owner}={value!r} contains {name}; sbatch directives and shell words are one line each. Remove it."
            )


@dataclass(kw_only=True)
class ClusterConfig:
    """Where and how a training job runs: the parameters of `distprobe submit` and of the sbatch templates.

    Example:
        >>> ClusterConfig(cluster="local", tasks_per_node=2).world_size
        2
    """

    cluster: ClusterKind = "slurm"
    """``"slurm"`` submits with sbatch; ``"local"`` runs the tasks as processes on this machine; ``"debug"`` runs
    one task inside the calling process (for a debugger)."""

    folder: str = "distprobe_runs/%j"
    """Job folder for submitit's pickles, the logs and the preemption checkpoints; ``%j`` becomes the job id, so a
    requeued job finds its own checkpoints. Must be on a file system every node sees."""

    job_name: str = "distprobe"
    """Slurm job name."""

    nodes: int = 1
    """Number of nodes."""

    tasks_per_node: int = 1
    """Processes (ranks) per node: one per GPU on a GPU cluster, one per CPU worker otherwise."""

    gpus_per_node: int = 0
    """GPUs to allocate per node; 0 for a CPU job. Must be at least `tasks_per_node` when positive."""

    cpus_per_task: int | None = None
    """CPUs per task; None keeps the cluster's default (usually 1)."""

    partition: str | None = None
    """Slurm partition; None uses the cluster's default partition."""

    time_min: int = 60
    """Time limit in minutes."""

    mem_gb: float | None = None
    """Memory per node in GB; None keeps the cluster's default."""

    signal_delay_s: int = 120
    """Slurm sends USR2 this many seconds before the time limit, so the job can checkpoint and requeue."""

    max_requeues_on_timeout: int = 3
    """How many times a job that hits its time limit is requeued (preemptions do not count)."""

    sbatch_options: dict[str, str | int | bool] = field(default_factory=dict)
    """Extra sbatch options without leading dashes, e.g. ``{"account": "ml", "exclusive": True}``; passed to
    submitit as ``slurm_additional_parameters`` and rendered into the templates as ``#SBATCH`` lines."""

    srun_args: list[str] = field(default_factory=list)
    """Extra arguments for ``srun``, e.g. ``["--cpu-bind=none"]``."""

    stderr_to_stdout: bool = False
    """Write each task's stderr into its stdout log."""

    def __post_init__(self) -> None:
        if self.cluster not in get_args(ClusterKind):
            raise ValueError(
                f"ClusterConfig.cluster={self.cluster!r} is not a cluster kind; expected one of {get_args(ClusterKind)}"
            )
        self._check_counts()
        self._check_strings()
        self._check_sbatch_options()
        if self.cluster in ("local", "debug") and self.nodes != 1:
            raise ValueError(
                f"ClusterConfig.nodes={self.nodes} with cluster={self.cluster!r}: this cluster runs on one machine; "
                "use nodes=1 or cluster='slurm'"
            )
        if self.cluster == "debug" and self.tasks_per_node != 1:
            raise ValueError(
                f"ClusterConfig.tasks_per_node={self.tasks_per_node} with cluster='debug': the debug cluster runs one "
                "task inside this process; use tasks_per_node=1, or cluster='local' for several tasks on this machine"
            )

    def _check_counts(self) -> None:
        minimums = {"nodes": 1, "tasks_per_node": 1, "gpus_per_node": 0, "time_min": 1, "signal_delay_s": 0}
        minimums["max_requeues_on_timeout"] = 0
        for name, minimum in minimums.items():
            require_count("ClusterConfig", name, getattr(self, name), minimum=minimum)
        if self.cpus_per_task is not None:
            hint = "None: the cluster's default"
            require_count("ClusterConfig", "cpus_per_task", self.cpus_per_task, or_none=True, hint=hint)
        if self.mem_gb is not None and not (
            isinstance(self.mem_gb, (int, float)) and math.isfinite(self.mem_gb) and self.mem_gb > 0
        ):
            raise ValueError(f"ClusterConfig.mem_gb={self.mem_gb!r}: expected a finite positive number of GB or None")
        if self.gpus_per_node > 0 and self.tasks_per_node > self.gpus_per_node:
            raise ValueError(
                f"ClusterConfig.tasks_per_node={self.tasks_per_node} is more than gpus_per_node={self.gpus_per_node}: "
                "each task drives one GPU. Use tasks_per_node <= gpus_per_node, or gpus_per_node=0 for a CPU job."
            )
        if self.signal_delay_s >= self.time_min * 60:
            raise ValueError(
                f"ClusterConfig.signal_delay_s={self.signal_delay_s} is not shorter than time_min={self.time_min} "
                "minutes: the preemption signal would come before the job starts. Lower signal_delay_s."
            )

    def _check_strings(self) -> None:
        for name in ("folder", "job_name", "partition"):
            value = getattr(self, name)
            if value is None and name == "partition":
                continue
            if not isinstance(value, str) or not value:
                raise ValueError(f"ClusterConfig.{name}={value!r}: expected a non-empty string")
            check_shell_safe(f"ClusterConfig.{name}", value)
        if not isinstance(self.srun_args, list) or not all(isinstance(a, str) for a in self.srun_args):
            raise ValueError(f"ClusterConfig.srun_args={self.srun_args!r}: expected a list of strings")
        for arg in self.srun_args:
            check_shell_safe("ClusterConfig.srun_args", arg)

    def _check_sbatch_options(self) -> None:
        if not isinstance(self.sbatch_options, dict):
            raise ValueError(f"ClusterConfig.sbatch_options={self.sbatch_options!r}: expected a dict")
        for key, value in self.sbatch_options.items():
            if not isinstance(key, str) or not _SBATCH_OPTION_NAME.match(key):
                raise ValueError(
                    f"ClusterConfig.sbatch_options key {key!r} is not an sbatch option name; "
                    "write it without dashes, e.g. 'account' or 'mail-type'"
                )
            owner = _OWNED_SBATCH_OPTIONS.get(key.replace("_", "-"))
            if owner is not None:
                raise ValueError(
                    f"ClusterConfig.sbatch_options sets {key!r}, which ClusterConfig.{owner} controls; "
                    f"set {owner} instead"
                )
            if not isinstance(value, (str, int, bool)):
                raise ValueError(
                    f"ClusterConfig.sbatch_options[{key!r}]={value!r}: expected a string, an integer or True"
                )
            check_shell_safe(f"ClusterConfig.sbatch_options[{key!r}]", str(value))

    @property
    def world_size(self) -> int:
        """Total number of ranks, ``nodes * tasks_per_node``."""
        return self.nodes * self.tasks_per_node

    @classmethod
    def field_names(cls) -> list[str]:
        """The valid option names, read from the dataclass fields."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, options: Mapping[str, Any]) -> ClusterConfig:
        """Build a config from a mapping (a YAML/Hydra node, parsed CLI options), rejecting unknown keys.

        Args:
            options: option name to value; names are the fields of `ClusterConfig`.

        Returns:
            The validated config.

        Raises:
            ValueError: on an unknown key (the message lists the valid ones and the closest match) or a bad value.

        Example:
            >>> ClusterConfig.from_dict({"cluster": "local", "tasks_per_node": 2}).tasks_per_node
            2
        """
        valid = cls.field_names()
        unknown = [key for key in options if key not in valid]
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(str(key), valid, n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ValueError(f"ClusterConfig: unknown option(s) {', '.join(hints)}; valid options: {valid}")
        return cls(**dict(options))
