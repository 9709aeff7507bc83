"""Evaluation batches and metric values of a `ProbeSet`'s members, reduced over the data-parallel group.

Every probe's metric states go through one flat sync (`distprobe.metrics.flat_sync.compute_synced`), not one
collective per state; each bank, kNN and ridge probe computes its own, and the embedding monitors theirs together
(one flat all-reduce for all of them). Keys are the logged names (`distprobe.keys`).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any

import torch

from distprobe import keys
from distprobe.bank.metrics_set import logged_keys
from distprobe.engine.probe import merge
from distprobe.metrics.flat_sync import compute_synced
from distprobe.monitors.member import compute_monitors
from distprobe.probeset.inputs import bank_inputs, knn_inputs, monitor_inputs, probe_inputs, ridge_inputs
from distprobe.probeset.members import Members
from distprobe.routing import Tensors


def train_values(members: Members, names: Iterable[str] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Each named probe's, bank's, ridge probe's and monitor's train metrics since the last reset (all when None).

    A monitor with ``every_n_steps`` gives its values at each window's close instead (`ProbeSet.train`). The
    probes' and banks' counts of later batches of other shapes than the first (``bad_batches/wrong_shape``,
    `distprobe.engine.shapes`) ride in the probes' flat sync.
    """
    everyone = list(members.probes) + list(members.banks) + list(members.ridges) + list(members.monitors)
    wanted = everyone if names is None else list(names)
    probes = [name for name in wanted if name in members.probes]
    banks = [name for name in wanted if name in members.banks]
    collections = [[*members.probes[n].train_collections(), members.probes[n].batch_shapes.counts] for n in probes]
    flat = [c for member in collections for c in member] + [members.banks[n].batch_shapes.counts for n in banks]
    computed = iter(compute_synced(flat, members.dp_group) if flat else [])
    values = {name: merge([next(computed) for _ in member]) for name, member in zip(probes, collections, strict=True)}
    for name in banks:
        bank_values = {**members.banks[name].compute_train_metrics(), **next(computed)}
        values[name] = logged_keys(bank_values, "train", name)
    for name in (n for n in wanted if n in members.ridges):
        values[name] = keys.absolute_keys(members.ridges[name].compute_train_metrics(), keys.TRAIN, name)
    values.update(_monitor_values(members, wanted, "train"))
    return values


def skipped_steps(members: Members) -> dict[str, torch.Tensor]:
    """Each probe's and built bank's skipped optimizer steps so far (a bank's: summed over its heads), by logged key.

    The run-long counts the Lightning callbacks log at every step; the same on every rank, so no collective.
    """
    counts = {name: probe.skipped_steps for name, probe in members.probes.items()}
    counts.update({name: bank.skipped_steps.sum() for name, bank in members.banks.items()})
    return {keys.key(keys.TRAIN, name, keys.SKIPPED_STEPS): count.float() for name, count in counts.items()}


def _monitor_values(members: Members, wanted: list[str], stage: str) -> dict[str, dict[str, torch.Tensor]]:
    """The named monitors' values of ``stage`` (those computed per epoch), with one flat all-reduce."""
    monitors = [members.monitors[n] for n in wanted if n in members.monitors and members.monitors[n].per_epoch(stage)]
    computed = compute_monitors(monitors, stage) if monitors else []
    return {monitor.name: value for monitor, value in zip(monitors, computed, strict=True)}


