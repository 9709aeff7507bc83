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

    Raises `ServiceConfigError` for ``head`` and ``family`` together, and for an unknown head family.
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
    return fields


def check_target_kinds(probes: Any, source: str) -> None:
    """Refuse probes that read different kinds of targets in one config (the cache keeps one kind per sample).

    A dense bank reads masks, a multi-label bank or kNN multi-hot vectors (`distprobe.service.targets`); the kNN and
    the convex probes classify whole samples, so they run beside a dense bank in a second config only.
    """
    bank = bank_fields(probes.bank, source) if probes.bank is not None else None
    dense = bank is not None and bank.get("family") == "dense"
    bank_multilabel = bool(bank is not None and bank.get("multilabel"))
    knn_multilabel = bool(probes.knn is not None and probes.knn.get("multilabel"))
    if dense and probes.knn is not None:
        raise ServiceConfigError(
            f"{source}: probes.knn is set with probes.bank.head='dense'; a kNN classifies whole samples but a dense "
            "bank's targets are (H, W) masks; fix: remove probes.knn here and run it with a second config"
        )
    if bank is not None and probes.knn is not None and bank_multilabel != knn_multilabel:
        raise ServiceConfigError(
            f"{source}: probes.bank.multilabel={bank_multilabel} but probes.knn.multilabel={knn_multilabel}; the "
            "cache keeps one kind of target for both; fix: set both to true (multi-hot targets) or both to false"
        )
    if not (dense or bank_multilabel or knn_multilabel):
        return
    reads = "probes.bank.head='dense' makes them (H, W) masks" if dense else "multilabel makes them multi-hot vectors"
    for name in ("ridge", "logreg", "fewshot"):
        if getattr(probes, name, None) is not None:
            raise ServiceConfigError(
                f"{source}: probes.{name} reads one class index per sample as its target, but {reads}; fix: remove "
                f"probes.{name} here and run it with a second config"
            )


def check_probe_names(probes: Any, kinds: tuple[str, ...], source: str) -> None:
    """Refuse a probe name that is empty, holds ``/``, or is another probe's name in the same config.

    The store keys each number by (probe name, head, metric) and the logs by ``ckpt/{name}...``: two probes of one
    name (a ridge named ``bank``) would write the same rows, and one job's result could never be stored.
    """
    seen: dict[str, str] = {}
    for kind in kinds:
        options = getattr(probes, kind)
        if options is None:
            continue
        name = options.get("name", kind)
        if not isinstance(name, str):
            continue  # the section's own type check names it
        if not name or "/" in name:
            raise ServiceConfigError(
                f"{source}: probes.{kind}.name={name!r}; expected a non-empty string without '/' (the probe's keys "
                f"start with it: 'ckpt/{{name}}_...'); fix: name: {kind}"
            )
        if name in seen:
            raise ServiceConfigError(
                f"{source}: probes.{kind}.name={name!r} is also probes.{seen[name]}'s name; each probe's numbers are "
                f"stored and logged under its name, so two probes cannot share one; fix: give one of them another "
                f"name (probes.{kind}.name or probes.{seen[name]}.name)"
            )
        seen[name] = kind


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
    # queue_length defaults to the train set's size, known in the job: a stand-in as large as any k, so no warning.
    stand_in = {"name": "knn", "queue_length": 2**31 - 1, **options}
    try:
        KNNConfig(num_classes=num_classes, in_features=1, **stand_in)
    except (TypeError, ValueError) as err:
        raise ServiceConfigError(f"{source}: probes.knn: {err}") from None
