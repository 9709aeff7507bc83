"""Every kind of probe refuses a name that would break its logged keys: empty, or holding '/'.

`OnlineProbe` (and the service's config) refused them, but a bank, a kNN, a ridge probe and a monitor took
``name="my/bank"`` and logged ``eval/my/bank/embedding/lr=0.1/wd=0/norm=none_top1``, which `distprobe.keys` reads back
as probe ``my``; ``name=""`` logged ``eval//embedding/...`` and ``eval/_best_top1``. Now each refuses them at
construction, naming its kind, the value and a name that works: in Lightning and in a `ProbeSet` alike.
"""

from __future__ import annotations

import pytest
from torch import nn

from distprobe.callbacks import EmbeddingMonitor, OnlineKNN, OnlineProbe, OnlineProbeBank, OnlineRidge
from distprobe.loop import ProbeSet

KEYS = {"input": "embedding", "target": "label"}
CALLBACKS = {
    "bank": lambda name: OnlineProbeBank(None, name, num_classes=3, **KEYS),
    "kNN": lambda name: OnlineKNN(None, name, num_classes=3, queue_length=8, **KEYS),
    "ridge": lambda name: OnlineRidge(None, name, num_classes=3, **KEYS),
    "monitor": lambda name: EmbeddingMonitor(None, name, input="embedding"),
}


@pytest.mark.parametrize("kind", list(CALLBACKS))
@pytest.mark.parametrize(("name", "instead"), [("my/bank", "my_bank"), ("", None)])
def test_a_callback_refuses_a_name_that_breaks_its_keys(kind, name, instead):
    suggestion = instead if instead is not None else kind.lower()
    with pytest.raises(
        ValueError, match=rf"^{kind}: argument 'name' got '{name}'; .* without '/' .* e\.g\. '{suggestion}'"
    ):
        CALLBACKS[kind](name)


def test_a_probe_set_refuses_them_too_and_names_with_other_characters_stay_valid():
    for spec in (
        {"banks": [{"name": "a/b", "num_classes": 3, **KEYS}]},
        {"knns": [{"name": "", "num_classes": 3, "queue_length": 8, **KEYS}]},
    ):
        with pytest.raises(ValueError, match=r"argument 'name' got"):
            ProbeSet.build([], **spec)
    for name in ("a b", "x.y", "grid_best"):  # only '/' splits a key
        OnlineProbeBank(None, name, num_classes=3, **KEYS)
    with pytest.raises(ValueError, match=r"without '/'"):
        OnlineProbe(None, "a/b", probe=nn.Linear(4, 3), **KEYS)  # unchanged: it refused them already
