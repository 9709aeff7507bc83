"""Which logged keys belong to which probe: online probes, banks with their heads, kNNs, and the service's results.

Keys are read through `distprobe.keys`, the module the callbacks write them with:

- `OnlineProbe` ``name``: ``train/{name}_loss`` (logging steps), ``train/{name}_loss_epoch``,
  ``train/{name}_skipped_steps``, ``train/{name}_{metric}`` and ``eval/{name}_{metric}``.
- `OnlineProbeBank` ``name``: per head ``train/{name}/{head_id}_loss``, ``{stage}/{name}/{head_id}_{metric}``; bank-wide
  ``train/{name}_loss`` (mean over heads), ``train/{name}_loss_epoch``, ``eval/{name}_best_{metric}`` and
  ``eval/{name}_best_head`` (the selected head's index in the bank's order).
- `OnlineKNN` ``name``: ``eval/{name}_top1`` (the first k) and ``eval/{name}_k{K}_top1``.
- `OnlineRidge` ``name``: ``eval/{name}/l2={l2:g}_top1`` per lambda, ``eval/{name}_best_top1`` (the lambda chosen on
  the selection split, on the rest) and ``eval/{name}_best_l2`` (that lambda).

A multi-label bank or kNN is drawn by its macro ``mAP``, a dense bank by its ``mIoU``, where a classifier's
``top1`` would be (`distprobe.report.series.headline_metric`).

A name is an online probe when it logs ``train/{name}_skipped_steps`` or an eval top-k accuracy; the model's own
keys (``train/ssl_loss_epoch``...) belong to no probe and are not reported.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from distprobe import keys
from distprobe.report.claims import claim_all, metrics_of, take, unclaimed
from distprobe.report.curves import BestHead, HeadCurves, HeadOrders, ProbeCurves, ProbeKind
from distprobe.report.fewshot import is_fewshot
from distprobe.report.readers import RunLogs, Series
from distprobe.report.ridge import ridge_curves, ridge_names
from distprobe.report.series import headline_metric, is_top_k, last
from distprobe.report.service_logs import CheckpointResult

# --- classification ---------------------------------------------------------------------------------------------


def _bank_head(logged: str) -> keys.LoggedKey | None:
    """The parts of one bank head's train or eval key, else None."""
    parsed = keys.parse(logged)
    if parsed is None or parsed.stage not in (keys.TRAIN, keys.EVAL) or parsed.head is None:
        return None
    return parsed if keys.parse_head_id(parsed.head) is not None else None


def bank_names(logs: RunLogs) -> list[str]:
    """The banks that logged per-head metrics."""
    return sorted({parsed.probe for parsed in map(_bank_head, logs.scalars) if parsed})


def probes_of(logs: RunLogs, head_orders: HeadOrders | None = None) -> list[ProbeCurves]:
    """Every probe in the logs: online probes, then banks, kNNs, and probes only the service evaluated.

    Args:
        logs: The run's logs.
        head_orders: Per bank, its head ids in the bank's order and where that order was read
            (`distprobe.report.checkpoints.saved_head_orders`): ``eval/{bank}_best_head`` is an index in it. The
            logs keep the ids but not the order (it follows the user's lr and weight-decay lists); without it the
            best head is the one with the highest final eval accuracy.
    """
    bank_heads: dict[str, dict[str, dict[tuple[str, str], Series]]] = {}
    flat: dict[str, Series] = {}
    for logged, series in logs.scalars.items():
        head = _bank_head(logged)
        if head is not None:
            assert head.head is not None  # a bank head's key
            heads = bank_heads.setdefault(head.probe, {})
            heads.setdefault(head.head, {})[(head.stage, head.metric)] = series
        elif logged.startswith((f"{keys.TRAIN}/", f"{keys.EVAL}/")):
            flat[logged] = series
    claimed: set[str] = set()
    probes: list[ProbeCurves] = []
    for name in sorted(bank_heads):
        probes.append(_bank(name, bank_heads[name], flat, claimed, (head_orders or {}).get(name)))
    for name in sorted(ridge_names(flat, claimed)):
        probes.append(ridge_curves(name, flat, claimed))
    for name in sorted(_knn_names(flat, claimed)):
        probes.append(_knn(name, flat, claimed))
    singles = [_probe(name, flat, claimed) for name in sorted(_probe_names(flat, claimed), key=len, reverse=True)]
    probes = sorted(singles, key=lambda p: p.name) + probes
    return _with_checkpoints(probes, logs.checkpoint_results)


def _bank(
    name: str,
    heads: Mapping[str, Mapping[tuple[str, str], Series]],
    flat: Mapping[str, Series],
    claimed: set[str],
    order: tuple[Sequence[str], str] | None,
) -> ProbeCurves:
    metric = headline_metric(m for per_head in heads.values() for (stage, m) in per_head if stage == "eval")
    curves = tuple(
        HeadCurves(
            head_id=head_id,
            eval_accuracy=values.get(("eval", metric or ""), ()),
            train_accuracy=values.get(("train", metric or ""), ()),
            train_loss=values.get(("train", "loss"), ()),
        )
        for head_id, values in sorted(heads.items())
    )
    probe = _trained(
        name,
        "bank",
        metric,
        flat,
        claimed,
        eval_accuracy=take(flat, claimed, keys.key(keys.EVAL, name, metric or "", head=keys.BEST)),
        heads=curves,
    )
    best_index = take(flat, claimed, keys.key(keys.EVAL, name, keys.BEST_HEAD))
    others = sorted({m for per_head in heads.values() for (stage, m) in per_head if stage == "eval"} - {metric})
    other_best = tuple(
        (m, series) for m in others if (series := take(flat, claimed, keys.key(keys.EVAL, name, m, head=keys.BEST)))
    )
    claim_all(flat, claimed, name)  # skipped steps, bad batches
    return dataclasses.replace(probe, best_head=_best_head(probe, best_index, order), other_best=other_best)


