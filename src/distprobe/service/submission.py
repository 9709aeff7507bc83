"""Claim, submit, follow, ingest, end: one evaluation's way through the store, shared by ``watch`` and ``eval``.

The order that makes evaluation exactly once whatever process dies when:

1. **claim** (one transaction): the checkpoint under this config moves to ``claimed`` with a fresh claim name, the
   job folder ``jobs/<claim>/`` and the scheduler job name ``<job name>.<claim>``; refused if a live claim holds it;
2. **submit** (``sbatch``), then **set the job id** on the claim (``submitted``, one try counted);
3. **follow**: the job's published ``result.json`` is ingested with ``done`` in one transaction; a job that ended
   without one ends the claim: ``pending`` again, or ``failed`` after ``max_tries``, or ``missing`` if the
   checkpoint is gone; its cache is deleted.

A submitter killed between 1 and 2 leaves a ``claimed`` row whose owner is dead: `reconcile` asks the scheduler for
the claim's job by name (``squeue``/``sacct``) and picks it up, or puts the checkpoint back to ``pending`` when no
job was ever submitted.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from distprobe.cluster.config import ClusterConfig
from distprobe.service.config import EvalConfig
from distprobe.service.job import cache_dir, job_folder, new_claim
from distprobe.service.published import PublishedFileError, read_error, read_result
from distprobe.service.scheduler import (
    SchedulerError,
    find_claimed_job,
    job_state,
    owner_alive,
    slurm_job_name,
    this_owner,
)
from distprobe.service.store import IN_FLIGHT, CheckpointRecord, ResultsStore

log = logging.getLogger(__name__)

ENTRY_POINT = "distprobe.service.job:evaluate_checkpoint"
#: A claim with no job id whose owner runs on another host is given up after this long (sbatch answers in seconds).
STALE_CLAIM_S = 600.0
#: A job that the scheduler does not know at all (not even in accounting) is given up after this long.
UNKNOWN_JOB_S = 600.0


class SubmissionError(RuntimeError):
    """The scheduler refused or failed a submission; the claim was released, the checkpoint is pending again."""


@dataclass(frozen=True)
class Submitted:
    """A job submitted under a claim."""

    claim: str
    job_id: str
    job_dir: Path
    log_path: str


def _place_pickle(job_dir: Path) -> list[str]:
    """Job-script lines that put submitit's pickle in place when the submitter could not.

    submitit dumps the job's pickle under a temporary name, runs ``sbatch``, then renames it ``<job id>_submitted.pkl``;
    a submitter killed between the two leaves a job that waits 60 s for its pickle and fails. A claim's folder holds
    one submission, so its one temporary pickle (a name without ``_``) is that job's: the script links it into place.
    """
    folder = shlex.quote(str(job_dir))
    return [
        "# distprobe: a submitter killed right after sbatch never renamed the pickle; link it (one per claim folder)",
        f'if [ ! -e {folder}/"${{SLURM_JOB_ID}}_submitted.pkl" ]; then for tmp in {folder}/*.pkl; do '
        f'case "${{tmp##*/}}" in *_*) ;; *) ln "$tmp" {folder}/"${{SLURM_JOB_ID}}_submitted.pkl" 2>/dev/null;; esac; '
        "done; fi",
    ]


def _log_tail(job_dir: Path, job_id: str | None) -> str | None:
    names = [f"{job_id}_0_log.err", f"{job_id}_0_log.out"] if job_id else []
    for path in [job_dir / name for name in names] + sorted(job_dir.glob("*_log.*")) if job_dir.is_dir() else []:
        if path.is_file():
            lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
            if lines:
                return lines[-1][:500]
    return None


class Submitter:
    """Claims, submits and follows the evaluations of one run directory under one config."""

    def __init__(
        self,
        store: ResultsStore,
        eval_config: EvalConfig,
        config_path: Path,
        run_dir: Path,
        cluster: ClusterConfig,
        max_tries: int,
    ) -> None:
        self.store = store
        self.eval_config = eval_config
        self.config_hash = eval_config.fingerprint
        self.config_path = config_path.resolve()
        self.run_dir = run_dir
        self.cluster = cluster
        self.max_tries = max_tries
        self.owner = this_owner()

    # --- claim and submit --------------------------------------------------------------------------------------

    def submit(self, checkpoint: str, step: int | None, *, allow_final: bool) -> Submitted | CheckpointRecord:
        """Claim and submit one evaluation; the record in the way if a claim (or a final state) holds it.

        Raises:
            SubmissionError: the scheduler failed; the claim is released (the checkpoint is pending again).
        """
        from distprobe.cluster.submitit_launcher import submit_job

        claim = new_claim(Path(checkpoint))
        job_dir = job_folder(self.run_dir, claim)
        job_name = slurm_job_name(self.cluster.job_name, claim)
        conflict = self.store.claim(
            checkpoint,
            self.config_hash,
            step,
            claim=claim,
            owner=self.owner,
            job_dir=str(job_dir),
            job_name=job_name,
            allow_final=allow_final,
        )
        if conflict is not None:
            return conflict
        cluster = dataclasses.replace(self.cluster, folder=str(job_dir), job_name=job_name)
        try:
            # Positional: submit's own second parameter is called config.
            job = submit_job(
                ENTRY_POINT,
                cluster,
                _place_pickle(job_dir) if cluster.cluster == "slurm" else [],
                checkpoint,
                str(self.config_path),
                str(self.run_dir),
                str(job_dir),
                claim,
            )
        except Exception as err:
            self.store.release(checkpoint, self.config_hash, claim, "pending", f"submission failed: {err}"[:2000])
            shutil.rmtree(job_dir, ignore_errors=True)
            raise SubmissionError(f"submitting {checkpoint} failed: {type(err).__name__}: {err}"[:2000]) from err
        log_path = str(job.paths.stdout)
        self.store.set_job(checkpoint, self.config_hash, claim, str(job.job_id), log_path)
        if cluster.cluster == "debug":  # the debug executor runs the job in this process, when asked for it
            try:
                job.result()
            except Exception as err:  # noqa: BLE001 - the evaluation's failure is the checkpoint's; it published it
                log.warning("The in-process job for %s failed: %s", checkpoint, err)
        return Submitted(claim=claim, job_id=str(job.job_id), job_dir=job_dir, log_path=log_path)

    # --- follow ------------------------------------------------------------------------------------------------

    def reconcile(self, record: CheckpointRecord) -> None:
        """A ``claimed`` row with no job id: pick up its job from the scheduler, or release it if there is none."""
        assert record.state == "claimed" and record.claim is not None
        alive = owner_alive(record.owner)
        if alive:
            return  # its submitter is still at work (sbatch has not answered yet)
        job_dir = Path(record.job_dir) if record.job_dir else job_folder(self.run_dir, record.claim)
        job_name = record.job_name or slurm_job_name(self.cluster.job_name, record.claim)
        job_id = find_claimed_job(self.cluster.cluster, job_name, record.claim, job_dir)
        if job_id is not None:
            log.warning(
                "%s: its submitter died after sbatch answered; picked up job %s by its name %s",
                record.path,
                job_id,
                job_name,
            )
            self.store.set_job(record.path, record.config_hash, record.claim, job_id, str(job_dir))
            return
        if alive is None and time.time() - record.updated < STALE_CLAIM_S:
            return  # claimed from another host a moment ago: give its sbatch time
        log.warning("%s: its submitter (%s) died before submitting a job; pending again", record.path, record.owner)
        self.store.release(record.path, record.config_hash, record.claim, "pending", "the submitter died")
        shutil.rmtree(job_dir, ignore_errors=True)

    def follow(self, record: CheckpointRecord) -> bool:
        """Ingest a ``submitted`` job's result, or end its claim if it ended without one; True while it runs."""
        assert record.state == "submitted" and record.claim is not None and record.job_id is not None
        job_dir = Path(record.job_dir) if record.job_dir else job_folder(self.run_dir, record.claim)
        if self.ingest(record, job_dir):
            return False
        try:
            state, detail = job_state(self.cluster.cluster, record.job_id, record.owner)
        except SchedulerError as err:
            log.warning("%s: %s; asking again next poll", record.path, err)
            return True
        if state == "running" or (state == "unknown" and time.time() - record.updated < UNKNOWN_JOB_S):
            return True
        if self.ingest(record, job_dir):  # published between the two looks
            return False
        error = read_error(job_dir) or _log_tail(job_dir, record.job_id) or "the job ended without a result"
        if detail:
            error = f"job {record.job_id} {detail}: {error}"
        self.end(record, error, job_dir)
        return False

    def settle(self, record: CheckpointRecord) -> bool:
        """A live claim in the way of a new one: follow or reconcile it, as a watcher would; True if it has ended.

        A killed ``distprobe eval`` (or a job killed with no watcher running) leaves a ``submitted`` or ``claimed``
        row that nothing else would ever end: the next ``eval`` ends it here (ingesting what its job published)
        instead of refusing for good. A job that still runs keeps its claim.
        """
        if record.state == "submitted":
            self.follow(record)
        elif record.state == "claimed":
            self.reconcile(record)
        else:
            return False
        now = self.store.checkpoint(record.path, record.config_hash)
        return now is None or now.state not in IN_FLIGHT

    def ingest(self, record: CheckpointRecord, job_dir: Path) -> bool:
        """Ingest the job's published result, if there is one (True); a bad file ends the claim as a failure."""
        assert record.claim is not None
        try:
            result = read_result(job_dir)
        except PublishedFileError as err:
            self.end(record, str(err), job_dir)
            return True
        if result is None:
            return False
        if result.checkpoint != record.path or result.config_hash != record.config_hash or result.claim != record.claim:
            self.end(record, f"{job_dir}: the published result is for another evaluation; ignored", job_dir)
            return True
        if self.store.ingest(record.path, record.config_hash, record.claim, result.step, result.rows):
            log.info("%s: done (job %s, %d numbers)", record.path, record.job_id, len(result.rows))
        if not self.eval_config.features.keep:
            self._clean_cache(record)
        return True

    def end(self, record: CheckpointRecord, error: str, job_dir: Path | None = None) -> None:
        """End a claim without results: ``missing``, ``failed`` (after max tries) or ``pending``; drop its cache."""
        assert record.claim is not None
        if not Path(record.path).exists():
            log.warning("%s was deleted before its evaluation finished (retention?)", record.path)
            state, error = "missing", f"deleted before evaluation; last job said: {error}"
        elif record.tries >= self.max_tries:
            log.error("%s failed %d times; last log %s: %s", record.path, record.tries, record.log_path, error)
            state = "failed"
        else:
            log.warning("Job %s for %s ended without results (%s); submitting again", record.job_id, record.path, error)
            state = "pending"
        self.store.release(record.path, record.config_hash, record.claim, state, error)  # type: ignore[arg-type]
        self._clean_cache(record)

    def _clean_cache(self, record: CheckpointRecord) -> None:
        if record.claim is not None:
            shutil.rmtree(cache_dir(self.eval_config, self.run_dir, Path(record.path), record.claim), True)


def ingest_published(store: ResultsStore) -> int:
    """Ingest every result that a job in flight has published (``distprobe results`` after ``eval --no-wait``).

    Only results that match their claim are taken; anything else is left for the watcher, which knows the config
    and can end the claim. Returns how many were ingested.
    """
    ingested = 0
    for record in store.checkpoints(where="state = 'submitted'"):
        if record.claim is None or record.job_dir is None:
            continue
        try:
            result = read_result(Path(record.job_dir))
        except PublishedFileError:
            continue
        if result is None or (result.checkpoint, result.config_hash, result.claim) != (
            record.path,
            record.config_hash,
            record.claim,
        ):
            continue
        ingested += store.ingest(record.path, record.config_hash, record.claim, result.step, result.rows)
    return ingested
