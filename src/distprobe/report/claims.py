"""Which flat logged keys a probe has already claimed: the bookkeeping `distprobe.report.probes` classifies with.

A flat key is any train or eval key that is not a bank head's. Each probe takes its own keys out of the pool
(`take`), so a key is never drawn under two probes, and what is left over belongs to the model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from distprobe import keys
from distprobe.report.readers import Series

Flat = Mapping[str, Series]


def take(flat: Flat, claimed: set[str], logged: str) -> Series:
    """The series of ``logged``, claimed; empty if it was not logged or is another probe's already."""
    if logged in flat and logged not in claimed:
        claimed.add(logged)
        return flat[logged]
    return ()


def unclaimed(flat: Flat, claimed: set[str], name: str | None = None) -> Iterable[keys.LoggedKey]:
    """The parts of every unclaimed key (of ``name``, split at it, when given)."""
    for logged in flat:
        parsed = keys.parse(logged, names=() if name is None else [name])
        if parsed is not None and logged not in claimed:
            yield parsed


def claim_all(flat: Flat, claimed: set[str], name: str) -> None:
    """Every key of ``name``'s is its own, not another probe's (its other metrics, its skipped steps...)."""
    claimed.update(logged for logged in flat if keys.parse(logged, names=[name]) is not None)


def metrics_of(flat: Flat, claimed: set[str], stage: str, name: str) -> set[str]:
    """The probe-wide metrics ``name`` logged at ``stage`` and no probe claimed yet."""
    return {p.metric for p in unclaimed(flat, claimed, name) if p.stage == stage and p.head is None}
