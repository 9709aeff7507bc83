"""`ProbeSet`, the plain-torch API (public as `distprobe.loop.ProbeSet`), one job per file.

- `probe_set.py`: `ProbeSet`, its constructors (`ProbeSet.build` from specs) and public methods; each method is a
  short call into one of the files below;
- `build_checks.py`: what `ProbeSet.build` refuses before it builds anything (a single member where a list is
  expected, a wrong ``dp_group`` or ``total_steps``, a schedule with no length, probes sharing a module);
- `members.py`: `Members`, who is in the set: add, remove and look up probes, banks, kNNs, ridge probes and monitors,
  and build the engines sized from the first batch (or a checkpoint) when their configs give no ``in_features``;
- `inputs.py`: how a step's tensors reach each member, and the first batch's checks, decided on every rank at once;
- `training.py`: one micro-batch: the probes as one group, then the banks, the kNN buffers, the ridge statistics and
  the monitors (closing their due windows);
- `side_stream.py`: the GPU side stream the probe work runs on (on by default for one process on CUDA);
- `values.py`: evaluation batches, and every member's metric values with one flat sync for the probes;
- `checkpoint.py`: `state_dict` / `load_state_dict`, keyed by member name.

The files here take the set's `Members` and may use its underscored helpers (its engines built on demand, the state
waiting for them): those are this package's, not the API.
"""

from distprobe.probeset.probe_set import ProbeSet

__all__ = ["ProbeSet"]
