"""Submit a training entry point through submitit, one code path for Slurm, local processes and debug.

Example:
    >>> from distprobe.cluster import ClusterConfig, submit
    >>> job = submit("distprobe.cluster.smoke:environment", ClusterConfig(cluster="debug"))  # doctest: +SKIP
    >>> job.result()["world_size"]  # doctest: +SKIP
    1
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import submitit
from submitit.helpers import Checkpointable, TorchDistributedEnvironment

from distprobe.cluster.config import ClusterConfig
from distprobe.cluster.entry import EntryPoint
from distprobe.cluster.signals import CHECKPOINT_DIR_ENV, preemption_signal

logger = logging.getLogger(__name__)

JOB_FOLDER_ENV = "DISTPROBE_JOB_FOLDER"
"""Set in every task: the job's folder (``ClusterConfig.folder`` with ``%j`` replaced)."""


class LaunchedTask(Checkpointable):
    """What submitit runs in every task: set up the distributed environment, then call the entry point.

    It is `Checkpointable`, so submitit requeues it on preemption; its state is only the entry point, because the
    training state lives in the preemption checkpoints of the job folder (`distprobe.cluster.last_checkpoint`).
    """

    def __init__(self, entry: EntryPoint, folder: str) -> None:
        self.entry = entry
        self.folder = folder

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Export the torch.distributed variables, install the preemption flag and run the entry point."""
        job_env = submitit.JobEnvironment()
        # CUDA_VISIBLE_DEVICES stays whole: Lightning and torchrun-style scripts pick the device from LOCAL_RANK.
        dist_env = TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        folder = self._job_folder(job_env)
        os.environ[JOB_FOLDER_ENV] = str(folder)
        os.environ[CHECKPOINT_DIR_ENV] = str(folder / "checkpoints")
        logger.info(
            "Task rank %d/%d (local rank %d) of job %s running %s; master %s:%d",
            dist_env.rank,
            dist_env.world_size,
            dist_env.local_rank,
            job_env.job_id,
            self.entry.describe(),
            dist_env.master_addr,
            dist_env.master_port,
        )
        preemption = preemption_signal()
        installed = preemption.install()
        try:
            return self.entry.run(args, kwargs)
        except SystemExit as exit_:
            if preemption.leaving or preemption.received:  # a preemption's own exit (requeue code): as it is
                raise
            # submitit records only a returned value or an Exception: a script's `sys.exit(main())` after a
            # successful run left no result, and the job read as failed ("has not produced any output").
            if exit_.code in (None, 0):
                return None
            raise RuntimeError(f"{self.entry.describe()} exited with status {exit_.code!r}") from None
        finally:
            if installed:
                preemption.uninstall()

    def _job_folder(self, job_env: submitit.JobEnvironment) -> Path:
        if "SUBMITIT_FOLDER" in os.environ:
            return Path(job_env.paths.folder)
        # The debug executor runs in this process and does not set SUBMITIT_FOLDER: resolve %j as submitit does.
        return Path(self.folder.replace("%j", str(job_env.job_id))).absolute()


def executor_parameters(config: ClusterConfig) -> dict[str, Any]:
    """The `submitit.AutoExecutor.update_parameters` arguments for `config` (``slurm_`` ones apply to Slurm only)."""
    parameters: dict[str, Any] = {
        "name": config.job_name,
        "nodes": config.nodes,
        "tasks_per_node": config.tasks_per_node,
        "timeout_min": config.time_min,
        "stderr_to_stdout": config.stderr_to_stdout,
        "slurm_signal_delay_s": config.signal_delay_s,
    }
    # Left out when unset rather than sent as 0/None: "--gpus-per-node=0" fails on clusters without GPU GRES.
    if config.gpus_per_node > 0:
        parameters["gpus_per_node"] = config.gpus_per_node
    if config.cpus_per_task is not None:
        parameters["cpus_per_task"] = config.cpus_per_task
    if config.mem_gb is not None:
        parameters["mem_gb"] = config.mem_gb
    if config.partition is not None:
        parameters["slurm_partition"] = config.partition
    if config.sbatch_options:
        parameters["slurm_additional_parameters"] = dict(config.sbatch_options)
    if config.srun_args:
        parameters["slurm_srun_args"] = list(config.srun_args)
    return parameters


def srun_cpus(config: ClusterConfig) -> list[str]:
    """Job-script lines that give each srun task its ``cpus_per_task`` (Slurm only).

    Since Slurm 22.05 srun no longer inherits ``SLURM_CPUS_PER_TASK`` from the job, only ``SRUN_CPUS_PER_TASK``;
    submitit's ``srun`` line passes no ``--cpus-per-task``, so without this each task ran on one CPU.
    """
    if config.cluster != "slurm" or config.cpus_per_task is None:
        return []
    return [f"export SRUN_CPUS_PER_TASK={int(config.cpus_per_task)}"]


def make_executor(config: ClusterConfig) -> submitit.AutoExecutor:
    """A `submitit.AutoExecutor` for `config`; the same call for ``slurm``, ``local`` and ``debug``."""
    executor = submitit.AutoExecutor(
        folder=config.folder, cluster=config.cluster, slurm_max_num_timeout=config.max_requeues_on_timeout
    )
    executor.update_parameters(**executor_parameters(config))
    return executor


def submit(
    entry_point: Callable[..., Any] | str | Path, config: ClusterConfig, *args: Any, **kwargs: Any
) -> submitit.Job:
    """Submit `entry_point(*args, **kwargs)` to run on every task of a job described by `config` (see `submit_job`)."""
    return submit_job(entry_point, config, (), *args, **kwargs)


def submit_job(
    entry_point: Callable[..., Any] | str | Path,
    config: ClusterConfig,
    setup: Sequence[str],
    *args: Any,
    **kwargs: Any,
) -> submitit.Job:
    """Submit `entry_point(*args, **kwargs)` to run on every task of a job described by `config`.

    Every task gets ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and
    ``LOCAL_WORLD_SIZE`` (so ``torch.distributed.init_process_group()`` and Lightning work as is),
    ``DISTPROBE_JOB_FOLDER`` and ``DISTPROBE_CHECKPOINT_DIR``. On the preemption signal the job requeues; with a
    `PreemptionCheckpoint` in the Trainer every rank first saves at the next step, and the entry point resumes with
    ``trainer.fit(..., ckpt_path=last_checkpoint())``.

    Args:
        entry_point: a picklable callable, ``"module:function"``, or the path of a ``.py`` script (then `args` are
            its command-line arguments).
        config: where and how to run.
        setup: shell lines that the job script runs before the tasks start (Slurm and local; empty: none).
        *args: positional arguments for the entry point.
        **kwargs: keyword arguments for the entry point (not for scripts).

    Returns:
        The submitit job: ``job.result()`` waits for rank 0's return value, ``job.results()`` for every rank's.

    Raises:
        ValueError: if the entry point does not exist, or keyword arguments are given to a script; nothing is
            submitted then.
    """
    if not isinstance(config, ClusterConfig):
        raise ValueError(
            f"submit: config is a {type(config).__name__}; expected a ClusterConfig "
            "(ClusterConfig.from_dict(...) builds one from a mapping)"
        )
    entry = EntryPoint.resolve(entry_point)
    if entry.kind == "script" and kwargs:
        raise ValueError(f"submit: script {entry.target!r} takes command-line arguments only; got keywords {kwargs}")
    executor = make_executor(config)
    setup = [*srun_cpus(config), *setup]
    if setup and config.cluster != "debug":  # the debug executor runs in this process: no job script
        executor.update_parameters(**{f"{config.cluster}_setup": list(setup)})
    job = executor.submit(LaunchedTask(entry, config.folder), *args, **kwargs)
    logger.info(
        "Submitted %s as %s job %s (%d node(s) x %d task(s)); logs in %s",
        entry.describe(),
        config.cluster,
        job.job_id,
        config.nodes,
        config.tasks_per_node,
        job.paths.folder,
    )
    return job
