"""Train a probe bank, and fill a kNN, on cached features: no backbone in the loop.

The same probes as online (`distprobe.bank.ProbeBank`, `distprobe.knn.ShardedKNN`), fed from the feature cache:

- **Training.** Every epoch draws one permutation of the training set from ``seed + epoch`` (the same on every rank)
  and cuts it into global batches of ``batch_size``, dropping the last partial one; rank ``r`` of ``N`` trains on
  rows ``r, r + N, ...`` of each global batch. The bank's gradient all-reduce averages the ranks' equal shares, so N
  ranks train the heads one process would on the same global batches.
- **Evaluation.** Rank ``r`` scores the validation rows it extracted (``r, r + N, ...``) and tells the bank each
  row's index in the validation set, so the split that selects the best head is the same at every world size.
- **kNN.** Its buffer holds the whole training set, sharded: rank ``r`` inserts the rows it extracted.
- **Targets** (`distprobe.service.targets`): class indices, multi-hot vectors (a multi-label bank and kNN: BCE, mAP
  and F1, the best head by mAP) or full-resolution masks (a dense bank: per-pixel cross-entropy at the masks'
  resolution, DINOv3's protocol, mIoU and pixel accuracy, the best head by mIoU). Each batch's targets are decoded
  from the cache's compact form into exactly what the online probes receive, so bad labels are skipped and counted
  as online. A dense bank is scored in batches sized to bound the memory of its full-resolution logits.
- **Convex probes** (ridge, logistic regression, few-shot): `distprobe.service.train_convex`.
- **Intervals.** Every top-1 (class-index targets) gets a seeded bootstrap interval from per-sample results gathered
  over the ranks (`distprobe.service.intervals`); a bank's best head's over the report split it is scored on. mAP,
  F1, mIoU and pixel accuracy are resampled from per-sample statistics (`distprobe.service.target_intervals`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distprobe import keys
from distprobe.bank import BankConfig, ProbeBank
from distprobe.bank.checks import first_batch_problem
from distprobe.bank.families import FAMILIES
from distprobe.bank.families.dense import FULL_RESOLUTION
from distprobe.bank.selection import selects
from distprobe.engine.replicate import default_group
from distprobe.knn import KNNConfig, ShardedKNN
from distprobe.service.config import EvalConfig, IntervalsConfig, ServiceConfigError
from distprobe.service.config_probes import bank_fields
from distprobe.service.extract import CachedSplit, rank_and_world
from distprobe.service.intervals import PerSample, attach, interval_columns, with_interval
from distprobe.service.store import ResultRow
from distprobe.service.target_intervals import TargetSamples
from distprobe.service.train_convex import run_fewshot_episodes, run_logreg, run_ridge

log = logging.getLogger(__name__)

#: Rows per kNN insert and per evaluation batch.
CHUNK = 4096
#: A split smaller than this is copied to the GPU once rather than indexed from the host every batch.
DEVICE_COPY_LIMIT = 8 * 2**30
#: The bytes of one chunk of a dense bank's full-resolution validation logits (heads x rows x C x H x W, float32).
DENSE_EVAL_BYTES = 2**30


@dataclass
class ProbeResults:
    """What the probes scored, as flat keys (``bank_best_top1``...) and as store rows."""

    values: dict[str, float]
    rows: list[ResultRow]
    best_head: str | None


def _on(split: CachedSplit, device: torch.device) -> CachedSplit:
    size = split.features.numel() * 4 + split.labels.numel() * split.labels.element_size()
    if device.type == "cuda" and size <= DEVICE_COPY_LIMIT:
        return dataclasses.replace(split, features=split.features.to(device), labels=split.labels.to(device))
    return split


def _rows(split: CachedSplit, index: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    index = index.to(split.features.device)
    targets = split.codec.decode(split.labels[index].to(device, non_blocking=True))
    return split.features[index].to(device, non_blocking=True), targets


def _bank_config(config: EvalConfig, split: CachedSplit) -> BankConfig:
    """The bank of ``probes.bank``, its feature size read as its head family reads a cached sample."""
    options = bank_fields(config.probes.bank or {}, config.source)
    if options.get("family") == "dense":  # DINOv3's protocol unless the config says otherwise, not the online defaults
        options["head_options"] = {**FULL_RESOLUTION, **(options.get("head_options") or {})}
    family = FAMILIES.get(options.get("family", "linear"))
    shape = split.sample_shape or tuple(split.features.shape[1:])
    sample = torch.empty((1, *shape), device="meta")
    if getattr(family, "input_problem", lambda source, x: None)("features", sample) is not None:
        reads, returns = _READS.get(options["family"], _READS["attentive"])
        raise ServiceConfigError(
            f"{config.source}: probes.bank.head={options['family']!r} reads {reads} per sample, but the "
            f"backbone's features have shape {tuple(shape)} per sample; set features.forward to return {returns}"
        )
    dim = int(getattr(family, "feature_size", lambda shape: shape.numel())(sample.shape[1:]))
    for reserved in ("inputs", "num_classes", "in_features"):
        if reserved in options:
            raise ServiceConfigError(
                f"{config.source}: probes.bank.{reserved} is set by the service (the cached features and the "
                "config's num_classes); remove it"
            )
    options.setdefault("name", "bank")
    try:
        bank_config = BankConfig(inputs=("features",), num_classes=config.num_classes, in_features=dim, **options)
    except (TypeError, ValueError) as err:
        raise ServiceConfigError(f"{config.source}: probes.bank: {err}") from None
    # The first-batch checks of the online bank, on the cached shapes: targets of zeros stand in for the labels,
    # whose values are checked per batch (a bad one is skipped and counted, not raised).
    stand_in = torch.zeros((1, *split.labels.shape[1:]), dtype=torch.long)
    problem = first_batch_problem(
        bank_config.name, ("features",), [sample], split.codec.decode(stand_in), config.num_classes, bank_config
    )
    if problem is not None:
        raise ServiceConfigError(f"{config.source}: probes.bank: {problem}")
    return bank_config


#: What a token-reading head family reads per sample, and what ``features.forward`` should return for it.
_READS = {
    "attentive": ("(tokens, dim) tokens", "a block's (B, N, D) tokens"),
    "dense": (
        "(patches, dim) patch tokens or a (dim, h, w) feature map",
        "a block's (B, N, D) patch tokens without prefix tokens, or a (B, D, h, w) map",
    ),
}


def _as_read(bank_config: BankConfig, split: CachedSplit, rows: torch.Tensor) -> torch.Tensor:
    """Cached (flattened) rows as the bank's heads read them: token heads get their ``(B, N, D)`` shape back."""
    if getattr(FAMILIES[bank_config.family], "reads_tokens", False) and split.sample_shape:
        return rows.view(rows.shape[0], *split.sample_shape)
    return rows


