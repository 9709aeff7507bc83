"""Probe banks: a grid of linear heads over one or more feature sources, trained as one fused step.

The bank is framework-agnostic (torch and torchmetrics only): `distprobe.callbacks.OnlineProbeBank` drives it from
Lightning, `distprobe.loop.ProbeSet` from a plain torch loop.
"""

from distprobe.bank.bank import BankStepOutput, ProbeBank
from distprobe.bank.config import AdamWSpec, BankConfig, Head, LARSSpec, SGDSpec

__all__ = ["AdamWSpec", "BankConfig", "BankStepOutput", "Head", "LARSSpec", "ProbeBank", "SGDSpec"]
