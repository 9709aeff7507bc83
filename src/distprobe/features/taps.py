"""Feature taps: a submodule's output captured by a forward hook, detached, for probes (torch only).

A `TapSet` holds the specs of every probe reading one root module. It puts one forward hook on each module it needs
(several specs on one module share it), and per step keeps only what the specs ask for: the pooled tokens, or the
output itself.

Capture rule: after `TapSet.arm` (call it at each step's start), each hooked module keeps its **first** forward only.
An activation-checkpointing recomputation in the backward is therefore not captured again, and a module called
several times per step (multi-crop) gives its first call. The hook returns nothing and touches no parameter: the
model computes exactly what it computes without it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from distprobe.features.names import child_modules, find_module, near_names
from distprobe.features.pooling import TokenPool, concat_features, first_tensor, pool_tokens
from distprobe.features.spec import TapSpec, _owner

PieceKey = tuple[TokenPool | None, int]
"""What one hooked module keeps for one spec: (pool or None for the output as is, prefix tokens)."""


class TapError(RuntimeError):
    """A feature tap used in the wrong order (taken before it was added, attached or armed)."""


class TapNotCapturedError(TapError):
    """The tapped module did not run a forward since the step began."""


def _is_dtensor(x: torch.Tensor) -> bool:
    return callable(getattr(x, "full_tensor", None)) and hasattr(x, "placements")


def _version(x: torch.Tensor) -> int | None:
    """Autograd's version counter of ``x``, None where there is none to read (inference tensors, compiled code)."""
    if torch.compiler.is_compiling():  # a hook traced by torch.compile: reading it would break the graph
        return None
    return None if x.is_inference() else x._version


class FeatureTap:
    """The forward hook on one module: per armed step, the requested pieces of its first output.

    Args:
        module: The module to hook.
        name: Its dotted name, for error messages.
    """

    def __init__(self, module: nn.Module, name: str) -> None:
        self.module = module
        self.name = name
        self._keys: set[PieceKey] = set()
        self._armed = False
        self._captured = False
        self._pieces: dict[PieceKey, torch.Tensor | Exception] = {}
        self._distributed: torch.Tensor | None = None
        self._raw_version: int | None = None
        self.forwards_since_arm = 0
        """Forwards seen since `arm` (the first is kept): 2 for a checkpointed module after the backward."""
        self._handle: Any = module.register_forward_hook(self._hook)

    def want(self, key: PieceKey) -> None:
        """Keep ``key`` from the next captured forward on."""
        self._keys.add(key)

    @property
    def captured(self) -> bool:
        """Whether the module ran a forward since the last `arm`."""
        return self._captured

    def arm(self) -> None:
        """Forget the last step's output; capture the next forward."""
        self._armed = True
        self._captured = False
        self.forwards_since_arm = 0
        self._raw_version = None
        self._pieces = {}
        self._distributed = None

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self._armed:
            return
        self.forwards_since_arm += 1
        if self._captured:
            return
        self._captured = True
        try:
            x = first_tensor(output).detach()
        except TypeError as err:
            self._pieces = dict.fromkeys(self._keys, err)
            return
        if _is_dtensor(x):
            # A tensor-parallel output is gathered and pooled in `piece`, outside the forward: the gather is a
            # collective, which every rank issues there in the same order.
            self._distributed = x
            return
        for key in self._keys:
            self._pieces[key] = self._compute(x, key)

    def _compute(self, x: torch.Tensor, key: PieceKey) -> torch.Tensor | Exception:
        pool, prefix_tokens = key
        if pool is None:
            self._raw_version = _version(x)  # an in-place change after the forward would alter the features
            return x
        try:
            return pool_tokens(x, pool, prefix_tokens)
        except ValueError as err:
            return err

    def piece(self, key: PieceKey) -> torch.Tensor:
        """The captured piece ``key`` (a plain, detached tensor).

        Raises:
            TapNotCapturedError: when the module has not run since `arm`.
            ValueError: when its output cannot be pooled as asked.
        """
        if not self._captured:
            raise TapNotCapturedError(self.name)
        if self._distributed is not None and key not in self._pieces:
            full = self._pieces.get((None, 0))
            if full is None:
                full = self._distributed.full_tensor()  # type: ignore[attr-defined]
                self._pieces[(None, 0)] = full
            self._pieces[key] = self._compute(full, key)  # type: ignore[arg-type]
        value = self._pieces[key]
        if isinstance(value, Exception):
            raise ValueError(str(value))
        if key[0] is None and self._raw_version is not None and _version(value) != self._raw_version:
            raise ValueError(
                f"the output of {self.name!r} was changed in place after its forward (e.g. by a later in-place "
                "activation or residual add), so it no longer holds what the module returned; tap the module "
                "that does the in-place change, or a pooled form (':cls', ':mean'), which is copied at the forward"
            )
        return value

    def remove(self) -> None:
        """Remove the hook and drop the captured output."""
        self._handle.remove()
        self._armed = False
        self._captured = False
        self._pieces = {}
        self._distributed = None


