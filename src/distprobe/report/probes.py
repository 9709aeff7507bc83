"""Which logged keys belong to which probe: online probes, banks with their heads, kNNs, and the service's results.

The keys are those the callbacks log (`distprobe.callbacks`):

- `OnlineProbe` ``name``: ``train/{name}_loss`` (logging steps), ``train/{name}_loss_epoch``,
  ``train/{name}_skipped_steps``, ``train/{name}_{metric}`` and ``eval/{name}_{metric}``.
- `OnlineProbeBank` ``name``: per head ``train/{name}/{head_id}_loss``, ``{stage}/{name}/{head_id}_{metric}``; bank-wide
  ``train/{name}_loss`` (mean over heads), ``train/{name}_loss_epoch``, ``eval/{name}_best_{metric}`` and
  ``eval/{name}_best_head`` (the selected head's index in the bank's order).
- `OnlineKNN` ``name``: ``eval/{name}_top1`` (the first k) and ``eval/{name}_k{K}_top1``.

A name is an online probe when it logs ``train/{name}_skipped_steps`` or an eval top-k accuracy; the model's own
keys (``train/ssl_loss_epoch``...) belong to no probe and are not reported.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from distprobe.report.readers import RunLogs, Series
from distprobe.report.series import accuracy_metric, last
from distprobe.report.service_logs import CheckpointResult

ProbeKind = Literal["probe", "bank", "knn", "checkpoints"]
HeadOrders = Mapping[str, tuple[Sequence[str], str]]
"""Per bank name: its head ids in the bank's order, and where that order was read."""

_BANK_HEAD_KEY = re.compile(
    r"^(?P<stage>train|eval)/(?P<bank>[^/]+)/(?P<head>.+/lr=[^/]+/wd=[^/]+/norm=(?:none|bn))_(?P<metric>[^/]+)$"
)
_FLAT_KEY = re.compile(r"^(?P<stage>train|eval)/(?P<rest>[^/]+)$")
_KNN_KEY = re.compile(r"^(?P<name>.+)_(?P<head>k\d+)_(?P<metric>top\d+)$")
_TOP_K = re.compile(r"^top\d+$")
_KNN_HEAD = re.compile(r"^k(\d+)$")


@dataclass(frozen=True)
class HeadCurves:
    """One head of a bank (or one k of a kNN)."""

    head_id: str
    """``embedding/lr=0.01/wd=0/norm=none`` in a bank, ``k20`` in a kNN."""
    eval_accuracy: Series = ()
    """Its accuracy on all validation samples."""
    train_accuracy: Series = ()
    """Its accuracy on the train epoch's batches."""
    train_loss: Series = ()
    """Its train epoch's mean loss."""


@dataclass(frozen=True)
class BestHead:
    """A bank's best head and the rule that picked it."""

    head_id: str
    """The head's id."""
    rule: str
    """How it was chosen, in words (for the summary)."""
    selected_by_bank: bool
    """True: the bank's own selection (``best_head``); False: the highest final eval accuracy among the heads."""


@dataclass(frozen=True)
class ProbeCurves:
    """Everything the report shows of one probe."""

    name: str
    """The probe's name."""
    kind: ProbeKind
    """``probe``, ``bank``, ``knn``, or ``checkpoints`` (evaluated by the probing service only)."""
    accuracy_metric: str | None
    """The metric drawn as accuracy: ``top1`` when logged, else another top-k or ``acc*`` metric."""
    train_loss: Series = ()
    """Train loss on logging steps (a bank's: the mean over its heads)."""
    train_loss_epoch: Series = ()
    """Train loss, the epoch's mean."""
    eval_accuracy: Series = ()
    """A probe's eval accuracy; a bank's selected head's on the report split (``best_*``); a kNN's first k's."""
    train_accuracy: Series = ()
    """A probe's train accuracy."""
    heads: tuple[HeadCurves, ...] = ()
    """A bank's heads, or a kNN's k's."""
    best_head: BestHead | None = None
    """A bank's best head."""
    checkpoints: tuple[CheckpointResult, ...] = ()
    """The probing service's results for this name."""

    @property
    def has_loss(self) -> bool:
        """Whether any train loss was logged (a kNN has none)."""
        return bool(self.train_loss or self.train_loss_epoch or any(h.train_loss for h in self.heads))

    def head(self, head_id: str) -> HeadCurves | None:
        """The head with that id, if logged."""
        return next((h for h in self.heads if h.head_id == head_id), None)


# --- classification ---------------------------------------------------------------------------------------------


def bank_names(logs: RunLogs) -> list[str]:
    """The banks that logged per-head metrics."""
    return sorted({m["bank"] for m in map(_BANK_HEAD_KEY.match, logs.scalars) if m})


