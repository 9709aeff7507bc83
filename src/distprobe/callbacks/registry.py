"""Where callbacks keep their modules and metrics on the LightningModule: ``callbacks_modules`` and friends.

distprobe creates them as plain dicts, which nn.Module does not register, so the probe never becomes a parameter of
the LightningModule. A stable-pretraining ``spt.Module`` (or a user) creates them as ``nn.ModuleDict``s; probes
stored there are registered submodules, which the distprobe strategies keep out of the wrapper, the sharding and
the main optimizer, and which a stock distributed strategy would wrap: `check_strategy_keeps_probes_out` refuses
that at setup.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import lightning.pytorch as pl
import torch.distributed as dist
from torch import nn

#: The distprobe strategy that replaces each stock Lightning strategy, by the stock class's name.
REPLACEMENTS = {
    "DDPStrategy": "distprobe_ddp",
    "FSDPStrategy": "distprobe_fsdp",
    "ModelParallelStrategy": "distprobe_fsdp2",
    "DeepSpeedStrategy": "distprobe_deepspeed",
}


def registry(pl_module: pl.LightningModule, attr: str) -> MutableMapping[str, Any]:
    """``pl_module.<attr>``: a plain dict created when missing, or the user's dict or ``nn.ModuleDict``."""
    found = getattr(pl_module, attr, None)
    if found is None:
        found = {}
        # object.__setattr__ skips nn.Module's registration of submodules and parameters.
        object.__setattr__(pl_module, attr, found)
    if not isinstance(found, MutableMapping | nn.ModuleDict):
        raise TypeError(
            f"{type(pl_module).__name__}.{attr} is a {type(found).__name__}; distprobe stores callbacks' modules "
            "there by name, so it must be a dict or an nn.ModuleDict (or absent)."
        )
    return found  # type: ignore[return-value]


def claim(pl_module: pl.LightningModule, name: str, module: nn.Module | None = None) -> MutableMapping[str, Any]:
    """``pl_module.callbacks_modules``, after checking that ``name`` is free there or already holds ``module``.

    Raises:
        ValueError: when another callback's module is stored under ``name``.
    """
    modules = registry(pl_module, "callbacks_modules")
    if name in modules and (module is None or modules[name] is not module):
        raise ValueError(
            f"probe '{name}': argument 'name' is already used by another callback on {type(pl_module).__name__}; "
            "give each probe, bank and kNN a unique name."
        )
    return modules


def registered(pl_module: pl.LightningModule, attr: str) -> bool:
    """Whether ``pl_module.<attr>`` is a registered submodule (its contents are parameters of ``pl_module``)."""
    return isinstance(pl_module._modules.get(attr), nn.Module)


def check_strategy_keeps_probes_out(trainer: pl.Trainer, pl_module: pl.LightningModule, probe_name: str) -> None:
    """Refuse a distributed stock strategy when probes are registered submodules of the LightningModule.

    A stock DDP, FSDP or DeepSpeed strategy would wrap, shard or optimise the probe as part of the main model: the
    probe's own backward would then trip DDP's reducer or train a wrong, sharded probe. The distprobe strategy of the
    same kind keeps it out.
    """
    strategy = trainer.strategy
    if getattr(strategy, "probe_process_group", None) is not None or not registered(pl_module, "callbacks_modules"):
        return
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    stock = next((cls.__name__ for cls in type(strategy).__mro__ if cls.__name__ in REPLACEMENTS), None)
    replacement = REPLACEMENTS.get(stock or "", "distprobe_ddp")
    raise ValueError(
        f"probe '{probe_name}': {type(pl_module).__name__}.callbacks_modules is an nn.ModuleDict, so the probe is a "
        f"submodule of the LightningModule, and strategy {type(strategy).__name__} would wrap and sync it with the "
        f"backbone. Use Trainer(strategy='{replacement}') (import distprobe.strategies), which keeps probes out of "
        "the main wrapper and optimizer."
    )