def _trained(
    name: str, kind: ProbeKind, metric: str | None, flat: Mapping[str, Series], claimed: set[str], **curves: Any
) -> ProbeCurves:
    """A trained probe's or bank's curves: the train loss per step and per epoch, which both log under one key."""
    return ProbeCurves(
        name=name,
        kind=kind,
        headline_metric=metric,
        train_loss=take(flat, claimed, keys.key(keys.TRAIN, name, keys.LOSS)),
        train_loss_epoch=take(flat, claimed, keys.key(keys.TRAIN, name, keys.LOSS_EPOCH)),
        **curves,
    )


def _best_head(bank: ProbeCurves, best_index: Series, order: tuple[Sequence[str], str] | None) -> BestHead | None:
    if not bank.heads:
        return None
    final = last(best_index)
    logged = sorted(h.head_id for h in bank.heads)
    best_key = keys.key(keys.EVAL, bank.name, keys.BEST_HEAD)
    if final is None:
        why_not = f"no {best_key} was logged"
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
                    f"selected by the bank at its last validation (step {step}): {best_key} = "
                    f"{int(value)}, the head at that index in the bank's order saved in {source}"
                ),
                selected_by_bank=True,
            )
        why_not = f"its last {best_key}, {value}, is not an index of its {len(ids)} heads"

    def final_accuracy(head: HeadCurves) -> float:
        point = last(head.eval_accuracy)
        return point[1] if point is not None and math.isfinite(point[1]) else -math.inf

    top = max(bank.heads, key=final_accuracy)
    return BestHead(
        head_id=top.head_id,
        rule=(
            f"the highest final eval {bank.headline_metric} among the heads (the bank's own selection, "
            f"{best_key}, could not be mapped to a head id: {why_not})"
        ),
        selected_by_bank=False,
    )


def _knn_names(flat: Mapping[str, Series], claimed: set[str]) -> set[str]:
    """Names with an eval ``k{K}`` head."""
    return {p.probe for p in unclaimed(flat, claimed) if p.stage == keys.EVAL and p.head and keys.knn_k(p.head)}


def _knn(name: str, flat: Mapping[str, Series], claimed: set[str]) -> ProbeCurves:
    found = [p for p in unclaimed(flat, claimed, name) if p.stage == keys.EVAL and keys.knn_k(p.head or "")]
    metric = headline_metric(p.metric for p in found) or "top1"  # top1; a multi-label kNN's mAP
    heads: dict[int, Series] = {}
    for parsed in found:
        k = keys.knn_k(parsed.head or "")
        if k is not None and parsed.metric == metric:
            heads[k] = take(flat, claimed, parsed.format())
    return ProbeCurves(
        name=name,
        kind="knn",
        headline_metric=metric,
        eval_accuracy=take(flat, claimed, keys.key(keys.EVAL, name, metric)),
        heads=tuple(HeadCurves(keys.knn_head(k), eval_accuracy=heads[k]) for k in sorted(heads)),
    )


def _probe_names(flat: Mapping[str, Series], claimed: set[str]) -> set[str]:
    """Names that logged skipped steps (every OnlineProbe does) or an eval top-k accuracy."""
    names = set()
    for parsed in unclaimed(flat, claimed):
        if parsed.head is not None:
            continue
        if (parsed.stage == keys.TRAIN and parsed.metric == keys.SKIPPED_STEPS) or (
            parsed.stage == keys.EVAL and is_top_k(parsed.metric)
        ):
            names.add(parsed.probe)
    return names


def _probe(name: str, flat: Mapping[str, Series], claimed: set[str]) -> ProbeCurves:
    logged = metrics_of(flat, claimed, keys.EVAL, name) or metrics_of(flat, claimed, keys.TRAIN, name)
    metric = headline_metric(logged)
    probe = _trained(
        name,
        "probe",
        metric,
        flat,
        claimed,
        eval_accuracy=take(flat, claimed, keys.key(keys.EVAL, name, metric or "")),
        train_accuracy=take(flat, claimed, keys.key(keys.TRAIN, name, metric or "")),
    )
    # Longer names are classified first: the rest of `name_*` is this probe's (its other metrics, skipped steps).
    claim_all(flat, claimed, name)
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
        metric = headline_metric(r.metric for r in rows if r.metric != keys.SELECTED)
        out.append(ProbeCurves(name=name, kind="checkpoints", headline_metric=metric, checkpoints=rows))
    return out


def _heads(probe: ProbeCurves) -> set[str]:
    """The heads of the service's results for the headline metric; few-shot heads are drawn apart (`fewshot`)."""
    return {r.head for r in probe.checkpoints if r.metric == probe.headline_metric and not is_fewshot(r.head)}


def checkpoint_columns(probe: ProbeCurves) -> list[str]:
    """The service's headline heads of a probe: ``best`` (a bank's selected head), then each kNN ``k``, by k."""
    heads = _heads(probe)
    columns = [keys.BEST] if keys.BEST in heads else []
    return columns + [keys.knn_head(k) for k in sorted(k for k in map(keys.knn_k, heads) if k is not None)]


def checkpoint_heads(probe: ProbeCurves) -> list[str]:
    """A bank's (or a ridge's) heads among the service's results: neither ``best``, a kNN ``k`` nor few-shot."""
    heads = _heads(probe)
    return sorted(h for h in heads if h != keys.BEST and keys.knn_k(h) is None)
