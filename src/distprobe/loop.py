"""The plain-torch API: a set of probes trained from your own loop, beside any backbone wrapper (no Lightning).

`ProbeSet` is a thin layer over the engine (`distprobe.engine.Probe`): it builds one probe per spec, routes named
features and targets to each probe, runs the collective first-batch checks, and keys checkpoints by probe name. Its
code lives in `distprobe.probeset`, one job per file; the spec types come from `distprobe.routing`.

Example:
    >>> import torch
    >>> from torch import nn
    >>> probes = ProbeSet.build([{"name": "linear", "probe": nn.Linear(8, 3), "optimizer": "SGD"}])
    >>> losses = probes.step(torch.randn(4, 8), torch.tensor([0, 1, 2, 0]))
    >>> sorted(losses)
    ['linear']
"""

from __future__ import annotations

from distprobe.probeset import ProbeSet
from distprobe.routing import ROUTING_KEYS, BankSpec, ProbeSpec, Tensors, pick, to_bank_spec, to_spec

__all__ = ["ROUTING_KEYS", "BankSpec", "ProbeSet", "ProbeSpec", "Tensors", "pick", "to_bank_spec", "to_spec"]
