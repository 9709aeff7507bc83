"""Turn the user's probe, optimizer and scheduler specifications into objects.

Each accepts the forms documented for ``OnlineProbe``: a name, a ``{"type": ...}`` dict, a Hydra config with
``_target_``, a ``functools.partial``, a class or callable, a ready instance, or None for the default.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from distprobe.engine.lars import LARS

#: The documented default: the standard for SSL linear probes.
DEFAULT_OPTIMIZER: dict[str, Any] = {
    "type": "LARS",
    "lr": 0.1,
    "clip_lr": True,
    "eta": 0.02,
    "exclude_bias_n_norm": True,
    "weight_decay": 0.0,
}

#: Defaults applied under a name when the user gives none; the user's own keys always win.
OPTIMIZER_DEFAULTS: dict[str, dict[str, Any]] = {
    "LARS": {k: v for k, v in DEFAULT_OPTIMIZER.items() if k != "type"},
    "SGD": {"lr": 0.1, "momentum": 0.9},
    "Adam": {"lr": 1e-3},
    "AdamW": {"lr": 1e-3},
}

# Schedulers that need an extra callable or a monitored value cannot be built from a name alone.
_UNBUILDABLE_SCHEDULERS = {"LambdaLR", "MultiplicativeLR", "SequentialLR", "ChainedScheduler", "ReduceLROnPlateau"}


def _is_hydra_config(spec: Any) -> bool:
    return isinstance(spec, Mapping) and "_target_" in spec


def _instantiate(spec: Any, **kwargs: Any) -> Any:
    from hydra.utils import instantiate  # imported late: only Hydra configs pay for it

    return instantiate(spec, **kwargs)


def _positional_arity(fn: Callable[..., Any]) -> int | None:
    """How many positional arguments ``fn`` can take without defaults, or None if it cannot be inspected."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    required = [
        p
        for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    return len(required)


def build_module(spec: Any, *, owner: Any = None, probe_name: str) -> nn.Module:
    """Resolve the ``probe`` argument: a module, a Hydra config, or a callable returning one.

    A callable that requires one positional argument is called with ``owner`` (the LightningModule being probed).
    """
    if isinstance(spec, nn.Module):
        return spec
    if _is_hydra_config(spec):
        module = _instantiate(spec)
    elif callable(spec):
        module = spec(owner) if _positional_arity(spec) == 1 else spec()
    else:
        raise ValueError(
            f"probe '{probe_name}': argument 'probe' got {spec!r} of type {type(spec).__name__}; expected an "
            "nn.Module, a callable returning one, or a Hydra config with '_target_'."
        )
    if not isinstance(module, nn.Module):
        raise ValueError(
            f"probe '{probe_name}': argument 'probe' produced {type(module).__name__}, not an nn.Module; "
            "make the callable or config return the probe module."
        )
    return module


def optimizer_names() -> list[str]:
    """Every optimizer name accepted as a string: torch.optim's optimizers plus LARS."""
    names = {
        name
        for name, obj in vars(torch.optim).items()
        if inspect.isclass(obj) and issubclass(obj, Optimizer) and obj is not Optimizer and name != "LBFGS"
    }
    return sorted(names | {"LARS"})


def scheduler_names() -> list[str]:
    """Every scheduler name accepted as a string."""
    names = {
        name
        for name, obj in vars(torch.optim.lr_scheduler).items()
        if inspect.isclass(obj) and issubclass(obj, LRScheduler) and obj is not LRScheduler and not name.startswith("_")
    }
    return sorted(names - _UNBUILDABLE_SCHEDULERS)


def _optimizer_class(name: str, probe_name: str) -> type[Optimizer]:
    if name == "LARS":
        return LARS
    if name not in optimizer_names():
        raise ValueError(
            f"probe '{probe_name}': argument 'optimizer' got unknown name {name!r}; valid names: {optimizer_names()}"
        )
    return getattr(torch.optim, name)


def build_optimizer(spec: Any, params: list[nn.Parameter], *, probe_name: str) -> Optimizer:
    """Resolve the ``optimizer`` argument over the probe's parameters."""
    if spec is None:
        spec = DEFAULT_OPTIMIZER
    if isinstance(spec, Optimizer):
        _check_owns_probe_params(spec, params, probe_name)
        return spec

    def by_name(name: str, kwargs: dict[str, Any]) -> tuple[Callable[..., Any], dict[str, Any]]:
        kind = _optimizer_class(name, probe_name)
        kwargs = {**OPTIMIZER_DEFAULTS.get(name, {}), **kwargs}
        return kind, {**_fused_default(kind, kwargs, params), **kwargs}

    return _from_spec(spec, params, Optimizer, "optimizer", probe_name, by_name, "{'type': 'AdamW', 'lr': 1e-3}")


