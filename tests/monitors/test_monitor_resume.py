"""Monitors resumed from a checkpoint taken inside a training epoch or an ``every_n_steps`` window.

Before the fix a monitor saved only where its windows fall: a resume inside an epoch logged RankMe and LiDAR over the
batches after the checkpoint alone, and a resume on 2 ranks from rank 0's checkpoint lost rank 1's sums. Now the
checkpoint holds the group's training sums (rank 0 of the group loads them, the others start from zeros), so the
resumed values equal the uninterrupted run's:

- a plain-torch `ProbeSet` on one process and on 2 gloo ranks (one spawn; the 2-rank state also resumes one process);
- a real `lightning.Trainer` fit whose `ModelCheckpoint` writes every 3 training steps, resumed by a new Trainer from
  checkpoints inside epochs and windows (a resumable training loader, so the resumed fit sees the same batches).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from tests.helpers.dist import run_distributed
from tests.monitors.test_maths import direct_lidar, direct_rankme, low_rank_views
from torch import nn
from torch.utils.data import default_collate

from distprobe.callbacks import EmbeddingMonitor
from distprobe.loop import ProbeSet

STEPS, CUT, SAMPLES, VIEWS, DIM = 5, 3, 4, 3, 8
MONITORS = [
    {"name": "epoch", "input": "views", "metrics": ("rankme", "lidar")},
    {"name": "win", "input": "views", "metrics": "rankme", "every_n_steps": 4},
]


def _batches() -> list[torch.Tensor]:
    """``(SAMPLES, VIEWS, DIM)`` global batches; rank r of w takes samples r, r + w, ..."""
    return list(low_rank_views(n=STEPS * SAMPLES, q=VIEWS, d=DIM, rank=4, seed=5).split(SAMPLES))


def _steps(probes: ProbeSet, batches: list[torch.Tensor], rank: int, world: int) -> list[dict[str, float]]:
    windows = []
    for views in batches:
        probes.step({"views": views[rank::world]}, {})
        windows.append({k: float(v) for k, v in probes.window_values.items()})
    return windows


def _run(rank: int, world: int) -> dict[str, Any]:
    """Steps ``CUT`` batches, saves, and ends the epoch in a fresh set loaded from that state."""
    batches = _batches()
    probes = ProbeSet.build([], monitors=MONITORS)
    _steps(probes, batches[:CUT], rank, world)
    state = probes.state_dict()  # a collective: the group's sums
    resumed = ProbeSet.build([], monitors=MONITORS)
    resumed.load_state_dict(state)
    windows = _steps(resumed, batches[CUT:], rank, world)
    train = {k: float(v) for k, v in resumed.compute_train_metrics().items()}
    return {"state": state, "windows": windows, "train": train}


def _check_resumed(result: dict[str, Any]) -> None:
    seen = torch.cat(_batches())
    assert result["train"] == {
        "train/epoch_rankme": pytest.approx(float(direct_rankme(seen.reshape(-1, DIM))), rel=1e-6),
        "train/epoch_lidar": pytest.approx(float(direct_lidar(seen)), rel=1e-6),
    }
    # The window of batches 0-3 closes at the resumed set's first step, over all four batches.
    first_window = seen[: 4 * SAMPLES].reshape(-1, DIM)
    assert result["windows"][0] == {"train/win_rankme": pytest.approx(float(direct_rankme(first_window)), rel=1e-6)}


def test_a_probe_set_resumed_inside_an_epoch_and_a_window_gives_the_uninterrupted_values():
    result = _run(0, 1)
    _check_resumed(result)
    assert result["state"]["epoch"]["train_batches"] == CUT


@pytest.mark.distributed
def test_two_ranks_save_the_groups_sums_and_resume_on_two_ranks_or_one():
    results = run_distributed(_run, 2, timeout=120)
    for result in results:
        _check_resumed(result)
    # Rank 0's state (what Lightning writes) holds both ranks' sums: one process resumes from it on every sample.
    probes = ProbeSet.build([], monitors=MONITORS)
    probes.load_state_dict(results[0]["state"])
    windows = _steps(probes, _batches()[CUT:], 0, 1)
    _check_resumed({"windows": windows, "train": {k: float(v) for k, v in probes.compute_train_metrics().items()}})


def test_a_checkpoint_of_another_embedding_size_is_refused_by_name():
    probes = ProbeSet.build([], monitors=MONITORS[:1])
    probes.step({"views": torch.randn(SAMPLES, VIEWS, DIM)}, {})
    other = ProbeSet.build([], monitors=[{**MONITORS[0], "dim": DIM + 1}])
    expected = rf"monitor 'epoch': the checkpoint's sums are of {DIM}-dimensional .* reads {DIM + 1}"
    with pytest.raises(ValueError, match=expected):
        other.load_state_dict(probes.state_dict())


# --- Lightning -------------------------------------------------------------------------------------------------

BATCHES, EPOCHS, EVERY = 7, 2, 3


class ResumableViews:
    """The training batches in order from a loader that saves its position and continues from it (``_Stateful``)."""

    def __init__(self) -> None:
        self.views = low_rank_views(n=BATCHES * SAMPLES, q=VIEWS, d=DIM, rank=4, seed=6)
        self.start = self.position = 0

    def __len__(self) -> int:
        return BATCHES

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        start, self.start = self.start, 0
        for i in range(start, BATCHES):
            self.position = i + 1
            yield default_collate([{"views": v} for v in self.views[i * SAMPLES : (i + 1) * SAMPLES]])

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.start = state["position"] % BATCHES  # a checkpoint at an epoch's end resumes at the next one's start


class Encoder(pl.LightningModule):
    """A linear encoder that trains (its features change every step): the resumed backbone must match too."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.encoder = nn.Linear(DIM, DIM)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        views = self.encoder(batch["views"])
        return {"loss": views.pow(2).mean(), "views": views}

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Logged(pl.Callback):
    """Every value the monitors logged, by global step (a window's at its batch, an epoch's at its end)."""

    def __init__(self) -> None:
        self.values: dict[tuple[int, str], float] = {}

    def _keep(self, trainer: pl.Trainer) -> None:
        for key, value in trainer.callback_metrics.items():
            self.values[(trainer.global_step, key)] = float(value)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._keep(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._keep(trainer)


def _fit(root: Any, ckpt_path: str | None = None) -> dict[tuple[int, str], float]:
    monitors = [
        EmbeddingMonitor(None, "epoch", input="views", metrics=("rankme", "lidar")),
        EmbeddingMonitor(None, "win", input="views", every_n_steps=4),
    ]
    logged = Logged()
    checkpoints = ModelCheckpoint(dirpath=root, every_n_train_steps=EVERY, save_top_k=-1)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=EPOCHS,
        callbacks=[*monitors, logged, checkpoints],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(Encoder(), ResumableViews(), ckpt_path=ckpt_path)
    return logged.values


def _logged_at(step: int, key: str) -> bool:
    """Whether ``key`` was logged at ``step`` (not an older value still in ``callback_metrics``)."""
    return step % (4 if key.startswith("train/win") else BATCHES) == 0


@pytest.mark.slow
def test_a_lightning_fit_resumed_inside_an_epoch_and_a_window_logs_the_uninterrupted_values(tmp_path):
    whole = _fit(tmp_path / "whole")
    # Step 3: inside epoch 0 and the first window; step 9: inside epoch 1 and the window of steps 9-12.
    for step in (3, 9):
        (checkpoint,) = (tmp_path / "whole").glob(f"*-step={step}.ckpt")
        resumed = _fit(tmp_path / f"resumed{step}", ckpt_path=str(checkpoint))
        after = {key: value for key, value in whole.items() if key[0] > step and _logged_at(*key)}
        assert after, "the resumed part logs something to compare"
        for key, value in after.items():
            assert resumed[key] == pytest.approx(value, rel=1e-5), (step, key)
