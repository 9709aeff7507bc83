"""Head families a bank trains: the interface (`HeadFamily`, see `distprobe.bank.families.base`) and its kinds.

A new family is one file here holding a `HeadFamily` subclass, one entry in `FAMILIES`, and its tests.
"""

from distprobe.bank.families.attentive import AttentiveHeads
from distprobe.bank.families.base import HeadFamily, ParamView
from distprobe.bank.families.dense import DenseHeads
from distprobe.bank.families.linear import LinearHeads

#: Each family by the name ``BankConfig.family`` gives.
FAMILIES: dict[str, type[HeadFamily]] = {"linear": LinearHeads, "attentive": AttentiveHeads, "dense": DenseHeads}

__all__ = ["FAMILIES", "AttentiveHeads", "DenseHeads", "HeadFamily", "LinearHeads", "ParamView"]
