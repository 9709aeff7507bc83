"""The main job: SimCLR on scikit-learn's 8x8 digits with live online probes, on CPU in about a minute.

The dataset ships inside scikit-learn, so nothing is downloaded. The backbone (a small convnet) never sees a label;
the probes read its detached embedding and report how linearly decodable the digit classes are as training goes.
Every few epochs and at the end the features are also evaluated offline (`distprobe.demo.eval`), beside a randomly
initialised backbone and the raw pixels: on these digits both are strong, and the online probes' rise alone would
not show whether the features improved.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import lightning.pytorch as pl
import torch
import torchmetrics
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from typing_extensions import override

from distprobe import keys
from distprobe.arguments import require_count
from distprobe.callbacks import OnlineProbe
from distprobe.demo.eval import (
    EvalSplits,
    OfflineComparison,
    OfflineScores,
    compare_with_baselines,
    frozen,
    offline_eval,
)
from distprobe.demo.model import SimCLR, conv_backbone, rank_and_world_size
from distprobe.demo.output import EpochTable, quiet_lightning, summary_lines, write_line

if TYPE_CHECKING:
    from distprobe.report import ReportFiles

log = logging.getLogger(__name__)

NUM_CLASSES = 10


@dataclass(kw_only=True)
class DemoConfig:
    """Settings of the demo run."""

    epochs: int = 60
    """Training epochs."""
    batch_size: int = 64
    """Per-process batch size."""
    devices: int = 1
    """CPU processes; more than one trains with DDP over gloo."""
    lr: float = 2e-3
    """Backbone learning rate (AdamW)."""
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    """The backbone's rate over the run: a cosine decay to 0 by the last step (as SSL recipes end, so the final
    features are the ones the probes trained on: ``tests/bank/test_signal_quality.py``), or constant."""
    temperature: float = 0.2
    """InfoNCE temperature."""
    width: int = 16
    """Channels of the convnet's first layer (doubled at each of the next two)."""
    seed: int = 0
    """Seed of the split, the weights and the augmentations."""
    out_dir: str = "distprobe_runs/demo"
    """Where the CSV logs and the checkpoint go."""
    limit_train_batches: float | int = 1.0
    """Lightning's limit, for short test runs."""
    progress_bar: bool = True
    """Show Lightning's progress bar when stdout is a terminal (in a log file its redraws are noise); the table's
    rows are written above it."""
    offline_every: int = 10
    """Evaluate the features offline every this many epochs and after the last (`distprobe.demo.eval`), in the
    table's last columns; 0: not during training (`run_demo` still evaluates the final features)."""
    random_inits: int = 3
    """Randomly initialised backbones the final offline evaluation compares with (the first is the trained
    backbone's own initialisation)."""
    report: bool = True
    """`run_demo`: write `distprobe.report`'s plot and summary of the run's logs at the end."""
    num_threads: int | None = 1
    """torch's intra-op threads during the fit (restored after); None: leave torch's setting. The demo's tensors are
    small: on 2 cores shared with other work, 2 threads made an epoch 3-7 times slower than 1."""
    ckpt_path: str | None = None
    """Resume from this checkpoint."""
    extra_callbacks: list[Any] = field(default_factory=list)
    """More Lightning callbacks (for example a preemption handler)."""
    probe_data: Literal["pretraining-labels", "labeled-subset"] = "pretraining-labels"
    """``pretraining-labels``: the probes read the labels of the pretraining batches. ``labeled-subset``: the
    pretraining stream has no labels; the probes train on a labeled subset of their own (``labeled_fraction`` of the
    training split) and are evaluated on the labeled validation split (docs/own-data.md). The offline evaluation
    fits on the labels the probes train on."""
    labeled_fraction: float = 0.2
    """With ``probe_data="labeled-subset"``: the share of the training split that is labeled."""

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "devices", "width", "random_inits"):
            require_count("demo", name, getattr(self, name))
        require_count("demo", "offline_every", self.offline_every, minimum=0, hint="0: not during training")
        if self.num_threads is not None:
            require_count("demo", "num_threads", self.num_threads, or_none=True, hint="None: leave torch's setting")
        if self.probe_data not in ("pretraining-labels", "labeled-subset"):
            raise ValueError(
                f"demo: argument 'probe_data' got {self.probe_data!r}; expected 'pretraining-labels' or "
                "'labeled-subset'."
            )
        if not 0.0 < self.labeled_fraction <= 1.0:
            raise ValueError(f"demo: argument 'labeled_fraction' got {self.labeled_fraction!r}; expected (0, 1].")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"demo: argument 'lr_schedule' got {self.lr_schedule!r}; expected 'constant' or 'cosine'.")


