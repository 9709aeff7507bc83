"""Lightning strategy plug-ins that keep probes out of the main model's wrapper, sharding and optimizer.

Importing this package registers the names in Lightning's `StrategyRegistry`, so that
``Trainer(strategy="distprobe_fsdp")`` works; see docs/strategies.md for what each adds over the stock strategy.
"""

from distprobe.strategies.ddp import ProbeDDPStrategy
from distprobe.strategies.deepspeed import ProbeDeepSpeedStrategy
from distprobe.strategies.exclusion import drop_from_optimizers, hidden_probes, probe_parameters
from distprobe.strategies.fsdp import ProbeFSDPStrategy
from distprobe.strategies.fsdp2 import ProbeModelParallelStrategy
from distprobe.strategies.groups import data_parallel_group
from distprobe.strategies.registry import STRATEGIES, register_strategies

register_strategies()

__all__ = [
    "STRATEGIES",
    "ProbeDDPStrategy",
    "ProbeDeepSpeedStrategy",
    "ProbeFSDPStrategy",
    "ProbeModelParallelStrategy",
    "data_parallel_group",
    "drop_from_optimizers",
    "hidden_probes",
    "probe_parameters",
    "register_strategies",
]
