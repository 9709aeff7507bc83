"""The launcher with submitit's local and debug executors: real processes, a real gloo group, a real requeue.

The training is the demo's (`distprobe.demo:train`: SimCLR on digits with a linear and an MLP online probe).
Preemption here: SIGUSR2 goes to rank 1's process only. Rank 1 raises the flag, the ranks decide together at the
next step, both save, and rank 0 (which never saw the signal) hands over to submitit, whose local executor restarts
both tasks (exit status 144). The resumed run must end with the probe weights of an uninterrupted one.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from launch_helpers import DEMO, DEMO_ARGS, STEPS, max_probe_difference, wait_for_progress
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from distprobe.cluster import ClusterConfig, PreemptionCheckpoint, PreemptionSignal, last_checkpoint, submit

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_local_two_tasks_get_the_torch_distributed_environment(tmp_path):
    job = submit(
        "distprobe.cluster.smoke:environment",
        ClusterConfig(cluster="local", tasks_per_node=2, folder=str(tmp_path / "%j")),
    )
    results = job.results()
    assert [(r["rank"], r["world_size"], r["local_rank"]) for r in results] == [(0, 2, 0), (1, 2, 1)]
    assert [(r["dist_rank"], r["dist_world_size"]) for r in results] == [(0, 2), (1, 2)]
    assert [r["rank_sum"] for r in results] == [1, 1]  # the gloo all-reduce went through


def _task_pids_by_rank(controller_pid: int) -> dict[int, int]:
    children = Path(f"/proc/{controller_pid}/task/{controller_pid}/children").read_text().split()
    pids = {}
    for pid in map(int, children):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        for entry in environ:
            if entry.startswith(b"SUBMITIT_LOCAL_GLOBALID="):
                pids[int(entry.split(b"=", 1)[1])] = pid
    return pids


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the task processes through /proc (Linux)")
def test_local_preemption_of_one_rank_checkpoints_all_requeues_and_resumes(tmp_path, reference_weights):
    config = ClusterConfig(cluster="local", tasks_per_node=2, folder=str(tmp_path / "%j"))
    job = submit(DEMO, config, **DEMO_ARGS, step_delay_s=0.2)
    folder = Path(job.paths.folder)
    wait_for_progress(folder, 5, job)
    pids = _task_pids_by_rank(job._process.pid)  # the controller submitit started for this job
    os.kill(pids[1], signal.SIGUSR2)
    results = job.results()
    checkpoint = last_checkpoint(folder / "checkpoints")
    assert checkpoint is not None, "no complete preemption checkpoint"
    step = int(Path(checkpoint).stem.split("-")[1])
    assert 5 < step < STEPS, f"the checkpoint is not mid-run: step {step}"
    assert all(r["resumed_from"] == checkpoint for r in results), "the requeued tasks did not resume from it"
    assert [r["global_step"] for r in results] == [STEPS, STEPS]
    assert max_probe_difference(results[0]["probe_weights"], reference_weights) <= 1e-6
    assert results[0]["probe_weights"] == results[1]["probe_weights"]


def test_debug_executor_runs_the_demo_in_this_process(tmp_path):
    job = submit(DEMO, ClusterConfig(cluster="debug", folder=str(tmp_path / "%j")), epochs=1, limit_train_batches=3)
    [result] = job.results()
    assert (result["rank"], result["world_size"], result["global_step"]) == (0, 1, 3)
    assert result["resumed_from"] is None
    assert {"eval/linear_top1", "eval/mlp_top1"} <= result["final"].keys()
    assert Path(result["log_dir"], "metrics.csv").is_file()
    assert Path(result["log_dir"]).is_relative_to(Path(job.paths.folder))
    # The task's environment and signal handler do not leak into the caller.
    assert "DISTPROBE_CHECKPOINT_DIR" not in os.environ
    assert signal.getsignal(signal.SIGUSR2) in (signal.SIG_DFL, None)


class _Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        features, target = batch
        return nn.functional.mse_loss(self.layer(features), target)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _SignalAtStep(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 4:
            os.kill(os.getpid(), signal.SIGUSR2)


def test_preemption_checkpoint_saves_and_stops_in_one_process(tmp_path):
    """PreemptionCheckpoint(requeue=False) in a plain Trainer: the signal, the save at the next step, the stop."""
    preemption = PreemptionSignal()
    callback = PreemptionCheckpoint(tmp_path / "ckpt", requeue=False, preemption=preemption)
    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=[callback, _SignalAtStep()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    data = DataLoader(TensorDataset(torch.randn(32, 4), torch.randn(32, 1)), batch_size=4)
    trainer.fit(_Tiny(), data)
    # The signal came after the callback's check at step 4: the save is at the next step boundary.
    assert trainer.global_step == 5, "training did not stop at the step after the signal"
    assert last_checkpoint(tmp_path / "ckpt") == str(tmp_path / "ckpt" / "preempt-000000005.ckpt")
    assert not preemption.installed, "the callback must remove the handler it installed"
    assert signal.getsignal(signal.SIGUSR2) in (signal.SIG_DFL, None)
