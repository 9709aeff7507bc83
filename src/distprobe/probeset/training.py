"""One training micro-batch for the members of a `ProbeSet`, in the order every rank issues its collectives.

The probes first, as one `distprobe.engine.ProbeGroup` (one backward, one bucketed all-reduce where their accumulation
windows close together); then each bank's step; then each kNN's buffer takes this rank's samples; then each ridge
probe sums its statistics (started anew after an evaluation, unless its config leaves that to its owner); then each
embedding monitor adds the batch, and the monitors whose ``every_n_steps`` window closes compute their values together
(one flat all-reduce). A bank, kNN or ridge probe without an engine yet is built from this batch's sizes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from distprobe.engine import Probe, ProbeGroup
from distprobe.monitors.member import compute_monitors
from distprobe.probeset.members import Members


def train_members(
    members: Members,
    inputs: Mapping[str, tuple[Any, ...]],
    before_optimizer_step: Callable[[Probe], None] | None,
) -> dict[str, Any]:
    """Train the members named in ``inputs`` on their ``(features, targets)``; return each one's output by name.

    Args:
        members: The set's members.
        inputs: By member name, already routed and checked (see `ProbeSet.train`).
        before_optimizer_step: Called with each probe whose window closes (see `ProbeGroup.train_step`).
    """
    outs: dict[str, Any] = {}
    probes = [name for name in inputs if name in members.probes]
    if probes:
        group = ProbeGroup([members.probes[name] for name in probes])
        outs.update(zip(probes, group.train_step([inputs[n] for n in probes], before_optimizer_step), strict=True))
    for name in (n for n in inputs if n in members.bank_specs):
        xs, y = inputs[name]
        outs[name] = members._bank(name, xs).train_step(xs, y)
    for name in (n for n in inputs if n in members.knn_specs):
        x, y = inputs[name]
        knn = members.knns.get(name) or members._build_knn(name, int(x.shape[1:].numel()))
        knn.update(x, y)
        outs[name] = None
    for name in (n for n in inputs if n in members.ridge_specs):
        x, y = inputs[name]
        ridge = members.ridges.get(name) or members._build_ridge(name, int(x.shape[1:].numel()))
        if ridge.evaluated and ridge.config.reset_statistics == "after_evaluation":  # batches since the last one
            ridge.reset_train()
        ridge.train_step(x, y)
        outs[name] = None
    monitors = [members.monitors[n] for n in inputs if n in members.monitors]
    for monitor in monitors:
        monitor.train_step(*inputs[monitor.name])
        outs[monitor.name] = None
    due = [m for m in monitors if m.window_due()]  # the same on every rank: windows count batches
    for monitor, window in zip(due, compute_monitors(due, "train") if due else [], strict=True):
        monitor.reset("train")
        outs[monitor.name] = window  # the window's values, by logged key
    return outs