class TapSet:
    """The feature taps of one root module: specs added by probes, one hook per module, arm/take per step.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        >>> taps = TapSet()
        >>> taps.add("0")
        >>> taps.attach(model)
        >>> taps.arm()
        >>> _ = model(torch.randn(2, 4))
        >>> taps.take("0").shape
        torch.Size([2, 8])
        >>> taps.remove()
    """

    def __init__(self) -> None:
        self._specs: dict[str, TapSpec] = {}
        self._owners: dict[str, str | None] = {}
        self._routes: dict[str, list[tuple[FeatureTap, PieceKey]]] = {}
        self._taps: dict[int, FeatureTap] = {}
        self._root: nn.Module | None = None

    def __contains__(self, spec: object) -> bool:
        return spec in self._specs

    @property
    def specs(self) -> list[str]:
        """The specs added, in order."""
        return list(self._specs)

    @property
    def root(self) -> nn.Module | None:
        """The module the hooks are attached to (None when detached)."""
        return self._root

    def add(self, spec: str, *, probe_name: str | None = None) -> None:
        """Add ``spec`` (idempotent); once attached, its hooks go on at once.

        Raises:
            ValueError: for a malformed spec or, once attached, a module path that names no submodule.
        """
        if spec in self._specs:
            return
        parsed = TapSpec.parse(spec, probe_name=probe_name)
        if self._root is not None:
            self._route(parsed, probe_name)
        self._specs[spec] = parsed
        self._owners[spec] = probe_name

    def attach(self, root: nn.Module) -> None:
        """Hook every added spec's modules in ``root`` (moving from another root if attached to one).

        Call it once the modules exist: after ``configure_model`` and the strategy's wrapping, e.g. at fit start.
        """
        if self._root is root:
            return
        if self._root is not None:
            self.remove()
        self._root = root
        try:
            for spec, parsed in self._specs.items():
                self._route(parsed, self._owners[spec])
        except Exception:
            self.remove()
            raise

    def _route(self, spec: TapSpec, probe_name: str | None) -> None:
        assert self._root is not None
        root = self._root

        def missing(why: str) -> ValueError:
            return ValueError(
                f"{_owner(probe_name)}: argument 'input' got {spec.text!r}: {why} in {type(root).__name__}; "
                f"close names: {near_names(root, spec.module_path)}. Give the dotted name as root.named_modules() "
                "lists it (wrapper segments such as '_fsdp_wrapped_module' may be left out)."
            )

        if spec.last_blocks is None:
            module = find_module(root, spec.module_path)
            if module is None:
                raise missing(f"no submodule {spec.module_path!r}")
            targets = [(spec.module_path, module, (spec.token_pool, spec.prefix_tokens))]
        else:
            if find_module(root, spec.module_path) is None:
                raise missing(f"no submodule {spec.module_path!r}")
            children = child_modules(root, spec.module_path)
            if len(children) < spec.last_blocks:
                raise missing(f"{spec.module_path!r} has {len(children)} child modules, fewer than {spec.pool!r} reads")
            last = children[-spec.last_blocks :]
            targets = [(name, module, (spec.token_pool, spec.prefix_tokens)) for name, module in last]
            if spec.with_mean:
                targets.append((last[-1][0], last[-1][1], ("mean", spec.prefix_tokens)))
        route = []
        for name, module, key in targets:
            tap = self._taps.get(id(module))
            if tap is None:
                tap = self._taps[id(module)] = FeatureTap(module, name)
            tap.want(key)
            route.append((tap, key))
        self._routes[spec.text] = route

    def arm(self) -> None:
        """Start a step: every hooked module captures its next forward (and only that one)."""
        if self._root is None:
            raise TapError("TapSet.arm() before attach(root): attach the taps to the model first")
        for tap in self._taps.values():
            tap.arm()

    def take(self, spec: str) -> torch.Tensor:
        """The pooled, detached features of ``spec`` for this step.

        Raises:
            TapError: when ``spec`` was never added or the set is not attached.
            TapNotCapturedError: when the tapped module did not run since `arm`.
            ValueError: when the output cannot be pooled as ``spec`` asks.
        """
        if spec not in self._specs:
            raise TapError(f"feature tap {spec!r} was never added; TapSet.add it before taking it")
        if self._root is None:
            raise TapError(f"feature tap {spec!r} taken before TapSet.attach(root)")
        owner = _owner(self._owners[spec])
        parts = []
        for tap, key in self._routes[spec]:
            try:
                parts.append(tap.piece(key))
            except TapNotCapturedError:
                raise TapNotCapturedError(
                    f"{owner}: tap {spec!r}: module {tap.name!r} did not run a forward in this step (since "
                    "the step's start, when the taps are armed); tap a module that the training/validation step "
                    "calls, or return the features from the step instead"
                ) from None
            except ValueError as err:
                raise ValueError(f"{owner}: argument 'input' {spec!r}: {err}") from None
        return concat_features(parts)

    def remove(self) -> None:
        """Remove every hook (the specs stay: `attach` puts them on again)."""
        for tap in self._taps.values():
            tap.remove()
        self._taps = {}
        self._routes = {}
        self._root = None