def _knn_config(config: EvalConfig, dim: int, train_size: int) -> KNNConfig:
    options = dict(config.probes.knn or {})
    if "num_classes" in options or "in_features" in options:
        raise ServiceConfigError(f"{config.source}: probes.knn.num_classes/in_features are set by the service")
    options.setdefault("name", "knn")
    options.setdefault("queue_length", train_size)
    try:
        return KNNConfig(num_classes=config.num_classes, in_features=dim, **options)
    except (TypeError, ValueError) as err:
        raise ServiceConfigError(f"{config.source}: probes.knn: {err}") from None


def check_batching(config: EvalConfig, train_size: int, world: int) -> int:
    """Optimizer steps per epoch; raises ServiceConfigError when the batch size cannot be split or is too large."""
    batch = config.probes.batch_size
    if batch % world:
        raise ServiceConfigError(
            f"{config.source}: probes.batch_size={batch} does not divide by the job's {world} ranks; use a multiple "
            f"of {world} so every rank trains on an equal share"
        )
    if train_size < batch:
        raise ServiceConfigError(
            f"{config.source}: probes.batch_size={batch} is larger than the {train_size} training samples; lower it"
        )
    return train_size // batch


def train_bank(config: EvalConfig, train: CachedSplit, device: torch.device) -> ProbeBank:
    """A bank trained for ``probes.epochs`` epochs on the cached training features (a collective)."""
    rank, world = rank_and_world()
    steps = check_batching(config, train.size, world)
    bank_config = _bank_config(config, train)
    torch.manual_seed(config.probes.seed)  # the heads' initialisation (rank 0's is broadcast to the others)
    bank = ProbeBank.build(
        bank_config, dp_group=default_group(), device=device, total_steps=config.probes.epochs * steps
    )
    batch = config.probes.batch_size
    for epoch in range(config.probes.epochs):
        order = torch.randperm(train.size, generator=torch.Generator().manual_seed(config.probes.seed + epoch))
        for step in range(steps):
            x, y = _rows(train, order[step * batch : (step + 1) * batch][rank::world], device)
            bank.train_step([_as_read(bank.config, train, x)], y)
    bank.settle()
    return bank


def _eval_batches(size: int, rows: int = CHUNK) -> list[torch.Tensor]:
    """This rank's validation rows in batches; every rank gets the same number of batches (some may be empty)."""
    rank, world = rank_and_world()
    own = torch.arange(rank, size, world)
    count = math.ceil(math.ceil(size / world) / rows)
    return [own[i * rows : (i + 1) * rows] for i in range(count)]


