"""Where a submitted evaluation stands, asked of the scheduler (never read from a pickle in the run directory).

- **Slurm**: ``squeue`` first (a job in the queue is running or waiting, requeued and preempted-then-requeued ones
  included), then ``sacct`` for a job that left the queue. ``PREEMPTED`` and ``REQUEUED`` records are not ends: Slurm
  puts such a job back in the queue under the same id, so the watcher waits for it rather than submitting again.
- **local** (submitit's local executor): the job id is the controller's process id; alive means running.
- A claim's job is found again by its name (``<job name>.<claim>``) in ``squeue``/``sacct``, or, for the local
  executor, by the name of the ``<job id>_submitted.pkl`` file submitit leaves in the claim's folder (its name only:
  the file is never opened).
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

JobState = Literal["running", "ended", "unknown"]

#: sacct states after which Slurm runs the job again under the same id (or may: a preempted job is requeued).
NOT_ENDED = frozenset(
    {
        "PENDING", "RUNNING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "PREEMPTED", "COMPLETING", "CONFIGURING",
        "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD", "SPECIAL_EXIT",
    }
)  # fmt: skip


class SchedulerError(RuntimeError):
    """``squeue``/``sacct`` failed: the job's state is not known this poll."""


def slurm_job_name(job_name: str, claim: str) -> str:
    """The Slurm job name of a claim's job: the user's job name, then the claim (how a lost job id is found)."""
    return f"{job_name}.{claim}"


def _run(command: list[str]) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as err:
        detail = getattr(err, "stderr", "") or ""
        raise SchedulerError(f"{' '.join(command)} failed: {err} {detail.strip()}"[:500]) from None


def _sacct_last_state(job_id: str) -> str | None:
    out = _run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"])
    states = [line.split()[0] for line in out.splitlines() if line.strip()]
    return states[-1] if states else None


def slurm_state(job_id: str) -> tuple[JobState, str | None]:
    """``(running | ended | unknown, the last sacct state)`` of a Slurm job."""
    try:
        queued = _run(["squeue", "-h", "-j", job_id, "-o", "%T"]).split()
    except SchedulerError as err:
        if "Invalid job id" not in str(err):
            raise
        queued = []  # slurmctld has forgotten it (MinJobAge): accounting says how it ended
    if any(state in NOT_ENDED for state in queued):
        return "running", None
    try:
        state = _sacct_last_state(job_id)
    except SchedulerError:
        return "unknown", None
    if state is None:
        return "unknown", None  # accounting has not caught up with a fresh job yet
    return ("running" if state in NOT_ENDED else "ended"), state


def local_state(job_id: str) -> tuple[JobState, str | None]:
    """Whether submitit's local job (a process id) is alive (a child that exited is reaped, not counted)."""
    try:
        pid = int(job_id)
    except ValueError:
        return "ended", f"not a process id: {job_id!r}"
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return "ended", None
    except ChildProcessError:
        pass  # not this process's child: a job of an earlier watcher
    try:
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return "ended", None
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "ended", None
    except (ValueError, OverflowError):
        return "ended", f"not a process id: {job_id!r}"
    except PermissionError:
        return "running", None
    return "running", None


#: submitit's debug executor names its jobs so; such a job runs inside the process that submitted it.
DEBUG_JOB_PREFIX = "DEBUG_"


def job_state(cluster: str, job_id: str, owner: str | None = None) -> tuple[JobState, str | None]:
    """Where a job stands: ``running`` (or waiting, or requeued), ``ended``, or ``unknown`` (ask again later).

    A debug job (``eval --cluster debug``) runs inside its submitter, the claim's ``owner`` (``host:pid``), before
    the submission returns: it has ended if the asker is that process, else it runs while that process does,
    whatever ``cluster`` the asker uses.
    """
    if job_id.startswith(DEBUG_JOB_PREFIX):
        if owner == this_owner():
            return "ended", None  # it ran to its end inside this process's submit
        alive = owner_alive(owner)
        if alive is None:
            return "unknown", None
        return ("running", None) if alive else ("ended", f"ran in its submitter {owner}, which has exited")
    if cluster == "slurm":
        return slurm_state(job_id)
    return local_state(job_id)


def find_claimed_job(cluster: str, job_name: str, claim: str, job_dir: Path) -> str | None:
    """The id of the job submitted under ``claim``, if the scheduler (or the claim's folder) knows one."""
    for path in sorted(job_dir.glob("*_submitted.pkl")) if job_dir.is_dir() else []:
        return path.name.split("_", 1)[0]
    if cluster != "slurm":
        return None
    name = slurm_job_name(job_name, claim)
    queued = _run(["squeue", "-h", "-t", "all", "--name", name, "-o", "%i"]).split()
    if queued:
        return queued[0]
    # Accounting keeps finished jobs; ask from a week back (sacct's default is since midnight).
    ended = _run(["sacct", "-n", "-X", "-P", "--name", name, "-S", "now-7days", "-o", "JobID"]).split()
    return ended[0].split("_")[0] if ended else None


def owner_alive(owner: str | None) -> bool | None:
    """Whether the process that took a claim (``host:pid``) is alive; None when it ran on another host."""
    if not owner or ":" not in owner:
        return None
    host, _, pid = owner.rpartition(":")
    if host != os.uname().nodename:
        return None
    return local_state(pid)[0] == "running"


def this_owner() -> str:
    """``host:pid`` of this process."""
    return f"{os.uname().nodename}:{os.getpid()}"