def probes_of(logs: RunLogs, head_orders: HeadOrders | None = None) -> list[ProbeCurves]:
    """Every probe in the logs: online probes, then banks, kNNs, and probes only the service evaluated.

    Args:
        logs: The run's logs.
        head_orders: Per bank, its head ids in the bank's order and where that order was read
            (`distprobe.report.checkpoints.saved_head_orders`): ``eval/{bank}_best_head`` is an index in it. The
            logs keep the ids but not the order (it follows the user's lr and weight-decay lists); without it the
            best head is the one with the highest final eval accuracy.
    """
    scalars = logs.scalars
    bank_heads: dict[str, dict[str, dict[tuple[str, str], Series]]] = {}
    flat: dict[str, Series] = {}
    for key, series in scalars.items():
        match = _BANK_HEAD_KEY.match(key)
        if match:
            heads = bank_heads.setdefault(match["bank"], {})
            heads.setdefault(match["head"], {})[(match["stage"], match["metric"])] = series
        elif _FLAT_KEY.match(key):
            flat[key] = series
    claimed: set[str] = set()
    probes: list[ProbeCurves] = []
    for name in sorted(bank_heads):
        probes.append(_bank(name, bank_heads[name], flat, claimed, (head_orders or {}).get(name)))
    for name in sorted(_knn_names(flat, claimed)):
        probes.append(_knn(name, flat, claimed))
    singles = [_probe(name, flat, claimed) for name in sorted(_probe_names(flat, claimed), key=len, reverse=True)]
    probes = sorted(singles, key=lambda p: p.name) + probes
    return _with_checkpoints(probes, logs.checkpoint_results)


def _take(flat: Mapping[str, Series], claimed: set[str], key: str) -> Series:
    if key in flat and key not in claimed:
        claimed.add(key)
        return flat[key]
    return ()


def _metrics_of(flat: Mapping[str, Series], claimed: set[str], stage: str, name: str) -> set[str]:
    prefix = f"{stage}/{name}_"
    return {k[len(prefix) :] for k in flat if k.startswith(prefix) and k not in claimed}


def _bank(
    name: str,
    heads: Mapping[str, Mapping[tuple[str, str], Series]],
    flat: Mapping[str, Series],
    claimed: set[str],
    order: tuple[Sequence[str], str] | None,
) -> ProbeCurves:
    metric = accuracy_metric(m for per_head in heads.values() for (stage, m) in per_head if stage == "eval")
    curves = tuple(
        HeadCurves(
            head_id=head_id,
            eval_accuracy=values.get(("eval", metric or ""), ()),
            train_accuracy=values.get(("train", metric or ""), ()),
            train_loss=values.get(("train", "loss"), ()),
        )
        for head_id, values in sorted(heads.items())
    )
    probe = ProbeCurves(
        name=name,
        kind="bank",
        accuracy_metric=metric,
        train_loss=_take(flat, claimed, f"train/{name}_loss"),
        train_loss_epoch=_take(flat, claimed, f"train/{name}_loss_epoch"),
        eval_accuracy=_take(flat, claimed, f"eval/{name}_best_{metric}"),
        heads=curves,
    )
    best_index = _take(flat, claimed, f"eval/{name}_best_head")
    # The bank's other keys (skipped steps, best_* of other metrics) are its own, not another probe's.
    claimed.update(k for k in flat if k.startswith((f"train/{name}_", f"eval/{name}_")))
    return dataclasses.replace(probe, best_head=_best_head(probe, best_index, order))


def _best_head(bank: ProbeCurves, best_index: Series, order: tuple[Sequence[str], str] | None) -> BestHead | None:
    if not bank.heads:
        return None
    final = last(best_index)
    logged = sorted(h.head_id for h in bank.heads)
    if final is None:
        why_not = f"no eval/{bank.name}_best_head was logged"
    elif order is None:
        why_not = "the logs keep the head ids but not the bank's order, and no checkpoint of the run holds it"
    elif sorted(order[0]) != logged:
        why_not = f"the head order saved in {order[1]} is another grid than the logged heads"
    else:
        step, value = final
        ids, source = order
        if math.isfinite(value) and value == int(value) and 0 <= int(value) < len(ids):
            return BestHead(
                head_id=ids[int(value)],
                rule=(
                    f"selected by the bank at its last validation (step {step}): eval/{bank.name}_best_head = "
                    f"{int(value)}, the head at that index in the bank's order saved in {source}"
                ),
                selected_by_bank=True,
            )
        why_not = f"its last eval/{bank.name}_best_head, {value}, is not an index of its {len(ids)} heads"

    def final_accuracy(head: HeadCurves) -> float:
        point = last(head.eval_accuracy)
        return point[1] if point is not None and math.isfinite(point[1]) else -math.inf

    top = max(bank.heads, key=final_accuracy)
    return BestHead(
        head_id=top.head_id,
        rule=(
            f"the highest final eval {bank.accuracy_metric} among the heads (the bank's own selection, "
            f"eval/{bank.name}_best_head, could not be mapped to a head id: {why_not})"
        ),
        selected_by_bank=False,
    )


