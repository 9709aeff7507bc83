"""The eval config's ``probes.bank`` and ``probes.knn``, checked when the file is loaded, not in the job.

Their keys are `distprobe.bank.BankConfig`'s and `distprobe.knn.KNNConfig`'s fields, derived from those classes:
the service's schema is theirs, so a key added to the bank is accepted here with no second list to keep. Types come
from the same classes' annotations (`conforms`); ranges from their own ``__post_init__`` checks, run on a stand-in
built with placeholder feature sizes (the job knows the real ones only after extraction).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from distprobe.service.config_schema import ServiceConfigError, check_keys_and_types

BANK_SET_BY_SERVICE = ("inputs", "num_classes", "in_features")
"""`BankConfig` fields the service fills in (the cached features and the config's num_classes)."""
KNN_SET_BY_SERVICE = ("num_classes", "in_features")
"""`KNNConfig` fields the service fills in."""


def bank_fields(options: Mapping[str, Any], source: str) -> dict[str, Any]:
    """``probes.bank`` as `BankConfig` fields: ``head`` names the head family (``OnlineProbeBank``'s word).

    Raises `ServiceConfigError` for ``head`` and ``family`` together, and for a multi-label bank (the feature cache
    keeps one class index per sample).
    """
    fields = dict(options)
    if "head" in fields:
        if "family" in fields:
            raise ServiceConfigError(
                f"{source}: probes.bank has both head={fields['head']!r} and family={fields['family']!r}; keep head"
            )
        fields["family"] = fields.pop("head")
        from distprobe.bank.families import FAMILIES

        if fields["family"] not in FAMILIES:
            raise ServiceConfigError(
                f"{source}: probes.bank.head={fields['family']!r}; expected one of {sorted(FAMILIES)}"
            )
    if fields.get("family") == "dense":
        raise ServiceConfigError(
            f"{source}: probes.bank.head='dense'; the service's feature cache keeps one class index per sample, not "
            "masks, so dense banks run online for now (OnlineProbeBank(head='dense') or a ProbeSet bank with "
            "family='dense', docs/dense.md): use head 'linear' or 'attentive' here"
        )
    if fields.get("multilabel"):
        raise ServiceConfigError(
            f"{source}: probes.bank.multilabel={fields['multilabel']!r}; the service's feature cache keeps one class "
            "index per sample, so multi-label banks run online for now (OnlineProbeBank or ProbeSet with "
            "multilabel=True): remove it"
        )
    return fields


def check_probe_options(
    bank: Mapping[str, Any] | None, knn: Mapping[str, Any] | None, num_classes: int, source: str
) -> None:
    """Raise `ServiceConfigError` for an unknown key, a wrong type or a value out of range in the bank or the kNN."""
    if bank is not None:
        _check_bank(bank_fields(bank, source), num_classes, source)
    if knn is not None:
        _check_knn(dict(knn), num_classes, source)


def _check_bank(options: dict[str, Any], num_classes: int, source: str) -> None:
    from distprobe.bank.config import OPTIMIZERS, BankConfig

    check_keys_and_types(options, BankConfig, BANK_SET_BY_SERVICE, "probes.bank", source)
    optimizer = options.get("optimizer")
    if isinstance(optimizer, Mapping) and optimizer.get("type") in OPTIMIZERS:  # the optimizer's own options' types
        spec_options = {k: v for k, v in optimizer.items() if k != "type"}
        check_keys_and_types(spec_options, OPTIMIZERS[optimizer["type"]], (), "probes.bank.optimizer", source)
    try:
        BankConfig(inputs=("features",), num_classes=num_classes, in_features=1, **{"name": "bank", **options})
    except (TypeError, ValueError) as err:
        raise ServiceConfigError(f"{source}: probes.bank: {err}") from None
    _check_scheduler(options.get("scheduler"), source)


def _check_scheduler(spec: Any, source: str) -> None:
    """Build a scheduler named by string or ``{type: name, ...}`` once on a stand-in optimizer.

    A bad name or argument then fails at load time. A Hydra ``_target_`` is code that the job's environment imports:
    it is left to the job.
    """
    if spec is None or (isinstance(spec, Mapping) and "_target_" in spec):
        return
    import torch

    from distprobe.engine.factories import build_scheduler

    stand_in = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    try:
        build_scheduler(spec, stand_in, total_steps=100, probe_name="probes.bank")
    except (TypeError, ValueError) as err:
        raise ServiceConfigError(f"{source}: probes.bank.scheduler={spec!r}: {err}") from None


def _check_knn(options: dict[str, Any], num_classes: int, source: str) -> None:
    from distprobe.knn.config import KNNConfig

    check_keys_and_types(options, KNNConfig, KNN_SET_BY_SERVICE, "probes.knn", source)
    if options.get("multilabel"):
        raise ServiceConfigError(
            f"{source}: probes.knn.multilabel={options['multilabel']!r}; the service's feature cache keeps one class "
            "index per sample, so a multi-label kNN runs online for now (OnlineKNN or ProbeSet): remove it"
        )
    # queue_length defaults to the train set's size, known in the job: a stand-in as large as any k, so no warning.
    stand_in = {"name": "knn", "queue_length": 2**31 - 1, **options}
    try:
        KNNConfig(num_classes=num_classes, in_features=1, **stand_in)
    except (TypeError, ValueError) as err:
        raise ServiceConfigError(f"{source}: probes.knn: {err}") from None
