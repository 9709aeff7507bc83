"""One evaluation job: a checkpoint in, its probe results published and the training's log out.

`evaluate_checkpoint` runs on every rank of the job (a submitit task, a ``torchrun`` process, or one process):

1. build the backbone from the config and load the checkpoint's weights into it, whole, on every rank (so a sharded
   checkpoint of any world size evaluates at any other: `distprobe.service.checkpoints`);
2. extract the train and val features once over the ranks into the job's own memory-mapped cache, its space
   reserved first (`distprobe.service.extract`);
3. train the bank and fill the kNN on the cached features (`distprobe.service.train`);
4. on rank 0: a submitted job publishes every number as ``result.json`` in its own folder, atomically
   (`distprobe.service.published`; the watcher or the ``eval`` command ingests it into the store), and an
   in-process call records them in the store itself; then write them to the training's log at the checkpoint's
   global step and delete the cache (unless kept).

A job that dies at any point leaves the store as it was; its requeued run (same claim, same folder) reuses the
splits it had finished. A job that raises publishes ``error.json`` with the error, for the watcher to report.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from distprobe.service.checkpoints import CheckpointError, CheckpointInfo, detect, load_weights
from distprobe.service.config import EvalConfig, ServiceConfigError
from distprobe.service.extract import CachedSplit, extract_split, rank_and_world
from distprobe.service.published import PublishedResult, finite_rows, publish_error, publish_result
from distprobe.service.store import JOBS_DIR, SERVICE_DIR, ResultsStore, default_store_path
from distprobe.service.train import flat_values, run_probes
from distprobe.service.train_convex import check_fewshot_classes
from distprobe.service.training_log import write_training_log

log = logging.getLogger(__name__)


def default_run_dir(checkpoint: Path) -> Path:
    """The run directory of a checkpoint: above a ``checkpoints/`` folder, else the folder that holds it."""
    parent = checkpoint.resolve().parent
    return parent.parent if parent.name == "checkpoints" else parent


def store_path(config: EvalConfig, run_dir: Path) -> Path:
    """The results store of ``run_dir`` under ``config``."""
    return Path(config.results.store) if config.results.store else default_store_path(run_dir)


def jobs_root(run_dir: Path) -> Path:
    """The folder of the service's job folders (one per claim) in ``run_dir``."""
    return run_dir / SERVICE_DIR / JOBS_DIR


def job_folder(run_dir: Path, claim: str) -> Path:
    """The submitit folder of the job that runs ``claim``: its logs, its published result, nothing else's."""
    return jobs_root(run_dir) / claim


def new_claim(checkpoint: Path) -> str:
    """A fresh claim name: the checkpoint's name (for people reading ``jobs/``), then a random part."""
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in checkpoint.name)[:40]
    return f"{stem}-{uuid.uuid4().hex[:12]}"


def _instantiate(spec: Any, what: str, source: str) -> Any:
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(spec)
    except InstantiationException as err:
        raise ServiceConfigError(f"{source}: {what} could not be built: {err}") from None


def _forward(spec: Any, source: str) -> Callable[[nn.Module, Any], torch.Tensor] | None:
    if spec is None:
        return None
    if isinstance(spec, str) and ":" in spec:
        import importlib

        module, _, name = spec.partition(":")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as err:
            raise ServiceConfigError(f"{source}: features.forward={spec!r} cannot be imported: {err}") from None
    if isinstance(spec, dict) and "_target_" in spec:
        return _instantiate({**spec, "_partial_": True}, "features.forward", source)
    raise ServiceConfigError(
        f"{source}: features.forward={spec!r}; expected null, 'module:function' or a Hydra config with _target_"
    )