class Digits(Dataset):
    """scikit-learn's 8x8 digits as ``{"image": (1, 8, 8) float in [0, 1], "label": int, "index": int}``.

    With ``labeled=False`` the items have no ``"label"`` (a pretraining stream without labels); ``fraction`` keeps
    only the first part of the split (a small labeled subset for probes on their own data).
    """

    def __init__(self, split: str, seed: int = 0, *, labeled: bool = True, fraction: float = 1.0) -> None:
        try:
            from sklearn.datasets import load_digits
        except ImportError as err:  # the demo extra
            raise ImportError("the demo needs scikit-learn: pip install 'distprobe[demo]'") from err
        data = load_digits()
        images = torch.tensor(data.images, dtype=torch.float32) / 16.0
        labels = torch.tensor(data.target, dtype=torch.long)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        n_val = len(labels) // 5
        keep = order[:n_val] if split == "val" else order[n_val:]
        keep = keep[: max(1, round(fraction * len(keep)))]
        self.images = images[keep].unsqueeze(1)
        self.labels = labels[keep]
        self.labeled = labeled

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not self.labeled:
            return {"image": self.images[i], "index": i}
        return {"image": self.images[i], "label": self.labels[i], "index": i}


class ResumableSampler(DistributedSampler):
    """`DistributedSampler` (a shuffled order per epoch from ``seed + epoch``) with a position that a checkpoint saves.

    The order never depends on the global RNG, which a checkpoint does not restore. The sampler counts the indices
    it has handed out in the current epoch, so a run resumed from a mid-epoch checkpoint goes on with the next
    batch of the same order (`DigitsData` saves it). Being a `DistributedSampler`, Lightning leaves it in place.
    """

    def __init__(self, dataset: Dataset, *, num_replicas: int, rank: int, seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.position = 0
        """Indices handed out in the current epoch so far (this rank's)."""
        self._start = 0

    @override
    def set_epoch(self, epoch: int) -> None:
        # Lightning calls this before each epoch, also before the resumed one: only a new epoch starts from 0.
        if epoch != self.epoch:
            self._start = self.position = 0
        super().set_epoch(epoch)

    @override
    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        start, self._start = self._start, 0
        self.position = start
        for index in indices[start:]:
            self.position += 1
            yield index

    def state_dict(self) -> dict[str, int]:
        """The epoch and the position in it."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Start the next iteration at the saved position of the saved epoch."""
        self.epoch = int(state["epoch"])
        self.position = self._start = int(state.get("position", 0))


class DigitsData(pl.LightningDataModule):
    """The digits splits, with a training order that resumes mid-epoch from a checkpoint.

    The loaders are made once the process group exists, so the training order is sharded by its rank. The
    position in the order travels in the checkpoint as this datamodule's state. Lightning can also save a stateful
    loader itself, but it restores one only if it has not iterated the loader yet: `OnlineProbe` asks for
    ``trainer.estimated_stepping_batches`` in ``setup``, which iterates the training loader before the checkpoint is
    loaded, so Lightning 2.6 silently skips that restore. A datamodule's state is restored in every case.
    """

    def __init__(self, batch_size: int, seed: int = 0, *, labeled: bool = True) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.seed = seed
        self.labeled = labeled
        self.train_sampler: ResumableSampler | None = None
        self._pending_order: dict[str, int] | None = None

    @override
    def train_dataloader(self) -> DataLoader:
        rank, world_size = rank_and_world_size()
        dataset = Digits("train", self.seed, labeled=self.labeled)
        self.train_sampler = ResumableSampler(dataset, num_replicas=world_size, rank=rank, seed=self.seed)
        if self._pending_order is not None:
            self.train_sampler.load_state_dict(self._pending_order)
            self._pending_order = None
        # num_workers=0 and a loader with a length (which Lightning does not prefetch from): each batch is drawn
        # when asked for, so after batch k the sampler's position is exactly k + 1 batches.
        return DataLoader(dataset, batch_size=self.batch_size, sampler=self.train_sampler, drop_last=True)

    @override
    def val_dataloader(self) -> DataLoader:
        # Lightning shards it with a DistributedSampler; OnlineProbe leaves its padding out of the metrics.
        return DataLoader(Digits("val", self.seed, labeled=self.labeled), batch_size=256)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"train_order": self.train_sampler.state_dict()} if self.train_sampler is not None else {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        order = state_dict.get("train_order")
        if order is None:
            return
        if self.train_sampler is not None:
            self.train_sampler.load_state_dict(order)
        else:  # the loader is made later: it starts there
            self._pending_order = order


def embed(pl_module: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """The probes' input on their own batches: the clean image's embedding (as ``training_step`` returns it)."""
    return pl_module.embedding(batch["image"])  # type: ignore[operator]


def labeled_subset(config: DemoConfig) -> dict[str, Any]:
    """The probes' own data for ``probe_data="labeled-subset"``.

    A labeled part of the training split, the labeled validation split, and the feature function: `OnlineProbe`'s
    ``data``, ``val_data`` and ``features``.
    """
    train = Digits("train", config.seed, fraction=config.labeled_fraction)
    return {
        # Sharded over the ranks by the probe (a DistributedSampler), cycled, re-shuffled each epoch of its own.
        "data": DataLoader(train, batch_size=config.batch_size, shuffle=True, drop_last=True),
        "val_data": DataLoader(Digits("val", config.seed), batch_size=256),
        "features": embed,
    }


def make_probes(module: SimCLR | None = None, own_data: dict[str, Any] | None = None) -> list[OnlineProbe]:
    """The demo's two probes: linear (LARS, the SSL default) and a small MLP (AdamW, cosine schedule).

    Args:
        module: The SimCLR module (None: taken at setup).
        own_data: `labeled_subset`'s arguments, for probes on their own labeled data; None: the pretraining labels.
    """
    own = {} if own_data is None else own_data

    def metrics() -> dict[str, torchmetrics.Metric]:
        return {
            "top1": torchmetrics.classification.MulticlassAccuracy(NUM_CLASSES, average="micro"),
            "f1": torchmetrics.classification.MulticlassF1Score(NUM_CLASSES, average="macro"),
        }

    return [
        OnlineProbe(
            module,
            name="linear",
            input="embedding",
            target="label",
            probe=nn.Linear(128, NUM_CLASSES),
            optimizer=None,
            metrics=metrics(),
            **own,
        ),
        OnlineProbe(
            module,
            name="mlp",
            input="embedding",
            target="label",
            probe=lambda: nn.Sequential(nn.Linear(128, 128), nn.GELU(), nn.Linear(128, NUM_CLASSES)),
            optimizer={"type": "AdamW", "lr": 1e-3},
            scheduler="CosineAnnealingLR",
            metrics=metrics(),
            **own,
        ),
    ]


@contextmanager
def intra_op_threads(num_threads: int | None) -> Iterator[None]:
    """Set torch's intra-op threads to `num_threads` inside the block (None: unchanged), restored on exit."""
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def eval_splits(config: DemoConfig) -> EvalSplits:
    """The offline evaluation's data: the labels the probes train on, and the validation split they are scored on.

    The fit uses all of the training split, or with ``probe_data="labeled-subset"`` the probes' labeled subset.
    """
    fraction = config.labeled_fraction if config.probe_data == "labeled-subset" else 1.0
    train, val = Digits("train", config.seed, fraction=fraction), Digits("val", config.seed)
    return EvalSplits(train.images, train.labels, val.images, val.labels)


def random_backbone(config: DemoConfig, seed: int) -> nn.Module:
    """A backbone of the demo's architecture, randomly initialised from `seed` as `build_training` initialises it.

    So ``seed=config.seed`` gives the trained backbone's starting weights. torch's global RNG is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return conv_backbone(config.width)


@dataclass
class DemoTraining:
    """The demo's pieces, wired together by `build_training`; `fit` runs them."""

    trainer: pl.Trainer
    module: SimCLR
    data: DigitsData
    probes: list[OnlineProbe]
    table: EpochTable
    num_threads: int | None = None
    """torch's intra-op threads during `fit` (None: unchanged)."""

    def fit(self, ckpt_path: str | None = None) -> None:
        """``trainer.fit`` on the digits, resuming from `ckpt_path` when given."""
        with intra_op_threads(self.num_threads):
            self.trainer.fit(self.module, datamodule=self.data, ckpt_path=ckpt_path)

    def probe_weights(self) -> dict[str, torch.Tensor]:
        """Each probe's parameters, flattened into one tensor per probe."""
        weights = {}
        for callback in self.probes:
            assert callback.module is not None, "the probe's module is built when the callback is created"
            weights[callback.name] = torch.cat([p.detach().flatten().cpu() for p in callback.module.parameters()])
        return weights


def build_training(
    config: DemoConfig, *, num_nodes: int = 1, plugins: Sequence[Any] = (), callbacks: Sequence[pl.Callback] = ()
) -> DemoTraining:
    """The demo's model, data, probes and Trainer, for `run_demo` and for a launched job (`train`).

    Args:
        config: the run's settings; ``config.devices`` processes per node.
        num_nodes: nodes of a launched job (its processes are started by the launcher, not by Lightning).
        plugins: Lightning plug-ins, e.g. `distprobe.cluster.lightning_plugins()`.
        callbacks: more callbacks, after the probes and ``config.extra_callbacks``.
    """
    pl.seed_everything(config.seed, workers=True, verbose=False)
    module = SimCLR(
        lr=config.lr,
        temperature=config.temperature,
        seed=config.seed,
        lr_schedule=config.lr_schedule,
        width=config.width,
    )
    own_data = labeled_subset(config) if config.probe_data == "labeled-subset" else None
    probes = make_probes(module, own_data)
    splits = eval_splits(config) if config.offline_every else None

    def evaluate(pl_module: nn.Module) -> OfflineScores:
        assert splits is not None
        return offline_eval(frozen(pl_module.get_submodule("backbone")), splits)

    table = EpochTable(offline=evaluate if splits is not None else None, offline_every=config.offline_every)
    distributed = config.devices * num_nodes > 1
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=config.devices,
        num_nodes=num_nodes,
        strategy="ddp" if distributed else "auto",
        max_epochs=config.epochs,
        callbacks=[*probes, table, *config.extra_callbacks, *callbacks],
        plugins=list(plugins),
        logger=CSVLogger(config.out_dir, name="logs"),
        default_root_dir=config.out_dir,
        limit_train_batches=config.limit_train_batches,
        enable_progress_bar=config.progress_bar and sys.stdout.isatty(),
        enable_model_summary=False,
        log_every_n_steps=5,
        num_sanity_val_steps=0,
    )
    return DemoTraining(
        trainer=trainer,
        module=module,
        data=DigitsData(config.batch_size, config.seed, labeled=own_data is None),
        probes=probes,
        table=table,
        num_threads=config.num_threads,
    )


def final_comparison(config: DemoConfig, training: DemoTraining) -> OfflineComparison:
    """The trained backbone's features evaluated offline, beside random initialisations and the raw pixels.

    The trained features' scores are the table's last evaluation when it is of the final weights; the baselines are
    ``config.random_inits`` random initialisations of the same architecture (`random_backbone`).
    """
    splits = eval_splits(config)
    rows = training.table.rows
    trained = training.table.offline_at(int(rows[-1]["epoch"])) if rows else None
    if trained is None:  # not evaluated after the last epoch (offline_every=0, or a run stopped early)
        trained = offline_eval(frozen(training.module.backbone), splits)
    backbones = [random_backbone(config, config.seed + i) for i in range(config.random_inits)]
    return compare_with_baselines(trained, backbones, splits)


def write_demo_report(log_dir: str) -> ReportFiles | None:
    """`distprobe.report.write_report` on the demo's logs; None (after a one-line note) where it cannot run."""
    try:
        from distprobe.report import write_report

        return write_report(log_dir)
    except ImportError as err:  # the report module, or matplotlib, is not installed
        write_line(f"report: skipped ({err})")
        return None


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Train, evaluate the final features offline, write the report; return what was measured (rank 0's view).

    Returns:
        ``final`` (the online probes' last eval metrics), ``rows`` (the per-epoch table), ``offline`` (rank 0: the
        table's offline evaluations, ``history``, and the final comparison with its baselines, ``final``; None on
        other ranks), ``report`` (the `ReportFiles` written, or None), ``log_dir`` and ``is_global_zero``.
    """
    with quiet_lightning():
        training = build_training(config)
        training.fit(ckpt_path=config.ckpt_path)
    trainer = training.trainer
    final = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(f"{keys.EVAL}/")}
    log_dir = trainer.logger.log_dir if trainer.logger else None
    result: dict[str, Any] = {
        "final": final,
        "rows": training.table.rows,
        "offline": None,
        "report": None,
        "log_dir": log_dir,
        "is_global_zero": trainer.is_global_zero,
    }
    if not trainer.is_global_zero:  # rank 0 evaluates and writes for the run
        return result
    comparison = final_comparison(config, training)
    splits = eval_splits(config)
    epochs_done = int(training.table.rows[-1]["epoch"]) + 1 if training.table.rows else 0
    parsed = {logged: keys.parse(logged) for logged in final}
    online = {p.probe: final[k] for k, p in parsed.items() if p and p.head is None and p.metric == "top1"}
    for line in summary_lines(
        comparison,
        trained_label=f"SimCLR backbone after {epochs_done} epoch{'s' if epochs_done != 1 else ''}",
        n_train=len(splits.train_labels),
        n_test=len(splits.test_labels),
        online=online,
    ):
        write_line(line)
    result["offline"] = {"history": training.table.offline_rows, "final": comparison.as_dict()}
    if log_dir is None:
        return result
    (Path(log_dir) / "offline_eval.json").write_text(json.dumps(result["offline"], indent=1))
    if config.report:
        result["report"] = report = write_demo_report(log_dir)
        if report is not None:
            write_line(f"report: {report.plot} (summary: {report.summary})")
    return result


class _Pace(pl.Callback):
    """Slows each step down (so a test or a user has time to send a signal) and writes the step reached."""

    def __init__(self, step_delay_s: float, progress_file: Path | None) -> None:
        self.step_delay_s = step_delay_s
        self.progress_file = progress_file

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        if self.progress_file is not None and trainer.is_global_zero:
            self.progress_file.write_text(str(trainer.global_step))


def train(
    epochs: int = 3,
    batch_size: int = 64,
    step_delay_s: float = 0.0,
    seed: int = 0,
    limit_train_batches: float | int = 1.0,
    out_dir: str | None = None,
) -> dict[str, Any]:
    """The demo as a launcher entry point: ``distprobe submit ... distprobe.demo:train epochs=3``.

    Runs in every task of a job that `distprobe.cluster.submit` started (or alone): it trains with DDP over gloo
    across the job's tasks, saves a checkpoint on every rank at the step after a preemption signal, and resumes from
    the job's last preemption checkpoint when requeued. The data order and the augmentations depend on the epoch
    and the step only, so a resumed run trains exactly as an uninterrupted one would.

    Args:
        epochs: training epochs.
        batch_size: samples per task and step.
        step_delay_s: sleep after every step, to leave time to send a signal.
        seed: seed of the split, the weights, the order and the augmentations.
        limit_train_batches: Lightning's limit per epoch.
        out_dir: where the CSV logs go; default: the job's folder (``$DISTPROBE_JOB_FOLDER``), else
            ``distprobe_runs/demo``.

    Returns:
        ``rank``, ``world_size``, ``global_step``, ``final`` (the last eval metrics), ``probe_weights`` (each probe's
        flattened parameters, as a list), ``log_dir``, ``resumed_from`` (the checkpoint this run started from, or
        None) and ``restarts`` (``SLURM_RESTART_COUNT``, 0 elsewhere). Rank 0 also writes it to
        ``<job folder>/demo-result.json``.
    """
    from distprobe.cluster import PreemptionCheckpoint, last_checkpoint, lightning_plugins

    job_folder = os.environ.get("DISTPROBE_JOB_FOLDER")
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    config = DemoConfig(
        epochs=epochs,
        batch_size=batch_size,
        devices=local_world_size,
        seed=seed,
        out_dir=out_dir or job_folder or DemoConfig().out_dir,
        limit_train_batches=limit_train_batches,
        progress_bar=False,
        offline_every=0,  # the job's output is its result; an offline evaluation would only slow its ranks down
    )
    pace = _Pace(step_delay_s, Path(job_folder) / "progress" if job_folder else None)
    training = build_training(
        config,
        num_nodes=max(1, world_size // local_world_size),
        plugins=lightning_plugins(),
        callbacks=[PreemptionCheckpoint(), pace],
    )
    resume = last_checkpoint()
    training.fit(ckpt_path=resume)
    trainer = training.trainer
    result = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "global_step": trainer.global_step,
        "final": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(f"{keys.EVAL}/")},
        "probe_weights": {name: w.tolist() for name, w in training.probe_weights().items()},
        "log_dir": trainer.logger.log_dir if trainer.logger else None,
        "resumed_from": resume,
        "restarts": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
    }
    if job_folder and trainer.is_global_zero:
        (Path(job_folder) / "demo-result.json").write_text(json.dumps(result))
    return result


def default_out_dir() -> Path:
    """Where `distprobe demo` writes unless told otherwise."""
    return Path(DemoConfig().out_dir)
