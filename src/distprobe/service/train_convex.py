"""The convex probes on cached features: ridge, logistic regression over a C grid, few-shot episodes.

- **Ridge** (`distprobe.convex.RidgeProbe`): rank ``r`` of ``N`` adds training rows ``r, r + N, ...`` to its
  statistics; one all-reduce sums them, so every rank solves the problem of the whole training set, every lambda at
  once. Evaluation tells the probe each validation row's index, so the split choosing the best lambda is the same at
  any world size.
- **Logistic regression** (`distprobe.convex.logreg_grid`): every rank holds the whole cached training set; the C grid
  is spread over the ranks, whole fits per rank.
- **Few-shot** (`distprobe.convex.run_fewshot`): episodes spread over the ranks, a rank's share at a time, with the
  usable rows of the sets found once for the job (`distprobe.convex.FewshotRows`). Rank 0 writes each finished episode's
  per-sample results into the job's folder atomically, so a requeued job (same folder) reads them back and redoes
  only the episodes it lacks.

Every number gets its bootstrap interval over the validation samples (`distprobe.service.intervals`).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
import torch.distributed as dist

from distprobe import keys
from distprobe.bank.selection import selects
from distprobe.convex import EpisodeResult, FewshotRows, RidgeProbe, logreg_grid, run_fewshot, summarise
from distprobe.convex.fewshot import with_counted
from distprobe.convex.usable import usable_rows
from distprobe.engine.collectives import sum_over_group
from distprobe.engine.replicate import default_group
from distprobe.service.config import EvalConfig, ServiceConfigError
from distprobe.service.config_convex import fewshot_options, logreg_options, ridge_config
from distprobe.service.extract import CachedSplit, rank_and_world
from distprobe.service.intervals import PerSample, attach, interval_columns, with_interval
from distprobe.service.published import write_atomically
from distprobe.service.store import ResultRow

#: Rows per ridge update and per evaluation batch.
CHUNK = 4096
EPISODES_DIR = "episodes"
"""The folder, in a job's folder, of its finished few-shot episodes (one JSON file each)."""
_EPISODE_FORMAT = 1

log = logging.getLogger(__name__)


def _own_batches(size: int) -> list[torch.Tensor]:
    """This rank's rows (``r, r + N, ...``) in batches; every rank gets the same number of batches."""
    rank, world = rank_and_world()
    own = torch.arange(rank, size, world)
    count = math.ceil(math.ceil(size / world) / CHUNK)
    return [own[i * CHUNK : (i + 1) * CHUNK] for i in range(count)]