def allow_globals(paths: list[str], source: str) -> None:
    """Let ``torch.load(weights_only=True)`` build the classes the config names (``package.module.Class``)."""
    import importlib

    allowed = []
    for path in paths:
        module, _, name = path.replace(":", ".").rpartition(".")
        try:
            allowed.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError, ValueError) as err:
            raise ServiceConfigError(
                f"{source}: weights.safe_globals entry {path!r} cannot be imported ({err}); expected an import path "
                "such as argparse.Namespace"
            ) from None
    if allowed:
        torch.serialization.add_safe_globals(allowed)


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def _init_distributed(device: torch.device) -> bool:
    """Join the job's ranks when the environment names several (submitit and torchrun set it); True if joined here."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=timedelta(minutes=30))
    from distprobe.engine.clean_exit import settle_gloo_workers_at_exit

    settle_gloo_workers_at_exit()
    return True


def cache_dir(config: EvalConfig, run_dir: Path, checkpoint: Path, claim: str) -> Path:
    """The feature cache of one job: one checkpoint, one config, one claim (no two jobs ever share one)."""
    root = Path(config.features.cache_dir) if config.features.cache_dir else run_dir / SERVICE_DIR / "cache"
    key = hashlib.sha256(f"{checkpoint.resolve()}|{config.fingerprint}|{claim}".encode()).hexdigest()[:12]
    return root / f"{checkpoint.name}-{key}"


def _stamp(config: EvalConfig, info: CheckpointInfo) -> dict[str, Any]:
    stat = info.path.stat()
    return {"checkpoint": str(info.path.resolve()), "mtime_ns": stat.st_mtime_ns, "config": config.fingerprint}


def extract_features(
    config: EvalConfig, info: CheckpointInfo, cache: Path, device: torch.device
) -> tuple[CachedSplit, CachedSplit]:
    """Build the backbone, load the checkpoint's weights, and extract (or reuse) both splits' features."""
    backbone = _instantiate(config.backbone, "backbone", config.source)
    if not isinstance(backbone, nn.Module):
        raise ServiceConfigError(f"{config.source}: backbone built a {type(backbone).__name__}; expected an nn.Module")
    load_weights(info, backbone, prefix=config.weights.prefix, strict=config.weights.strict)
    backbone.to(device)
    forward = _forward(config.features.forward, config.source)
    stamp = _stamp(config, info)
    splits = []
    for split in ("train", "val"):
        dataset = _instantiate(getattr(config.data, split), f"data.{split}", config.source)
        splits.append(
            extract_split(
                backbone,
                dataset,
                split=split,
                cache=cache,
                stamp=stamp,
                forward=forward,
                input_key=config.data.input_key,
                label_key=config.data.label_key,
                batch_size=config.data.batch_size,
                num_workers=config.data.num_workers,
                device=device,
                autocast=config.features.autocast,
                targets=config.targets,
            )
        )
    del backbone
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return splits[0], splits[1]


def _shared_token(rank: int) -> str:
    """A random name that every rank of the job agrees on (rank 0's)."""
    token = [uuid.uuid4().hex[:12] if rank == 0 else None]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(token, src=0)
    return f"inproc-{token[0]}"


def evaluate_checkpoint(
    checkpoint: str | Path,
    config: EvalConfig | str | Path,
    run_dir: str | Path | None = None,
    job_dir: str | Path | None = None,
    claim: str | None = None,
) -> dict[str, Any]:
    """Evaluate one checkpoint on every rank of the job; rank 0 publishes (or records) the results.

    Args:
        checkpoint: a Lightning ``.ckpt``, a Distributed Checkpoint directory or a DeepSpeed checkpoint directory.
        config: an `EvalConfig` or the path of its YAML file.
        run_dir: the training's run directory (default: `default_run_dir` of the checkpoint): where the store, the
            cache and the training's log are found.
        job_dir: the submitted job's own folder: rank 0 publishes ``result.json`` (or ``error.json``) there and does
            not open the store, whose writer ingests the file. None (a call in this process): rank 0 records the
            results in the store itself.
        claim: the store's claim this job runs under (it names the job's cache, so a requeued run reuses it).

    Returns:
        ``{"checkpoint", "step", "store", "rows", "values"}``: ``values`` holds the headline numbers
        (``bank_best_top1``, ``knn_k20_top1``..., ``best_head``).

    Raises:
        CheckpointError: the checkpoint is missing, incomplete or holds no matching weights.
        ServiceConfigError: the config is invalid or names something that cannot be built.
        CacheSpaceError: the feature cache's disk has no room for it.
    """
    folder = Path(job_dir) if job_dir is not None else None
    try:
        return _evaluate(checkpoint, config, run_dir, folder, claim)
    except Exception as err:
        if folder is not None and rank_and_world()[0] == 0:
            publish_error(folder, err)
        raise


def _evaluate(
    checkpoint: str | Path,
    config: EvalConfig | str | Path,
    run_dir: str | Path | None,
    job_dir: Path | None,
    claim: str | None,
) -> dict[str, Any]:
    config = config if isinstance(config, EvalConfig) else EvalConfig.load(config)
    allow_globals(config.weights.safe_globals, config.source)
    path = Path(checkpoint)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint (deleted by the training's retention?)")
    info = detect(path)
    if config.weights.format not in ("auto", info.format):
        raise CheckpointError(
            f"{path}: a {info.format} checkpoint, but the config's weights.format is "
            f"{config.weights.format!r}; set it to auto or {info.format!r}"
        )
    run = Path(run_dir) if run_dir is not None else default_run_dir(path)
    device = _device()
    joined = _init_distributed(device)
    cache = None
    try:
        rank, world = rank_and_world()
        cache = cache_dir(config, run, info.path, claim if claim is not None else _shared_token(rank))
        log.info("Evaluating %s (step %s) on %d rank(s); cache %s", path, info.step, world, cache)
        train, val = extract_features(config, info, cache, device)
        check_fewshot_classes(config, train)
        results = run_probes(config, train, val, device, job_dir)
        rows, left_out = finite_rows(results.rows)
        if left_out and rank == 0:
            log.warning(
                "%s: %d number(s) are not finite and are left out of the results: %s (a best head scores NaN when "
                "no validation sample lies outside its selection share: data.val has %d sample(s))",
                path,
                len(left_out),
                ", ".join(left_out[:10]),
                val.size,
            )
        del train, val
        store = store_path(config, run)
        if rank == 0:
            if job_dir is not None:
                published = PublishedResult(str(info.path), info.step, config.fingerprint, claim, rows)
                log.info("Published the results in %s", publish_result(job_dir, published))
            else:
                ResultsStore(store).record_results(str(info.path), info.step, config.fingerprint, rows)
            written = write_training_log(
                config.results.logger, run, config.results.log_dir, info.step, str(info.path), rows
            )
            if written is not None:
                log.info("Wrote %s's results into the training's log at %s", path.name, written)
            if not config.features.keep:
                shutil.rmtree(cache, ignore_errors=True)
        if world > 1:
            dist.barrier()
    except BaseException:
        # A submitted job keeps its cache for its requeued run (the watcher deletes it when the claim ends); an
        # in-process call has no second run.
        if claim is None and cache is not None and rank_and_world()[0] == 0:
            shutil.rmtree(cache, ignore_errors=True)
        raise
    finally:
        if joined:
            dist.destroy_process_group()
    return {
        "checkpoint": str(info.path),
        "step": info.step,
        "store": str(store),
        "rows": len(rows),
        "values": dict(flat_values(results)),
    }
