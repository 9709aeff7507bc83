"""A `ProbeSet`'s checkpoint: each member's full state, keyed by its name, so members may come and go between runs.

A bank, kNN or ridge probe whose engine does not exist yet when its state loads is built from the saved sizes, so a
resumed set needs no first batch to have every engine.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from distprobe.probeset.members import Members

# The public module's logger: the name users configure, whichever file of the set logs.
log = logging.getLogger("distprobe.loop")


def state_of(members: Members) -> dict[str, dict[str, Any]]:
    """Each member's state by name (a collective: every rank calls it)."""
    state = {name: probe.state_dict() for name, probe in members.probes.items()}
    state.update({name: bank.state_dict() for name, bank in members.banks.items()})
    state.update({name: knn.state_dict() for name, knn in members.knns.items()})  # rank 0's: every shard
    state.update({name: ridge.state_dict() for name, ridge in members.ridges.items()})  # the group's sums
    state.update({name: monitor.state_dict() for name, monitor in members.monitors.items()})  # where windows fall
    return state


def load_state(members: Members, state: Mapping[str, Mapping[str, Any]]) -> None:
    """Restore each member's state by name; missing members stay fresh, unknown names are ignored with a warning."""
    for name, probe in members.probes.items():
        if name in state:
            probe.load_state_dict(dict(state[name]))
        else:
            log.info("probe '%s': not in the loaded state; it keeps its fresh initial state.", name)
    for name in members.bank_specs:
        if name not in state:
            continue
        if name in members.banks:
            members.banks[name].load_state_dict(dict(state[name]))
        else:  # heads from the saved sizes, so that a resumed set needs no first batch to exist
            members._pending_bank_state[name] = state[name]
            members._build_bank(name, dict(state[name]["in_features"]))
    for specs, engines, pending, build in members._sized_kinds():
        for name in (n for n in specs if n in state):
            if name in engines:
                engines[name].load_state_dict(dict(state[name]))
            else:  # a kNN's buffer (each rank takes its own shard back), a ridge's statistics: the saved size
                pending[name] = state[name]
                build(name, int(state[name]["in_features"]))
    extra = sorted(set(state) - set(members.probes) - set(members.bank_specs) - set(members.knn_specs))
    for name in (n for n in members.monitors if n in state):
        members.monitors[name].load_state_dict(state[name])
    extra = sorted(set(extra) - set(members.ridge_specs) - set(members.monitors))
    if extra:
        log.warning("ProbeSet.load_state_dict: ignoring state of probes %s that are not in this set.", extra)