def _rows(split: CachedSplit, index: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    index = index.to(split.features.device)
    return split.features[index].to(device), split.labels[index].to(device)


def run_ridge(config: EvalConfig, train: CachedSplit, val: CachedSplit, device: torch.device) -> list[ResultRow]:
    """Ridge on the whole cached training set, every lambda scored on every validation sample (collectives).

    A training row with a non-finite feature or a label outside ``[0, num_classes)`` is left out on its own (the
    probe's bad-batch rule would drop the whole chunk of ``CHUNK`` rows, which rows depending on the world size) and
    counted in a warning; a validation row with one is not counted, in the values nor in their intervals.
    """
    dim = int(train.features.shape[1])
    ridge = ridge_config(config.probes.ridge or {}, config.num_classes, dim, config.source)
    probe = RidgeProbe.build(ridge, in_features=dim, dp_group=default_group(), device=device)
    skipped = torch.zeros((), dtype=torch.float64, device=device)
    for index in _own_batches(train.size):
        x, y = _rows(train, index, device)
        usable = usable_rows(x, y, config.num_classes)
        skipped += (~usable).sum()
        if index.numel():  # an empty batch adds nothing; bad rows gone, the batch is never dropped whole
            probe.train_step(x[usable], y[usable])
    _warn_skipped(probe.name, int(sum_over_group(skipped, default_group())), train.size)
    has_solution = probe.start_eval_epoch()
    num = len(probe.l2)
    # The last column says whether the probe counted the row: intervals resample the values' own samples.
    correct = PerSample(val.size, num + 1, device)
    for index in _own_batches(val.size):
        padded = index if index.numel() else torch.zeros(1, dtype=torch.long)
        x, y = _rows(val, padded, device)
        preds = probe.eval_step(x, y, num_valid=int(index.numel()), positions=padded.to(device))
        if preds is not None:
            counted = usable_rows(x, y, config.num_classes).double()[:, None]
            correct.fill(index, torch.cat([(preds == y[:, None]).double() * counted, counted], dim=1))
    per_sample = correct.gathered()
    computed = {k: float(v) for k, v in probe.compute_eval_metrics().items()}
    if not has_solution:  # no usable training row on any rank: nothing was solved, nothing to report
        log.warning("ridge '%s': no usable training sample; no ridge results", probe.name)
        return []
    counted_rows = per_sample[:, num] > 0
    spec = config.probes.intervals
    bounds = interval_columns(per_sample[counted_rows, :num], spec)
    rows = []
    for i, l2 in enumerate(probe.l2):
        head = keys.ridge_head(l2)
        value = computed[keys.relative_key("top1", head=head)]
        rows.append(attach(ResultRow(probe.name, head, "top1", value), bounds, i))
    if probe.best_index is not None:
        report = ~selects(torch.arange(val.size), ridge.selection_fraction) & counted_rows
        best = ResultRow(probe.name, keys.BEST, "top1", computed[keys.relative_key("top1", head=keys.BEST)])
        rows.append(with_interval(best, per_sample[report, probe.best_index], spec))
        # The grid's own value (the probe's logged one is the same float64 number).
        rows.append(ResultRow(probe.name, keys.BEST, "l2", probe.l2[probe.best_index]))
    return rows


def _warn_skipped(probe: str, skipped: int, size: int) -> None:
    if skipped and rank_and_world()[0] == 0:
        log.warning(
            "%s: %d of %d cached training samples have a non-finite feature or a label out of range; left out",
            probe,
            skipped,
            size,
        )


def _on_device(
    train: CachedSplit, val: CachedSplit, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train features and labels, then val's, whole on ``device``: the convex solvers' first four arguments."""
    return train.features.to(device), train.labels.to(device), val.features.to(device), val.labels.to(device)


def run_logreg(config: EvalConfig, train: CachedSplit, val: CachedSplit, device: torch.device) -> list[ResultRow]:
    """DINOv2/v3's protocol: C chosen on a held-out share of train, refitted on all of it, reported on val."""
    options = logreg_options(config.probes.logreg or {}, config.source)
    result = logreg_grid(
        *_on_device(train, val, device),
        config.num_classes,
        c_grid=options.c_grid,
        holdout=options.holdout,
        chain=options.chain,
        group=default_group(),
        max_iter=options.max_iter,
    )
    top1 = ResultRow(options.name, keys.BEST, "top1", result.val_top1)
    return [
        with_interval(top1, result.counted_correct.double(), config.probes.intervals),
        ResultRow(options.name, keys.BEST, "C", result.best_c),
    ]


def episode_file(job_dir: Path, probe: str, episode: str) -> Path:
    """Where a job keeps one finished episode: ``{job_dir}/episodes/{probe}/shots=5_seed=0.json``."""
    return job_dir / EPISODES_DIR / probe / f"{episode.replace('/', '_')}.json"


def write_episode(job_dir: Path, probe: str, result: EpisodeResult) -> Path:
    """Keep one finished episode's per-sample results, atomically (a reader sees no file or a whole one)."""
    path = episode_file(job_dir, probe, result.id)
    path.parent.mkdir(parents=True, exist_ok=True)
    bits = "".join("1" if v else "0" for v in result.val_correct.tolist())
    payload = {"format": _EPISODE_FORMAT, "id": result.id, "shots": result.shots, "seed": result.seed}
    write_atomically(path, json.dumps({**payload, "reg": result.reg, "correct": bits}))
    return path


def read_episodes(job_dir: Path, probe: str, wanted: list[str], val_size: int) -> dict[str, EpisodeResult]:
    """The finished episodes among ``wanted`` in ``job_dir``; a file that is not a whole episode is ignored."""
    found = {}
    for episode in wanted:
        path = episode_file(job_dir, probe, episode)
        try:
            data = json.loads(path.read_text())
            bits = data["correct"]
            ok = data.get("format") == _EPISODE_FORMAT and data["id"] == episode and len(bits) == val_size
            if not (ok and isinstance(bits, str) and set(bits) <= {"0", "1"}):
                continue
            numbers = int(data["shots"]), int(data["seed"]), float(data["reg"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):  # not a whole episode: solved again
            continue
        correct = torch.tensor([b == "1" for b in bits], dtype=torch.bool)
        found[episode] = EpisodeResult(episode, *numbers, correct)
    return found


def check_fewshot_classes(config: EvalConfig, train: CachedSplit) -> None:
    """Refuse shot counts that a class of the cached training set cannot fill, before any probe trains.

    An episode takes ``shots`` samples of every one of ``num_classes`` classes; the episodes run last, so a class
    with too few samples used to fail the job after the bank, the kNN, ridge and logreg had all trained.
    Every rank reads the same cache, so every rank raises at once.

    Raises:
        ServiceConfigError: naming the config, the class, its count and the fix.
    """
    if config.probes.fewshot is None:
        return
    options = fewshot_options(config.probes.fewshot, config.source)
    # The rows an episode may draw: finite features and a label in range (`distprobe.convex.run_fewshot`).
    labels = train.labels.reshape(-1).long()
    labels = labels[usable_rows(train.features, labels, config.num_classes)]
    counts = torch.bincount(labels.cpu(), minlength=config.num_classes)
    fewest = int(counts.min())
    if fewest >= max(options.shots):
        return
    short = [cls for cls, count in enumerate(counts.tolist()) if count < max(options.shots)]
    cls = int(counts.argmin())
    fix = f"drop the shot counts above {fewest}, " if fewest else ""
    raise ServiceConfigError(
        f"{config.source}: probes.fewshot.shots={options.shots}: class {cls} has {fewest} sample(s) in data.train "
        f"({len(short)} of num_classes={config.num_classes} classes have fewer than {max(options.shots)}); an "
        f"episode takes that many samples of every class; fix: {fix}set num_classes to the classes data.train "
        "holds, or remove probes.fewshot"
    )


def run_fewshot_episodes(
    config: EvalConfig, train: CachedSplit, val: CachedSplit, device: torch.device, job_dir: Path | None
) -> list[ResultRow]:
    """Every episode (those already in ``job_dir`` read back), then each episode's and each shot count's rows."""
    options = fewshot_options(config.probes.fewshot or {}, config.source)
    rank, world = rank_and_world()
    wanted = [keys.episode_id(s, seed) for s in options.shots for seed in range(options.seeds)]
    done: dict[str, EpisodeResult] = {}
    splits = _on_device(train, val, device)
    # What every episode reads of the two sets (the drawable training rows by class, the counted validation rows),
    # found once for the job: each `run_fewshot` call below solves only one episode per rank.
    rows = FewshotRows.find(*splits, config.num_classes)
    # Which validation samples count depends on the validation set alone: an episode read back is scored on them too.
    counted = rows.val_counted.cpu()
    if job_dir is not None and rank == 0:
        done = {e: with_counted(r, counted) for e, r in read_episodes(job_dir, options.name, wanted, val.size).items()}
    if world > 1:  # rank 0's reading is every rank's: one view of which episodes are left
        shared = [done]
        dist.broadcast_object_list(shared, src=0)
        done = shared[0]
    todo = [e for e in wanted if e not in done]
    for start in range(0, len(todo), world):  # one episode per rank at a time, kept as soon as it is done
        share = set(todo[start : start + world])
        for result in run_fewshot(
            *splits,
            config.num_classes,
            shots=options.shots,
            seeds=options.seeds,
            solver=options.solver,
            reg=options.reg,
            skip=[e for e in wanted if e not in share],
            group=default_group(),
            rows=rows,
        ):
            done[result.id] = result
            if job_dir is not None and rank == 0:
                write_episode(job_dir, options.name, result)
    return fewshot_rows(options.name, [done[e] for e in wanted], config)


def fewshot_rows(name: str, results: list[EpisodeResult], config: EvalConfig) -> list[ResultRow]:
    """Each episode's top-1, and per shot count the mean and standard deviation over seeds, with intervals.

    A shot count's interval is the bootstrap of its seeds' mean accuracy: the per-sample results averaged over the
    seeds, resampled over the validation samples.
    """
    spec = config.probes.intervals
    rows = [with_interval(ResultRow(name, r.id, "top1", r.top1), r.counted_correct.double(), spec) for r in results]
    for summary in summarise(results):
        head = f"shots={summary.shots}"
        # Every episode counts the same validation samples (they depend on the validation set alone).
        per_sample = torch.stack([r.counted_correct.double() for r in results if r.shots == summary.shots]).mean(0)
        rows.append(with_interval(ResultRow(name, head, "top1", summary.mean), per_sample, spec))
        rows.append(ResultRow(name, head, "top1_std", summary.std))
    return rows
