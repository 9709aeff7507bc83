"""Plain functions that keep probes out of the main model's wrapper, sharding and optimizer.

A callback stores its probe in ``pl_module.callbacks_modules``, a plain dict that nn.Module does not register. A user
may still make it an ``nn.ModuleDict`` (or register a probe there by hand); then the probe's parameters are
parameters of the LightningModule, and every stock strategy would wrap, shard, cast and optimise them. The strategy
plug-ins compose these functions to prevent that; each stock mechanism (DDP's ignore list, FSDP's ignored states,
hiding the submodule from ``fully_shard`` and DeepSpeed) is applied in one place.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

#: Attribute of the LightningModule under which callbacks keep the modules they train.
PROBES_ATTR = "callbacks_modules"


def probe_container(module: nn.Module) -> nn.Module | None:
    """The registered submodule holding probes (``module.callbacks_modules``), or None when it is not a submodule."""
    container = module._modules.get(PROBES_ATTR)
    return container if isinstance(container, nn.Module) else None


def probe_modules(module: nn.Module) -> list[nn.Module]:
    """Every probe under ``module.callbacks_modules``, whether that is a plain dict or a registered submodule."""
    container = module._modules.get(PROBES_ATTR)
    if container is None:
        container = getattr(module, PROBES_ATTR, None)
    if isinstance(container, nn.Module):
        return [container]
    if isinstance(container, dict):
        return [m for m in container.values() if isinstance(m, nn.Module)]
    return []


def probe_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of every probe under ``module.callbacks_modules`` (deduplicated, in a stable order)."""
    seen: dict[int, nn.Parameter] = {}
    for probe in probe_modules(module):
        for p in probe.parameters():
            seen.setdefault(id(p), p)
    return list(seen.values())


def probe_state_names(module: nn.Module) -> list[str]:
    """Fully qualified names of the parameters and buffers that ``module`` registers under its probe container.

    Only a registered container has names inside ``module``; probes in a plain dict are invisible to wrappers anyway.
    """
    if probe_container(module) is None:
        return []
    prefix = PROBES_ATTR + "."
    names = [name for name, _ in module.named_parameters() if name.startswith(prefix)]
    names += [name for name, _ in module.named_buffers() if name.startswith(prefix)]
    return names


def unregister_probes(module: nn.Module) -> Callable[[], None]:
    """Unregister ``module.callbacks_modules`` as a submodule, keeping it readable as an attribute.

    Returns:
        A function that registers it again at the same place (a no-op when there was nothing to unregister).
    """
    container = probe_container(module)
    if container is None:
        return lambda: None
    order = list(module._modules)
    del module._modules[PROBES_ATTR]
    # object.__setattr__ keeps the attribute readable without registering it as a submodule.
    object.__setattr__(module, PROBES_ATTR, container)

    def reregister() -> None:
        if module.__dict__.get(PROBES_ATTR) is container:
            object.__delattr__(module, PROBES_ATTR)
        module._modules[PROBES_ATTR] = container
        # Restore the registration order so that state_dict keys keep their order.
        for name in order:
            if name in module._modules:
                module._modules[name] = module._modules.pop(name)

    return reregister


@contextlib.contextmanager
def hidden_probes(module: nn.Module) -> Iterator[None]:
    """Unregister ``module.callbacks_modules`` for the duration of the block, then put it back at the same place.

    Code that walks ``module.parameters()`` or ``module.modules()`` inside the block (``fully_shard``, DeepSpeed's
    engine, a precision cast) never sees the probes. The container stays reachable as an attribute of the module
    object, so callbacks can still find it by name.
    """
    reregister = unregister_probes(module)
    try:
        yield
    finally:
        reregister()


@contextlib.contextmanager
def probes_out_of_loading(module: nn.Module) -> Iterator[None]:
    """While the block loads a checkpoint into ``module``, its probes are neither asked for nor written.

    A probe saves its state through its callback (by name), not through the LightningModule's state dict. With
    ``callbacks_modules`` registered (an ``nn.ModuleDict``), a strict load of the model state would otherwise fail
    whenever the probes differ from the checkpoint's: a probe added since it was written ("Missing key(s)"), one
    removed, or one whose parameters are created at its first batch, after the restore (a bank or a kNN without
    ``in_features``: "Unexpected key(s)"). Inside the block the container is unregistered (a distributed checkpoint
    load does not request its keys) and its keys are dropped from any state dict loaded into ``module``.
    """
    prefix_in_module = PROBES_ATTR + "."

    def drop_probe_keys(_module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
        for key in [k for k in state_dict if k.startswith(prefix + prefix_in_module)]:
            del state_dict[key]

    handle = module.register_load_state_dict_pre_hook(drop_probe_keys)
    try:
        with hidden_probes(module):
            yield
    finally:
        handle.remove()


@contextlib.contextmanager
def probe_gradients_set_aside(module: nn.Module) -> Iterator[None]:
    """While the block runs, the probes' parameters under ``module.callbacks_modules`` have no ``.grad``.

    A probe keeps its open accumulation window in its parameters' ``.grad``; code in the block that walks
    ``module.parameters()`` (norm clipping of the whole module, a gradient-norm log) neither counts nor changes it.
    The same tensors are put back afterwards.
    """
    set_aside = [(p, p.grad) for p in probe_parameters(module) if p.grad is not None]
    for p, _ in set_aside:
        p.grad = None
    try:
        yield
    finally:
        for p, grad in set_aside:
            p.grad = grad


def drop_from_optimizers(optimizers: Iterable[Optimizer], params: Iterable[torch.Tensor]) -> int:
    """Remove ``params`` (and any state kept for them) from every optimizer; return how many references went.

    Param groups that become empty are kept, so that schedulers indexed by group still line up.
    """
    excluded = {id(p) for p in params}
    if not excluded:
        return 0
    removed = 0
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            kept = [p for p in group["params"] if id(p) not in excluded]
            removed += len(group["params"]) - len(kept)
            group["params"] = kept
        for p in [p for p in optimizer.state if id(p) in excluded]:
            del optimizer.state[p]
    return removed


@contextlib.contextmanager
def probes_kept_out_of_precision(precision_plugin: Any, module: nn.Module) -> Iterator[None]:
    """While the block runs, ``precision_plugin.convert_module`` never sees ``module``'s probes.

    Lightning's ``*-true`` precisions cast the whole LightningModule (``module.to(torch.bfloat16)``); probes in a
    user's ``nn.ModuleDict`` would be cast with it. A probe keeps its own dtype: features are cast to it.
    """
    original = precision_plugin.convert_module

    def convert_without_probes(model: nn.Module) -> nn.Module:
        with hidden_probes(module):
            return original(model)

    precision_plugin.convert_module = convert_without_probes
    try:
        yield
    finally:
        del precision_plugin.convert_module  # the instance attribute: the class's method shows through again
