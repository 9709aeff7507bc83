"""`TapInputs`: the feature taps of one model, shared by every probe that reads it (torch only).

Used through `distprobe.features.source.StepFeatures`, which a Lightning callback builds at ``setup``; it calls:

- ``setup``: ``TapInputs.of(pl_module).request(self, spec, probe_name=...)``;
- ``on_train_batch_start`` / ``on_validation_batch_start``: ``.arm(pl_module)`` (idempotent within a step: every
  probe may call it). The first call attaches the hooks: by then ``configure_model`` has built the modules and the
  strategy has wrapped them, which is not yet true at ``setup``; ``trainer.validate`` has no ``on_fit_start``;
- ``on_*_batch_end``: ``.read(spec, outputs, batch, probe_name=...)``;
- ``teardown``: ``.release(self)``; the hooks go when the last callback lets go.

One module gets one hook however many callbacks tap it.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from distprobe.features import TapSet, TapSpec, is_tap_spec
from distprobe.features.lookup import MissingKeyError, lookup
from distprobe.features.names import near_names

_SHARED: weakref.WeakKeyDictionary[nn.Module, TapInputs] = weakref.WeakKeyDictionary()


def forces_tap(spec: str) -> bool:
    """A spec with a pooling suffix (``"backbone.blocks.8:cls"``) is always a tap, never an outputs/batch key."""
    return ":" in spec


class TapInputs:
    """Which probe inputs are submodule taps, and their `TapSet` on the LightningModule.

    Precedence for a bare name such as ``"backbone"``: a key of the step's outputs, then of the batch, then a
    submodule of that name. Existing configurations keep reading their keys; a name with a pooling suffix is
    always a tap.
    """

    def __init__(self) -> None:
        self.taps = TapSet()
        self._requests: dict[int, tuple[object, list[tuple[str, str | None]]]] = {}
        self._resolved = False

    @classmethod
    def of(cls, pl_module: nn.Module) -> TapInputs:
        """The instance shared by every callback probing ``pl_module``."""
        shared = _SHARED.get(pl_module)
        if shared is None:
            shared = _SHARED[pl_module] = cls()
        return shared

    def request(self, owner: object, spec: str, *, probe_name: str | None = None) -> None:
        """Ask for ``spec`` as a tap if it names a submodule, decided when the hooks attach.

        Raises:
            ValueError: at once for a malformed pooling suffix.
        """
        if forces_tap(spec):
            TapSpec.parse(spec, probe_name=probe_name)
        _, specs = self._requests.setdefault(id(owner), (owner, []))
        if (spec, probe_name) not in specs:
            specs.append((spec, probe_name))
        self._resolved = False

    def arm(self, pl_module: nn.Module) -> None:
        """Attach any newly requested taps to ``pl_module``, then start a step (idempotent until the forward).

        Raises:
            ValueError: when a spec with a pooling suffix names no submodule.
        """
        if not self._resolved:
            self.taps.attach(pl_module)
            for _, specs in self._requests.values():
                for spec, probe_name in specs:
                    if forces_tap(spec) or is_tap_spec(spec, pl_module):
                        self.taps.add(spec, probe_name=probe_name)
            self._resolved = True
        if self.taps.specs:
            self.taps.arm()

    def read(self, spec: str, outputs: Any, batch: Any, *, probe_name: str, argument: str = "input") -> torch.Tensor:
        """The features of ``spec`` for this step: a key of the outputs, else of the batch, else the tap.

        Raises:
            MissingKeyError: when it is none of these, with the submodules that could be meant.
        """
        if forces_tap(spec) and spec in self.taps:
            return self.taps.take(spec)
        try:
            return lookup(spec, outputs, batch, probe_name=probe_name, argument=argument)
        except MissingKeyError as err:
            if spec in self.taps:
                return self.taps.take(spec)
            root = self.taps.root
            names = f" (close names: {near_names(root, spec)})" if root is not None else ""
            raise MissingKeyError(
                f"{err}. An input may also name a submodule of the LightningModule, whose output is then tapped, "
                f"e.g. 'backbone.blocks.8' or 'backbone.blocks.8:cls'{names}"
            ) from None

    def release(self, owner: object) -> None:
        """Drop ``owner``'s requests; remove the hooks when no callback is left."""
        self._requests.pop(id(owner), None)
        self._resolved = False
        if not self._requests:
            self.taps.remove()
            self.taps = TapSet()
            for module, shared in list(_SHARED.items()):
                if shared is self:
                    del _SHARED[module]


def check_input_spec(spec: str, *, probe_name: str) -> None:
    """Reject a malformed pooling suffix when the probe is built, not at the first step.

    Raises:
        ValueError: naming the probe, the argument, the value and the valid forms.
    """
    if isinstance(spec, str) and forces_tap(spec):
        TapSpec.parse(spec, probe_name=probe_name)