def eval_values(members: Members, names: Iterable[str] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Each named member's eval metrics (all when None); resets nothing."""
    everyone = list(members.probes) + list(members.banks) + list(members.knns) + list(members.ridges)
    wanted = everyone + list(members.monitors) if names is None else list(names)
    probes = [name for name in wanted if name in members.probes and len(members.probes[name].metrics.val)]
    computed = compute_synced([members.probes[name].metrics.val for name in probes], members.dp_group) if probes else []
    values: dict[str, dict[str, torch.Tensor]] = {name: {} for name in wanted if name in members.probes}
    values.update(zip(probes, computed, strict=True))
    for name in (n for n in wanted if n in members.banks):
        values[name] = logged_keys(members.banks[name].compute_eval_metrics(), "eval", name)
    for name in (n for n in wanted if n in members.knns):
        values[name] = keys.absolute_keys(members.knns[name].compute_eval_metrics(), keys.EVAL, name)
    for name in (n for n in wanted if n in members.ridges):
        values[name] = keys.absolute_keys(members.ridges[name].compute_eval_metrics(), keys.EVAL, name)
    values.update(_monitor_values(members, wanted, "val"))
    return values


def evaluate_batch(
    members: Members, features: Tensors, targets: Tensors, num_valid: int | None, positions: Any = None
) -> dict[str, torch.Tensor]:
    """Update every member's eval metrics with one batch; return each member's predictions by name.

    ``positions`` (the samples' indices in the validation set) key the banks' and ridge probes' selection split;
    None: each one's running count since the evaluation began (`distprobe.bank.selection.global_positions`).
    """
    num_valid = checked_num_valid(num_valid, features)
    positions = checked_positions(positions, features)
    preds = {
        name: members.probes[name].eval_step(x, y, num_valid)
        for name, (x, y) in probe_inputs(members, features, targets).items()
    }
    for name, bank in members.banks.items():
        xs, y = bank_inputs(members, name, features, targets)
        preds[name] = bank.eval_step(xs, y, num_valid, positions)
    for name, knn in members.knns.items():  # (B, len(k)) predictions, one column per k
        x, y = knn_inputs(members, name, features, targets)
        preds[name] = knn.eval_step(x, y, num_valid)
    for name, ridge in members.ridges.items():  # (B, len(l2)) predictions, one column per lambda
        if not ridge.solved:  # the first evaluation batch after training: one all-reduce, one solve
            ridge.start_eval_epoch()
        x, y = ridge_inputs(members, name, features, targets)
        ridge_preds = ridge.eval_step(x, y, num_valid, positions)  # None before any training sample
        if ridge_preds is not None:
            preds[name] = ridge_preds
    for name, monitor in members.monitors.items():  # no predictions
        if monitor.watches("val"):
            monitor.update("val", *monitor_inputs(members, name, features, targets), num_valid=num_valid)
    return preds


def checked_num_valid(num_valid: Any, features: Tensors) -> int | None:
    """``num_valid`` as an int between 0 and the batch size of every feature tensor (None: the whole batch).

    A 0-dim integer tensor is read once on the host (it is a count the loop already knows).

    Raises:
        ValueError: naming the argument, the value, the batch size it exceeds and what it means.
    """
    if num_valid is None:
        return None
    sizes = _batch_sizes(features)
    try:
        count = None if isinstance(num_valid, bool) else operator.index(num_valid)
    except TypeError:
        count = None
    if count is None or count < 0 or any(count > size for size in sizes.values()):
        raise ValueError(
            f"ProbeSet.evaluate: argument 'num_valid' got {num_valid!r}; expected an int from 0 to the batch size "
            f"(batch sizes by key: {sizes}): the number of real samples at the start of a padded batch, or None "
            "when every sample counts."
        )
    return count


def checked_positions(positions: Any, features: Tensors) -> torch.Tensor | None:
    """``positions`` as a ``(B,)`` integer tensor, B the batch size of every feature tensor (None: each member counts).

    A list or tuple of ints is made a tensor; no value is read on the host.

    Raises:
        ValueError: naming the argument, what it got, the batch sizes and what it means.
    """
    if positions is None:
        return None
    tensor = torch.tensor(positions) if isinstance(positions, (list, tuple)) and _all_ints(positions) else positions
    sizes = _batch_sizes(features)
    if not (
        isinstance(tensor, torch.Tensor)
        and tensor.ndim == 1
        and tensor.dtype in _INTEGER_DTYPES
        and all(tensor.shape[0] == size for size in sizes.values())
    ):
        got = f"shape {tuple(tensor.shape)}, {tensor.dtype}" if isinstance(tensor, torch.Tensor) else repr(positions)
        raise ValueError(
            f"ProbeSet.evaluate: argument 'positions' got {got}; expected a 1-D integer tensor (or list of ints) with "
            f"one entry per sample of the batch (batch sizes by key: {sizes}): each sample's index in the validation "
            "set, such as the indices your DistributedSampler dealt this batch; or None for the running count."
        )
    return tensor


_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _all_ints(values: Any) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) for v in values)


def _batch_sizes(features: Tensors) -> dict[str, int]:
    """The batch size of each feature tensor, by key (``features`` for a lone tensor)."""
    batches = {"features": features} if isinstance(features, torch.Tensor) else dict(features)
    return {key: int(x.shape[0]) for key, x in batches.items() if isinstance(x, torch.Tensor) and x.ndim > 0}


def reset_train(members: Members) -> None:
    """Clear every probe's and bank's accumulated train metrics and mean losses, and the monitors' epoch sums."""
    for probe in members:
        probe.reset_train_metrics()
    for bank in members.banks.values():
        bank.reset_train_metrics()
    for monitor in members.monitors.values():
        if monitor.per_epoch("train"):  # a windowed monitor starts anew at each window's close
            monitor.reset("train")


def reset_eval(members: Members) -> None:
    """Clear every probe's eval metrics, and start each bank's next evaluation."""
    for probe in members:
        probe.metrics.val.reset()
    for bank in members.banks.values():
        bank.start_eval_epoch()  # the next evaluation's samples count from position 0 again
    for monitor in members.monitors.values():
        monitor.reset("val")
