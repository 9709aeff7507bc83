"""Where a probe's features and targets come from: one small interface, picked once at setup (no Lightning).

A probe, bank, kNN or monitor reads its inputs one way for the whole fit:

- `StepFeatures`: keys of the step's outputs or of the batch (dotted paths reach nested keys), or submodules of the
  model whose outputs forward hooks tap (`distprobe.features.tap_inputs.TapInputs`);
- a probe's own labeled data (`distprobe.callbacks.own_data.OwnDataFeatures`, the Lightning side of
  `distprobe.features.own_data.OwnData`): an extra forward of the model on the probe's own batch.

Both give the same thing for a step: one detached-or-not tensor per input name, and the targets. The adapters pick
a source in ``setup`` and never ask again which kind it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn

from distprobe.features.lookup import lookup
from distprobe.features.tap_inputs import TapInputs


class FeatureSource(Protocol):
    """A probe's features and targets for one step."""

    def arm(self) -> None:
        """Prepare for the next forward of the model (taps keep that forward's outputs)."""

    def read(self, outputs: Any, batch: Any) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """One tensor per input name, in order, and the targets (None when the probe has no target)."""

    def release(self) -> None:
        """Let go of the model (hooks, loaders) at the end of the fit."""


class StepFeatures:
    """Features read from the step's outputs or batch, or tapped from submodules of ``model``.

    Args:
        owner: The callback asking (taps are shared by every callback probing ``model``, and dropped with the last).
        name: The probe's name, for error messages.
        inputs: Input names: keys, dotted paths, or submodule specs such as ``"backbone.blocks.8:cls"``.
        target: Key of the targets, or None.
        model: The model whose submodules may be tapped.
    """

    def __init__(self, owner: object, name: str, inputs: Sequence[str], target: str | None, model: nn.Module) -> None:
        self.name = name
        self.inputs = list(inputs)
        self.target = target
        self._owner = owner
        self._model: nn.Module | None = model
        self._taps: TapInputs | None = TapInputs.of(model)
        for spec in self.inputs:
            self._taps.request(owner, spec, probe_name=name)

    def arm(self) -> None:
        """Attach newly requested taps and start a step (idempotent within a step: every callback may call it)."""
        if self._taps is not None and self._model is not None:
            self._taps.arm(self._model)

    def read(self, outputs: Any, batch: Any) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The step's features (a key of the outputs, else of the batch, else the tap) and targets.

        Raises:
            MissingKeyError: naming the probe, the argument and the keys that are there.
        """
        assert self._taps is not None, "read after release"
        features = [self._taps.read(spec, outputs, batch, probe_name=self.name) for spec in self.inputs]
        if self.target is None:
            return features, None
        return features, lookup(self.target, outputs, batch, probe_name=self.name, argument="target")

    def release(self) -> None:
        """Drop this owner's taps (the hooks go with the last owner)."""
        if self._taps is not None:
            self._taps.release(self._owner)
        self._taps = None
        self._model = None
