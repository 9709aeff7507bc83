"""All of a bank's metric states, the train steps' values not yet folded into them, and their logged names.

Train steps keep their ``(K,)`` losses and logits as device tensors and fold them in every few micro-steps (as
`distprobe.engine.deferred` does for a probe): a handful of ops per fold for all K heads. Validation counts each
sample into the selection split or the report split (`distprobe.bank.selection`), never both.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torchmetrics import Metric

from distprobe import keys
from distprobe.bank.config import BankConfig
from distprobe.bank.metrics import HeadLoss, HeadTopK
from distprobe.bank.selection import best_values, choose_best
from distprobe.engine.bad_data import REASONS
from distprobe.engine.collectives import is_distributed, rank_and_world
from distprobe.engine.deferred import DeferredSteps, Folded, add_reasons
from distprobe.metrics.counters import ReasonCounter, mark_updated
from distprobe.metrics.flat_sync import compute_metrics_synced, flat_sync
from distprobe.metrics.shape import per_row

log = logging.getLogger(__name__)

#: Why the best head was not chosen on the selection split, each warned about once per bank (`BankMetrics.choose_best`).
_UNSELECTED = {
    "chosen_on_all": "its validation counted no sample in the selection split (selection_fraction={fraction} of the "
    "samples, by position), so the best head was chosen on every counted sample, the same ones that report it: its "
    "best_* values are biased upwards. Validate on more samples, or raise selection_fraction",
    "none_chosen": "its validation counted no sample at all (none given, or only padding and bad data): no head is "
    "chosen, and best_* and best_head are NaN",
}


def logged_keys(values: Mapping[str, torch.Tensor], stage: str, name: str) -> dict[str, torch.Tensor]:
    """A bank's relative keys as logged (`distprobe.keys.absolute_key`).

    Per head ``{stage}/{name}/{head_id}_{metric}``; the bank-wide values (``best_*``, ``best_head``, ``loss_epoch``,
    ``bad_batches/*``) as ``{stage}/{name}_{key}``.
    """
    return keys.absolute_keys(values, stage, name)


#: The per-head metric of each metric kind a head family may name (`HeadFamily.metric_kind`).
HEAD_METRICS = {"classification": HeadTopK}


class BankMetrics:
    """Per-head train and validation metrics of one bank, with the run-long bad-batch counts."""

    _warned: frozenset[str] = frozenset()
    """The `_UNSELECTED` cases already warned about (an instance's own once set: the kinds' __init__ need not)."""

    def __init__(self, config: BankConfig, num_heads: int, kind: str = "classification") -> None:
        if kind not in HEAD_METRICS:
            raise ValueError(
                f"bank '{config.name}': no per-head metrics of kind {kind!r}; kinds: {sorted(HEAD_METRICS)}"
            )
        metric = HEAD_METRICS[kind]
        self.config = config
        self.num_heads = num_heads
        self.train = {m: metric(num_heads, k) for m, k in config.top_k.items()}
        self.loss = HeadLoss(num_heads)
        self.bad_batches = ReasonCounter(REASONS)
        self.select = {m: metric(num_heads, k) for m, k in config.top_k.items()}
        self.report = {m: metric(num_heads, k) for m, k in config.top_k.items()}
        self.deferred = DeferredSteps(self._fold, lambda: bool(self.train))
        """The train steps' values not yet in the states (`distprobe.engine.deferred`)."""

    def named(self) -> list[tuple[str, Metric]]:
        """Every metric with a stable key (checkpoints key states by it, never by position)."""
        out: list[tuple[str, Metric]] = [(f"train/{m}", v) for m, v in self.train.items()]
        out += [("loss", self.loss), ("bad_batches", self.bad_batches)]
        out += [(f"select/{m}", v) for m, v in self.select.items()]
        out += [(f"report/{m}", v) for m, v in self.report.items()]
        return out

    def to(self, device: torch.device | str) -> BankMetrics:
        """Move every state to ``device``."""
        for _, metric in self.named():
            metric.to(device)
        return self

    def set_process_group(self, group: dist.ProcessGroup | None) -> None:
        """The group torchmetrics would sync over (distprobe's flat sync is given it explicitly)."""
        for _, metric in self.named():
            metric.process_group = group

    def update_eval(
        self, logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor, select: torch.Tensor
    ) -> None:
        """Count a validation batch into the selection split (``select``) or the report split (the others)."""
        for name in self.select:
            self.select[name].fast_update(logits, targets, keep & select)
            self.report[name].fast_update(logits, targets, keep & select.logical_not())

    def compute_eval(self, group: dist.ProcessGroup | None) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """Per-head values over all samples, the best head's on the report split, and the best head's index.

        Logged keys are relative: ``"{head_id}_{metric}"``, ``"best_{metric}"``, ``"best_head"``.
        """
        names = list(self.select)
        if not names:
            return {}, None
        computed = [
            per_row(value, self.num_heads)
            for value in compute_metrics_synced([*self.select.values(), *self.report.values()], group)
        ]
        # Counts, not rates, are summed to get the whole set's accuracy: the states were synced alongside.
        select, report = computed[: len(names)], computed[len(names) :]
        values: dict[str, torch.Tensor] = {}
        heads = self.config.heads()
        whole = self._whole_set(group)
        for name, per_head in zip(names, whole, strict=True):
            for head in heads:
                values[keys.relative_key(name, head=head.head_id)] = per_head[head.index]
        best = self.choose_best(select[0], whole[0])
        reported = dict(zip(names, report, strict=True))
        values.update(best_values(names, best, lambda b: {n: v[b] for n, v in reported.items()}, select[0].device))
        for metric in [*self.select.values(), *self.report.values()]:
            metric.reset()
        return values, best

    def choose_best(self, selection: torch.Tensor, whole: torch.Tensor) -> torch.Tensor | None:
        """The best head by its ``(K,)`` scores on the selection split, else on all samples (`selection.choose_best`).

        ``selection`` and ``whole`` are synced values, so every rank chooses alike; an empty selection split, or an
        empty validation, is warned about once per bank.
        """
        best, fell_back = choose_best(selection, whole)
        case = "chosen_on_all" if best is not None else "none_chosen"
        if fell_back and case not in self._warned:
            self._warned = self._warned | {case}
            why = _UNSELECTED[case].format(fraction=self.config.selection_fraction)
            log.warning("bank '%s': %s (warned once).", self.config.name, why)
        return best

    def _whole_set(self, group: dist.ProcessGroup | None) -> list[torch.Tensor]:
        """Per-head accuracies over both splits, from the summed counts (one more flat sync, at epoch end only)."""
        metrics = [m for name in self.select for m in (self.select[name], self.report[name])]
        if is_distributed(group):
            synced = flat_sync(metrics, group)
            states = [(synced[(id(m), "correct")], synced[(id(m), "total")]) for m in metrics]
        else:
            states = [(m.correct, m.total) for m in metrics]
        out = []
        for i in range(0, len(states), 2):
            (c1, t1), (c2, t2) = states[i], states[i + 1]
            out.append((c1 + c2).double().div(t1 + t2).float())
        return out

    def compute_train(self, group: dist.ProcessGroup | None) -> dict[str, torch.Tensor]:
        """Per-head train metrics and losses, their means over heads, the bad-batch counts; relative keys."""
        self.deferred.fold()
        names = list(self.train)
        computed = compute_metrics_synced([*self.train.values(), self.loss, self.bad_batches], group)
        heads = self.config.heads()
        values: dict[str, torch.Tensor] = {}
        per_heads = [per_row(value, self.num_heads) for value in computed[: len(names) + 1]]
        for name, per_head in zip([*names, keys.LOSS], per_heads, strict=True):
            for head in heads:
                values[keys.relative_key(name, head=head.head_id)] = per_head[head.index]
        values[keys.LOSS_EPOCH] = per_heads[-1].mean()
        for reason, count in computed[-1].items():
            values[keys.bad_batches(reason)] = count
        return values

    def reset_train(self) -> None:
        """A new epoch of train metrics and losses; the bad-batch counts run over the whole training."""
        self.deferred.fold()
        for metric in [*self.train.values(), self.loss]:
            metric.reset()

    def synced_states(self, group: dist.ProcessGroup | None) -> dict[str, dict[str, torch.Tensor]]:
        """Every state reduced over ``group`` (a collective), keyed by metric key and state name."""
        self.deferred.fold()
        named = self.named()
        synced = flat_sync([m for _, m in named], group) if is_distributed(group) else {}
        return {
            key: {
                attr: synced.get((id(metric), attr), getattr(metric, attr)).detach().clone()
                for attr in metric._defaults
            }
            for key, metric in named
        }

    def load_synced_states(self, states: Mapping[str, Any], group: dist.ProcessGroup | None) -> None:
        """Rank 0 of the group loads the group's saved reduction; the others start empty (the sum stays right)."""
        self.deferred.discard()
        for key, metric in self.named():
            metric.reset()
            if rank_and_world(group)[0] != 0:
                continue
            for attr, value in states.get(key, {}).items():
                getattr(metric, attr).copy_(value)
            mark_updated(metric)

    def _fold(self, folded: Folded) -> None:
        """Add the kept train steps' sums to the states: a few ops whatever the number of steps."""
        self.loss.add_sums(folded.loss_total, folded.loss_count)
        add_reasons(self.bad_batches, folded.reasons)
        if folded.predictions is not None:
            for metric in self.train.values():
                metric.fast_update(*folded.predictions)