def _from_spec(
    spec: Any,
    target: Any,
    expected: type,
    argument: str,
    probe_name: str,
    by_name: Callable[[str, dict[str, Any]], tuple[Callable[..., Any], dict[str, Any]]],
    example: str,
) -> Any:
    """Build an ``expected`` on ``target`` from a name, a ``{"type": ...}`` dict, a Hydra config or a callable.

    ``by_name`` turns a name and the dict's other keys into the class and its arguments (defaults filled in).
    """
    if isinstance(spec, str):
        spec = {"type": spec}
    if _is_hydra_config(spec):
        factory = _instantiate(spec, _partial_=True)
        return _checked(factory(target), expected, argument, probe_name)
    if isinstance(spec, Mapping):
        kwargs = dict(spec)
        kind = kwargs.pop("type", None)
        if kind is None:
            raise ValueError(
                f"probe '{probe_name}': argument '{argument}' dict {spec!r} has no 'type'; write {example} or pass a "
                "name."
            )
        if isinstance(kind, str):
            kind, kwargs = by_name(kind, kwargs)
        return _checked(kind(target, **kwargs), expected, argument, probe_name)
    if callable(spec):
        return _checked(spec(target), expected, argument, probe_name)
    takes = "parameters" if expected is Optimizer else "the optimizer"
    raise ValueError(
        f"probe '{probe_name}': argument '{argument}' got {spec!r} of type {type(spec).__name__}; expected a name, "
        f"a {{'type': ...}} dict, a partial/class/callable taking {takes}, an {expected.__name__}, or None."
    )


#: torch optimizers with a fused CUDA kernel that also honours GradScaler's `found_inf` (see `Probe.step_window`).
_FUSABLE = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)
#: Arguments that pick an implementation: when the user sets one, the choice is theirs.
_IMPLEMENTATION_ARGS = ("fused", "foreach", "capturable", "differentiable")


def _fused_default(kind: Any, kwargs: Mapping[str, Any], params: list[nn.Parameter]) -> dict[str, Any]:
    """``{"fused": True}`` for Adam, AdamW and SGD named by string on CUDA parameters, unless an implementation is set.

    One kernel for all tensors instead of a dozen per step: the probe's host time is what shows in the step time of a
    short, launch-bound training step. A skipped non-finite step then costs nothing and leaves the step count alone.
    """
    if kind not in _FUSABLE or any(arg in kwargs for arg in _IMPLEMENTATION_ARGS):
        return {}
    if not params or not all(p.is_cuda and p.is_floating_point() for p in params):
        return {}
    return {"fused": True}


def _check_owns_probe_params(optimizer: Optimizer, params: list[nn.Parameter], probe_name: str) -> None:
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if owned != {id(p) for p in params}:
        raise ValueError(
            f"probe '{probe_name}': argument 'optimizer' is an optimizer instance whose parameters are not exactly "
            "the probe's; build it on probe.parameters() or pass a name/partial instead."
        )


def _scheduler_defaults(name: str, optimizer: Optimizer, total_steps: int | None) -> dict[str, Any]:
    steps = max(1, total_steps or 1000)
    lr = optimizer.param_groups[0]["lr"]
    defaults: dict[str, dict[str, Any]] = {
        "CosineAnnealingLR": {"T_max": steps},
        "StepLR": {"step_size": max(1, steps // 3)},
        "MultiStepLR": {"milestones": [steps // 2, (3 * steps) // 4]},
        "ExponentialLR": {"gamma": 0.01 ** (1.0 / steps)},
        "OneCycleLR": {"max_lr": lr, "total_steps": steps},
        "CyclicLR": {"base_lr": lr / 10, "max_lr": lr},
        "CosineAnnealingWarmRestarts": {"T_0": steps},
        "PolynomialLR": {"total_iters": steps},
        "LinearLR": {"total_iters": steps},
        "ConstantLR": {"factor": 1.0},
    }
    return defaults.get(name, {})


def build_scheduler(spec: Any, optimizer: Optimizer, *, total_steps: int | None, probe_name: str) -> LRScheduler:
    """Resolve the ``scheduler`` argument; string names take their lengths from ``total_steps``."""
    if spec is None:
        spec = {"type": "ConstantLR", "factor": 1.0}
    if isinstance(spec, LRScheduler):
        if spec.optimizer is not optimizer:
            raise ValueError(
                f"probe '{probe_name}': argument 'scheduler' is a scheduler instance built on another optimizer; "
                "build it on this probe's optimizer instance, or pass a name/partial."
            )
        return spec

    def by_name(name: str, kwargs: dict[str, Any]) -> tuple[Callable[..., Any], dict[str, Any]]:
        if name not in scheduler_names():
            raise ValueError(
                f"probe '{probe_name}': argument 'scheduler' got unknown name {name!r}; "
                f"valid names: {scheduler_names()}"
            )
        kwargs = {**_scheduler_defaults(name, optimizer, total_steps), **kwargs}
        return getattr(torch.optim.lr_scheduler, name), kwargs

    return _from_spec(spec, optimizer, LRScheduler, "scheduler", probe_name, by_name, "{'type': 'CosineAnnealingLR'}")


def _checked(obj: Any, expected: type, argument: str, probe_name: str) -> Any:
    if not isinstance(obj, expected):
        raise ValueError(
            f"probe '{probe_name}': argument '{argument}' produced {type(obj).__name__}, expected {expected.__name__}."
        )
    return obj
