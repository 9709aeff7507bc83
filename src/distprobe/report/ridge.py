"""An `OnlineRidge`'s curves from its logged keys: one eval curve per lambda, the chosen lambda and its value.

`OnlineRidge` ``name`` logs ``eval/{name}/l2={l2:g}_top1`` for each lambda (every validation sample),
``eval/{name}_best_top1`` (the lambda chosen on the selection split, scored on the rest), ``eval/{name}_best_l2``
(that lambda) and ``train/{name}_bad_batches/{reason}``. Heads are read through `distprobe.keys` (`keys.ridge_l2`).
"""

from __future__ import annotations

import dataclasses
import math

from distprobe import keys
from distprobe.report.claims import Flat, claim_all, take, unclaimed
from distprobe.report.curves import BestHead, HeadCurves, ProbeCurves
from distprobe.report.series import headline_metric, last

#: Relative tolerance between a logged lambda and a lambda head's ``%g`` value (6 significant digits); logs written
#: before 2026-12-07 hold the lambda in float32.
_L2_TOLERANCE = 1e-5


def ridge_names(flat: Flat, claimed: set[str]) -> set[str]:
    """Names with an eval ``l2={l2:g}`` head."""
    found = (p for p in unclaimed(flat, claimed) if p.stage == keys.EVAL and p.head)
    return {p.probe for p in found if p.head and keys.ridge_l2(p.head) is not None}


def ridge_curves(name: str, flat: Flat, claimed: set[str]) -> ProbeCurves:
    """The ridge ``name``: its lambdas by increasing value, ``best_*`` on the report split, the chosen lambda."""
    per_head: dict[str, dict[str, str]] = {}
    for parsed in list(unclaimed(flat, claimed, name)):
        if parsed.stage == keys.EVAL and parsed.head and keys.ridge_l2(parsed.head) is not None:
            per_head.setdefault(parsed.head, {})[parsed.metric] = parsed.format()
    metric = headline_metric(m for metrics in per_head.values() for m in metrics)
    heads = tuple(
        HeadCurves(head, eval_accuracy=take(flat, claimed, per_head[head][metric]) if metric in per_head[head] else ())
        for head in sorted(per_head, key=lambda h: keys.ridge_l2(h) or 0.0)
    )
    best_l2 = take(flat, claimed, keys.key(keys.EVAL, name, "l2", head=keys.BEST))
    probe = ProbeCurves(
        name=name,
        kind="ridge",
        headline_metric=metric,
        eval_accuracy=take(flat, claimed, keys.key(keys.EVAL, name, metric or "", head=keys.BEST)),
        heads=heads,
        best_l2=best_l2,
    )
    claim_all(flat, claimed, name)  # its bad-batch counts
    return _with_chosen(probe)


def lambda_head(probe: ProbeCurves, l2: float) -> str | None:
    """The head of ``probe`` whose lambda is ``l2`` (as logged; in float32 in older logs), or None."""
    for head in probe.heads:
        value = keys.ridge_l2(head.head_id)
        if value is not None and math.isclose(value, l2, rel_tol=_L2_TOLERANCE, abs_tol=0.0):
            return head.head_id
    return None


def _with_chosen(probe: ProbeCurves) -> ProbeCurves:
    final = last(probe.best_l2)
    if final is None:
        return probe
    step, value = final
    head = lambda_head(probe, value)
    if head is None:
        return probe
    logged = keys.key(keys.EVAL, probe.name, "l2", head=keys.BEST)
    rule = f"chosen by the ridge on its selection split at its last validation (step {step}): {logged} = {value:g}"
    return dataclasses.replace(probe, best_head=BestHead(head_id=head, rule=rule, selected_by_bank=True))
