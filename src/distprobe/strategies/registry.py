"""Registration of the distprobe strategies in Lightning's `StrategyRegistry`."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import StrategyRegistry

from distprobe.strategies.ddp import ProbeDDPStrategy
from distprobe.strategies.deepspeed import ProbeDeepSpeedStrategy
from distprobe.strategies.fsdp import ProbeFSDPStrategy
from distprobe.strategies.fsdp2 import ProbeModelParallelStrategy

#: name -> (strategy class, description, init arguments). The single place where names are decided.
STRATEGIES: dict[str, tuple[type, str, dict[str, Any]]] = {
    "distprobe_ddp": (ProbeDDPStrategy, "DDP; probes outside the DDP wrapper and main optimizer", {}),
    "distprobe_ddp_spawn": (
        ProbeDDPStrategy,
        "DDP with start_method='spawn'; probes outside the DDP wrapper and main optimizer",
        {"start_method": "spawn"},
    ),
    "distprobe_fsdp": (ProbeFSDPStrategy, "FSDP1; probes ignored by FSDP and the main optimizer; runs on CPU", {}),
    "distprobe_fsdp2": (
        ProbeModelParallelStrategy,
        "FSDP2 (ModelParallelStrategy, every rank data-parallel); probes hidden from configure_model",
        {"tensor_parallel_size": 1},
    ),
    "distprobe_model_parallel": (
        ProbeModelParallelStrategy,
        "ModelParallelStrategy (data parallel across nodes, tensor parallel within); probes hidden from "
        "configure_model and replicated over the data-parallel mesh dimension",
        {},
    ),
    "distprobe_deepspeed": (
        ProbeDeepSpeedStrategy,
        "DeepSpeed ZeRO stage 2; probes outside the engine and its optimizer; runs on CPU",
        {},
    ),
    **{
        f"distprobe_deepspeed_stage_{stage}": (
            ProbeDeepSpeedStrategy,
            f"DeepSpeed ZeRO stage {stage}; probes outside the engine and its optimizer; runs on CPU",
            {"stage": stage},
        )
        for stage in (1, 2, 3)
    },
}


def register_strategies() -> list[str]:
    """Register every distprobe strategy name in Lightning's `StrategyRegistry` (idempotent); return the names."""
    for name, (cls, description, init_params) in STRATEGIES.items():
        if name not in StrategyRegistry:
            StrategyRegistry.register(name, cls, description=description, **init_params)
    return list(STRATEGIES)
