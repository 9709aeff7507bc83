"""The preemption decision on 2 real gloo ranks: a flag raised on one rank, seen by both at the same step.

The check must not sync the host at every step: it goes through `AsyncFlag` (a CPU all-reduce over gloo, posted at
one check and read at the next), never through `strategy.reduce_boolean_decision` (a device all-reduce and an
``.item()`` under NCCL). Here every tensor is on the CPU anyway; what the tests pin down is which collective is
made, on what, and how often.
"""

from __future__ import annotations

import os
import signal
import sys

import lightning.pytorch as pl
import pytest
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from tests.helpers.dist import run_distributed
from tests.helpers.models import Backbone, loader, trainer

from distprobe.cluster import PreemptionCheckpoint, PreemptionSignal
from distprobe.cluster.async_flag import AsyncFlag

pytestmark = pytest.mark.distributed

RAISE_AT = 3
"""The poll (or optimizer step) after which rank 1, and only rank 1, raises its flag."""


def _record_flag_collectives(calls: list[dict]) -> None:
    """Record every ``dist.all_reduce`` that `AsyncFlag` makes: the tensor's device, ``async_op`` and the backend."""
    real = dist.all_reduce

    def recording(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if sys._getframe(1).f_globals.get("__name__") == "distprobe.cluster.async_flag":
            calls.append({"device": tensor.device.type, "async_op": async_op, "backend": str(dist.get_backend(group))})
        return real(tensor, op=op, group=group, async_op=async_op)

    dist.all_reduce = recording  # this rank's process only; it ends with the test


def _poll_until_decided(rank, world_size, transient):
    calls: list[dict] = []
    _record_flag_collectives(calls)
    flag = AsyncFlag.build()
    decisions = []
    for poll in range(12):
        raised = rank == 1 and (poll == RAISE_AT if transient else poll >= RAISE_AT)
        decisions.append(flag.poll(raised))
        if decisions[-1]:  # as PreemptionCheckpoint does: it saves and stops
            break
    flag.close()
    return {"decisions": decisions, "calls": calls}


@pytest.mark.parametrize("transient", [False, True], ids=["stays-raised", "raised-for-one-poll"])
def test_a_flag_raised_on_rank_1_is_seen_by_both_ranks_one_poll_later(transient):
    results = run_distributed(_poll_until_decided, 2, transient)
    first = [r["decisions"].index(True) if True in r["decisions"] else None for r in results]
    # Raised after poll RAISE_AT's read, posted at it, read at the next poll: one poll late, the same on both.
    assert first == [RAISE_AT + 1, RAISE_AT + 1], [r["decisions"] for r in results]
    for r in results:
        # The polls before the decision each posted one all-reduce; the deciding poll posts none.
        assert len(r["calls"]) == RAISE_AT + 1
        assert all(c == {"device": "cpu", "async_op": True, "backend": "gloo"} for c in r["calls"]), r["calls"]


def test_outside_torch_distributed_the_flag_is_the_local_one():
    flag = AsyncFlag.build()
    assert [flag.poll(raised) for raised in (False, True, False)] == [False, True, False]
    flag.close()


class _SignalRank1AtStep(pl.Callback):
    """Sends the preemption signal to rank 1's own process after the preemption check of step `RAISE_AT`."""

    def __init__(self):
        self.sent = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_rank == 1 and trainer.global_step == RAISE_AT:
            os.kill(os.getpid(), signal.SIGUSR2)
            self.sent = True


def _fit_with_preemption(rank, world_size, tmp):
    calls: list[dict] = []
    _record_flag_collectives(calls)
    preemption = PreemptionSignal(signal.SIGUSR2)
    callback = PreemptionCheckpoint(os.path.join(tmp, "ckpt"), requeue=False, preemption=preemption)
    sender = _SignalRank1AtStep()
    fit = trainer([callback, sender], max_epochs=1, strategy=DDPStrategy(), devices=world_size, limit_val_batches=0)
    boolean_decisions = []
    real_decision = fit.strategy.reduce_boolean_decision

    def counting(*args, **kwargs):
        boolean_decisions.append(fit.global_step)
        return real_decision(*args, **kwargs)

    fit.strategy.reduce_boolean_decision = counting  # type: ignore[method-assign]
    fit.fit(Backbone(), loader(n=640, batch_size=16))
    return {
        "global_step": fit.global_step,
        "saved": str(callback.saved_path),
        "sent": sender.sent,
        "boolean_decisions": boolean_decisions,
        "calls": calls,
    }


@pytest.mark.slow
def test_lightning_ranks_save_at_the_same_step_without_a_per_step_host_sync(tmp_path):
    results = run_distributed(_fit_with_preemption, 2, str(tmp_path))
    assert [r["sent"] for r in results] == [False, True], "only rank 1 gets the signal"
    # The signal came after step RAISE_AT's check: rank 1 posts it at the next check, both decide at the one after.
    assert [r["global_step"] for r in results] == [RAISE_AT + 2, RAISE_AT + 2]
    assert results[0]["saved"] == results[1]["saved"] == str(tmp_path / "ckpt" / f"preempt-{RAISE_AT + 2:09d}.ckpt")
    for r in results:
        assert r["boolean_decisions"] == [], "reduce_boolean_decision syncs the host: it must not be called per step"
        # One asynchronous CPU all-reduce per check, steps 1 .. RAISE_AT + 1; none at the deciding step.
        assert len(r["calls"]) == RAISE_AT + 1, r["calls"]
        assert all(c == {"device": "cpu", "async_op": True, "backend": "gloo"} for c in r["calls"]), r["calls"]


def test_check_every_n_steps_polls_only_at_those_steps(tmp_path):
    """In one process no collective is made; the checks happen at multiples of n, the save at the next after it."""
    preemption = PreemptionSignal(signal.SIGUSR2)
    callback = PreemptionCheckpoint(tmp_path / "ckpt", check_every_n_steps=3, requeue=False, preemption=preemption)
    fit = trainer([callback, _SignalAtStepOne()], max_epochs=1)
    fit.fit(Backbone(), loader(n=320, batch_size=16))
    assert fit.global_step == 3
    assert callback.saved_path == tmp_path / "ckpt" / "preempt-000000003.ckpt"
    assert not dist.is_initialized()


class _SignalAtStepOne(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 1:
            os.kill(os.getpid(), signal.SIGUSR2)