def _eval_rows(bank: ProbeBank | None, val: CachedSplit) -> int:
    """Rows per validation batch: `CHUNK`, or fewer for full-resolution masks (`DENSE_EVAL_BYTES` of logits)."""
    if bank is None or val.codec.kind != "mask":
        return CHUNK
    chunk = getattr(getattr(bank.heads, "options", None), "loss_chunk_heads", None) or len(bank.head_ids)
    per_row = chunk * bank.config.num_classes * math.prod(val.labels.shape[1:]) * 4
    return max(1, min(CHUNK, DENSE_EVAL_BYTES // per_row))


def evaluate(
    config: EvalConfig, bank: ProbeBank | None, knn: ShardedKNN | None, val: CachedSplit, device: torch.device
) -> ProbeResults:
    """Score the bank's heads and the kNN on every validation sample once (collectives).

    Each top-1 gets its bootstrap interval from the per-sample results, gathered over the ranks.
    """
    # Multi-hot vectors and masks have no per-sample right or wrong answer: their mAP, F1, mIoU and pixel accuracy
    # are resampled from per-sample statistics instead (`distprobe.service.target_intervals`).
    classifies = val.codec.kind == "class"
    heads = len(bank.head_ids) if bank is not None and classifies else 0
    ks = len(knn.config.k) if knn is not None and classifies else 0
    correct = PerSample(val.size, heads + ks, device)
    samples = None if classifies else _target_samples(bank, knn, val, config.probes.intervals, device)
    for index in _eval_batches(val.size, _eval_rows(bank, val)):
        valid = int(index.numel())
        padded = index if valid else torch.zeros(1, dtype=torch.long)  # an empty batch still joins the collectives
        x, y = _rows(val, padded, device)
        if bank is not None:
            logits = bank.eval_step([_as_read(bank.config, val, x)], y, num_valid=valid, positions=padded.to(device))
            if classifies:
                correct.fill(index, (logits.argmax(-1) == y[:, None]).double())
            elif samples is not None:
                samples.fill_bank(index, x, logits, y, bank)
        if knn is not None:
            predicted = knn.eval_step(x, y, num_valid=valid)
            if classifies:
                correct.fill(index, (predicted == y[:, None]).double(), first_column=heads)
            elif samples is not None:
                samples.fill_knn(index, predicted, y)
    per_sample = correct.gathered()
    spec = config.probes.intervals
    bounds = interval_columns(per_sample, spec)  # every column at once: the heads' and the k's
    values: dict[str, float] = {}
    rows: list[ResultRow] = []
    best = None
    if bank is not None:
        computed = {k: float(v) for k, v in bank.compute_eval_metrics().items()}
        best = bank.best_head_id
        rows += _bank_rows(bank, computed, (per_sample, bounds) if classifies else None, spec)
        values.update({f"{bank.name}_{k}": v for k, v in computed.items() if keys.split_relative(k)[0] == keys.BEST})
        values.update(_bad_batches(bank))
    if knn is not None:
        computed = {k: float(v) for k, v in knn.compute_eval_metrics().items()}
        rows += _knn_rows(knn, computed, bounds, heads)
        values.update({f"{knn.name}_{k}": v for k, v in computed.items()})
    if samples is not None:
        bank_info = (bank.head_ids, best, bank.config.selection_fraction) if bank is not None else None
        knn_ks = list(knn.config.k) if knn is not None else []
        names = (bank.name if bank is not None else None, knn.name if knn is not None else None)
        rows = samples.intervals(rows, *names, bank_info, knn_ks, spec)
    return ProbeResults(values=values, rows=_unique(rows), best_head=best)


def _target_samples(
    bank: ProbeBank | None, knn: ShardedKNN | None, val: CachedSplit, spec: IntervalsConfig, device: torch.device
) -> TargetSamples | None:
    """The per-sample statistics of multi-hot or mask targets' intervals (None when intervals are off)."""
    heads = len(bank.head_ids) if bank is not None else 0
    ks = len(knn.config.k) if knn is not None and val.codec.kind == "multilabel" else 0
    if heads + ks == 0 or spec.resamples < 1:  # the config's, so every rank skips the gather alike
        return None
    return TargetSamples.build(val.codec.kind, val.size, val.codec.num_classes, heads, ks, device)


def _bad_batches(bank: ProbeBank) -> dict[str, float]:
    """The training's skipped bad batches by reason (``bank_bad_batches/targets_out_of_range``), those above 0.

    A collective (the bank's one flat sync). Bad labels are skipped and counted as online; a job logs the counts.
    """
    counts = {
        f"{bank.name}_{key}": float(value)
        for key, value in bank.compute_train_metrics().items()
        if key.startswith(keys.BAD_BATCHES) and float(value) > 0
    }
    if counts:
        log.warning("bank '%s' skipped training batches holding bad data: %s", bank.name, counts)
    return counts


def _bank_rows(
    bank: ProbeBank,
    computed: dict[str, float],
    per_sample: tuple[torch.Tensor, list[tuple[float, float]] | None] | None,
    spec: IntervalsConfig,
) -> list[ResultRow]:
    """Every head's and the best head's metrics; top-1 with its interval (the best's over the report split).

    ``per_sample``: the per-sample table (a column per head first) and its columns' intervals; None: no top-1.
    """
    best = bank.best_head_id
    metrics = list(bank.config.top_k)
    rows = []
    for i, head in enumerate(bank.head_ids):
        for m in metrics:
            row = ResultRow(bank.name, head, m, computed[keys.relative_key(m, head=head)])
            rows.append(attach(row, per_sample[1], i) if m == "top1" and per_sample is not None else row)
    for m in metrics:
        row = ResultRow(bank.name, keys.BEST, m, computed[keys.relative_key(m, head=keys.BEST)])
        if m == "top1" and per_sample is not None and best is not None:
            table = per_sample[0]
            report = ~selects(torch.arange(table.shape[0]), bank.config.selection_fraction)
            row = with_interval(row, table[report, bank.head_index(best)], spec)
        rows.append(row)
    if best is not None:
        rows.append(ResultRow(bank.name, best, keys.SELECTED, 1.0))
    return rows


def _knn_rows(
    knn: ShardedKNN, computed: dict[str, float], bounds: list[tuple[float, float]] | None, first: int
) -> list[ResultRow]:
    """Each k's metrics; top-1 with its interval (``bounds``' columns ``first`` onwards: one per k)."""
    rows = []
    for key, value in computed.items():
        k_head, metric = keys.split_relative(key)  # the headline top1 is the first k's
        head = k_head or keys.knn_head(knn.config.k[0])
        row = ResultRow(knn.name, head, metric, value)
        k = keys.knn_k(head)
        if metric == "top1" and k is not None and k in knn.config.k:
            row = attach(row, bounds, first + list(knn.config.k).index(k))
        rows.append(row)
    return rows


def _unique(rows: list[ResultRow]) -> list[ResultRow]:
    """The kNN's headline ``top1`` is its first k's: keep one row per (probe, head, metric)."""
    seen: dict[tuple[str, str, str], ResultRow] = {}
    for row in rows:
        seen.setdefault((row.probe, row.head, row.metric), row)
    return list(seen.values())


def fill_knn(config: EvalConfig, train: CachedSplit, device: torch.device) -> ShardedKNN:
    """A kNN whose sharded buffer holds the whole training set (each rank its extracted rows)."""
    rank, world = rank_and_world()
    dim = int(train.features.shape[1])
    knn = ShardedKNN.build(
        _knn_config(config, dim, train.size), in_features=dim, dp_group=default_group(), device=device
    )
    own = torch.arange(rank, train.size, world)
    for start in range(0, own.numel(), CHUNK):
        x, y = _rows(train, own[start : start + CHUNK], device)
        knn.update(x, y)
    return knn


def run_probes(
    config: EvalConfig, train: CachedSplit, val: CachedSplit, device: torch.device, job_dir: Path | None = None
) -> ProbeResults:
    """Train the bank and fill the kNN on the cached training features, then score both on the validation set.

    The convex probes (`distprobe.service.train_convex`) follow; ``job_dir`` (a submitted job's folder) keeps the
    few-shot episodes a requeued run need not redo.
    """
    train, val = _on(train, device), _on(val, device)
    bank = train_bank(config, train, device) if config.probes.bank is not None else None
    knn = fill_knn(config, train, device) if config.probes.knn is not None else None
    results = evaluate(config, bank, knn, val, device) if bank is not None or knn is not None else None
    rows = list(results.rows) if results is not None else []
    values = dict(results.values) if results is not None else {}
    convex = []
    if config.probes.ridge is not None:
        convex += run_ridge(config, train, val, device)
    if config.probes.logreg is not None:
        convex += run_logreg(config, train, val, device)
    if config.probes.fewshot is not None:
        convex += run_fewshot_episodes(config, train, val, device, job_dir)
    for row in convex:
        if row.head == keys.BEST or row.head.startswith("shots=") and "/" not in row.head:
            values[f"{row.probe}_{keys.relative_key(row.metric, head=row.head)}"] = row.value
    return ProbeResults(values=values, rows=rows + convex, best_head=results.best_head if results else None)


def flat_values(results: ProbeResults) -> Mapping[str, Any]:
    """The headline numbers of a run, for the job's return value and the CLI."""
    return {**results.values, keys.BEST_HEAD: results.best_head}