def _knn_names(flat: Mapping[str, Series], claimed: set[str]) -> set[str]:
    names = set()
    for key in flat:
        match = _FLAT_KEY.match(key)
        knn = _KNN_KEY.match(match["rest"]) if match and match["stage"] == "eval" else None
        if knn and key not in claimed:
            names.add(knn["name"])
    return names


def _knn(name: str, flat: Mapping[str, Series], claimed: set[str]) -> ProbeCurves:
    heads: dict[str, Series] = {}
    for key in list(flat):
        match = _KNN_KEY.match(key.removeprefix("eval/")) if key.startswith(f"eval/{name}_") else None
        if match and match["name"] == name and match["metric"] == "top1":
            heads[match["head"]] = _take(flat, claimed, key)
    return ProbeCurves(
        name=name,
        kind="knn",
        accuracy_metric="top1",
        eval_accuracy=_take(flat, claimed, f"eval/{name}_top1"),
        heads=tuple(HeadCurves(k, eval_accuracy=heads[k]) for k in sorted(heads, key=lambda k: int(k[1:]))),
    )


def _probe_names(flat: Mapping[str, Series], claimed: set[str]) -> set[str]:
    names = set()
    for key in flat:
        match = _FLAT_KEY.match(key)
        if match is None or key in claimed:
            continue
        rest = match["rest"]
        if match["stage"] == "train" and rest.endswith("_skipped_steps"):
            names.add(rest.removesuffix("_skipped_steps"))
        elif match["stage"] == "eval" and "_" in rest:
            name, metric = rest.rsplit("_", 1)
            if _TOP_K.match(metric):
                names.add(name)
    return names


def _probe(name: str, flat: Mapping[str, Series], claimed: set[str]) -> ProbeCurves:
    metric = accuracy_metric(_metrics_of(flat, claimed, "eval", name) or _metrics_of(flat, claimed, "train", name))
    probe = ProbeCurves(
        name=name,
        kind="probe",
        accuracy_metric=metric,
        train_loss=_take(flat, claimed, f"train/{name}_loss"),
        train_loss_epoch=_take(flat, claimed, f"train/{name}_loss_epoch"),
        eval_accuracy=_take(flat, claimed, f"eval/{name}_{metric}"),
        train_accuracy=_take(flat, claimed, f"train/{name}_{metric}"),
    )
    # Longer names are classified first: the rest of `name_*` is this probe's (its other metrics, skipped steps).
    claimed.update(k for k in flat if k.startswith((f"train/{name}_", f"eval/{name}_")))
    return probe


def _with_checkpoints(probes: list[ProbeCurves], results: Sequence[CheckpointResult]) -> list[ProbeCurves]:
    by_probe: dict[str, list[CheckpointResult]] = {}
    for result in results:
        by_probe.setdefault(result.probe, []).append(result)
    out = []
    for probe in probes:
        found = tuple(by_probe.pop(probe.name, ()))
        out.append(dataclasses.replace(probe, checkpoints=found) if found else probe)
    for name in sorted(by_probe):
        rows = tuple(by_probe[name])
        metric = accuracy_metric(r.metric for r in rows if r.metric != "selected")
        out.append(ProbeCurves(name=name, kind="checkpoints", accuracy_metric=metric, checkpoints=rows))
    return out


def checkpoint_columns(probe: ProbeCurves) -> list[str]:
    """The service's headline heads of a probe: ``best`` (a bank's selected head), then each kNN ``k``, by k."""
    heads = {r.head for r in probe.checkpoints if r.metric == probe.accuracy_metric}
    columns = ["best"] if "best" in heads else []
    return columns + sorted((h for h in heads if _KNN_HEAD.match(h)), key=lambda h: int(h[1:]))


def checkpoint_heads(probe: ProbeCurves) -> list[str]:
    """A bank's head ids among the service's results (neither ``best`` nor a kNN ``k``)."""
    heads = {r.head for r in probe.checkpoints if r.metric == probe.accuracy_metric}
    return sorted(h for h in heads if h != "best" and not _KNN_HEAD.match(h))
