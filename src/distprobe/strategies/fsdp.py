"""`ProbeFSDPStrategy`: Lightning's FSDP1 with probes unsharded and out of the main optimizer; runs on CPU."""

from __future__ import annotations

from collections.abc import Generator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from lightning.fabric.strategies.fsdp import _move_torchmetrics_to_device, _setup_activation_checkpointing
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from torch.optim import Optimizer
from typing_extensions import override

from distprobe.strategies.exclusion import hidden_probes, probe_container, probe_parameters
from distprobe.strategies.keep_out import (
    ProbeGradientsOutOfMainStep,
    ProbesOutOfCheckpointLoading,
    ProbesOutOfOptimizers,
    ProbesOutOfPrecision,
    WorldProbeGroup,
)


def full_state_dict_on_cpu(model: nn.Module) -> AbstractContextManager[Any]:
    """FSDP1's full state-dict context gathered on rank 0 without ``offload_to_cpu``.

    Lightning always asks FSDP to offload the full state dict to CPU; with parameters already on CPU, torch 2.13's
    FSDP1 then crashes rank 0 with a segmentation fault while cloning the gathered tensors.
    """
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP.state_dict_type(
        model,
        StateDictType.FULL_STATE_DICT,
        FullStateDictConfig(offload_to_cpu=False, rank0_only=True),
        FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True),
    )


def fsdp_ignored_states(module: nn.Module, user_kwargs: dict[str, Any]) -> list[nn.Module] | list[nn.Parameter]:
    """The ``ignored_states`` for FSDP1: the registered probes plus whatever the user asked FSDP to ignore.

    FSDP1 takes ``ignored_states`` or ``ignored_modules`` but not both, and parameters or modules but not a mix. As
    modules (the probe container), FSDP also leaves the probes' buffers alone: as parameters, it would cast a probe's
    BatchNorm statistics to its mixed-precision ``buffer_dtype`` (bf16) at each forward, and the float32 probe would
    then fail on them. Only when the user names parameters is everything expressed as parameters.
    """
    user_items = [item for key in ("ignored_states", "ignored_modules") for item in user_kwargs.get(key) or ()]
    container = probe_container(module)
    if all(isinstance(item, nn.Module) for item in user_items):
        modules: dict[int, nn.Module] = {} if container is None else {id(container): container}
        for item in user_items:
            modules.setdefault(id(item), item)
        return list(modules.values())
    ignored: dict[int, nn.Parameter] = {id(p): p for p in probe_parameters(module)}
    for item in user_items:
        for p in item.parameters() if isinstance(item, nn.Module) else [item]:
            ignored.setdefault(id(p), p)
    return list(ignored.values())


class ProbeFSDPStrategy(
    WorldProbeGroup,
    ProbeGradientsOutOfMainStep,
    ProbesOutOfCheckpointLoading,
    ProbesOutOfPrecision,
    ProbesOutOfOptimizers,
    FSDPStrategy,
):
    """`FSDPStrategy` that never shards probes, keeps them out of the main optimizer, and runs on CPU with gloo.

    Registered as ``"distprobe_fsdp"``. Over the stock strategy it adds:

    - parameters under ``pl_module.callbacks_modules`` go to FSDP's ``ignored_states`` (unsharded, unflattened) and
      are removed from the optimizers that ``configure_optimizers`` returns;
    - on CPU it gives FSDP ``device_id=torch.device("cpu")`` (the stock strategy passes None, which FSDP refuses
      without an accelerator) and builds a ``device_mesh`` tuple on the root device's type;
    - on CPU the ``"full"`` state dict is gathered without ``offload_to_cpu`` (which crashes FSDP1 on CPU);
    - ``probe_process_group``: the world group (with FSDP every rank is a data-parallel rank, also under HSDP).

    Both ``state_dict_type="full"`` and ``"sharded"`` work; probes save their own state through their callbacks.

    Example:
        >>> import distprobe.strategies  # registers the names
        >>> trainer = pl.Trainer(strategy="distprobe_fsdp", accelerator="cpu", devices=2)  # doctest: +SKIP
    """

    def _fsdp_device_id(self) -> torch.device | int | None:
        if self.root_device.type == "cpu":
            return self.root_device
        return self.root_device.index

    @override
    def setup_environment(self) -> None:
        mesh_shape = self.kwargs.get("device_mesh")
        if isinstance(mesh_shape, tuple):
            # The stock strategy builds a tuple into a CUDA mesh; build it on the root device's type instead.
            del self.kwargs["device_mesh"]
        super().setup_environment()
        if isinstance(mesh_shape, tuple):
            from torch.distributed.device_mesh import init_device_mesh

            self.kwargs["device_mesh"] = init_device_mesh(self.root_device.type, mesh_shape)

    def _wrapper_kwargs(self) -> dict[str, Any]:
        return {
            "cpu_offload": self.cpu_offload,
            "mixed_precision": self.mixed_precision_config,
            "sharding_strategy": self.sharding_strategy,
            "device_id": self._fsdp_device_id(),
        }

    @override
    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            # Wrapped in configure_model under model_sharded_context, where the probes were hidden.
            return super()._setup_model(model)
        kwargs = {k: v for k, v in self.kwargs.items() if k not in ("ignored_states", "ignored_modules")}
        wrapped = FullyShardedDataParallel(
            module=model,
            ignored_states=fsdp_ignored_states(model, self.kwargs),
            **self._wrapper_kwargs(),
            **kwargs,
        )
        _move_torchmetrics_to_device(wrapped, self.root_device)
        _setup_activation_checkpointing(wrapped, self._activation_checkpointing_kwargs)
        return wrapped

    @contextmanager
    @override
    def model_sharded_context(self) -> Generator[None, None, None]:
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import enable_wrap

        assert self.lightning_module is not None
        with (
            hidden_probes(self.lightning_module),
            enable_wrap(wrapper_cls=FullyShardedDataParallel, **self._wrapper_kwargs(), **self.kwargs),
        ):
            yield

    def _full_on_cpu(self) -> bool:
        return self._state_dict_type == "full" and self.root_device.type == "cpu"

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        if not self._full_on_cpu():
            return super().lightning_module_state_dict()
        assert self.model is not None
        with full_state_dict_on_cpu(self.model):
            return self.model.state_dict()

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        if not self._full_on_cpu():
            return super().optimizer_state(optimizer)
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import OptimStateKeyType

        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        assert self.model is not None
        with full_state_dict_on_cpu(self.model):
            state = FSDP.optim_state_dict(self.model, optimizer)
            if self.global_rank == 0:
                # Keyed by parameter index, as the stock strategy saves it, so that either strategy can load it.
                state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
            return state
