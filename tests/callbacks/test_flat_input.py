"""The members sized by one input's width (kNN, ridge): features of another width than the engine's are refused on the
first batch with a message naming the member, the input, both widths and the fix, in a real Trainer and in a
`ProbeSet`, whether the size was configured or came from a loaded state."""

import pytest
import torch

from distprobe.callbacks import OnlineKNN, OnlineRidge
from distprobe.loop import ProbeSet
from helpers.models import EMBED_DIM, NUM_CLASSES, Backbone, loader, trainer

MEMBERS = {
    "kNN": (OnlineKNN, "knns", {"queue_length": 64, "k": (1,)}),
    "ridge": (OnlineRidge, "ridges", {}),
}


@pytest.mark.parametrize("kind", MEMBERS)
def test_a_callback_sized_for_another_width_fails_fast_naming_both_widths(kind):
    callback_type, _, options = MEMBERS[kind]
    callback = callback_type(
        None, "flat", input="embedding", target="label", num_classes=NUM_CLASSES, in_features=EMBED_DIM + 3, **options
    )
    t = trainer([callback], max_epochs=1, limit_val_batches=0)
    expected = (
        f"{kind} 'flat': input 'embedding' has {EMBED_DIM} features per sample, but the probe is sized for "
        f"{EMBED_DIM + 3} .* set 'in_features' to {EMBED_DIM}"
    )
    with pytest.raises(ValueError, match=expected):
        t.fit(Backbone(), loader(n=64))


@pytest.mark.parametrize("kind", MEMBERS)
def test_the_configured_width_trains(kind):
    callback_type, _, options = MEMBERS[kind]
    callback = callback_type(
        None, "flat", input="embedding", target="label", num_classes=NUM_CLASSES, in_features=EMBED_DIM, **options
    )
    t = trainer([callback], max_epochs=1)
    t.fit(Backbone(), loader(n=64), loader(n=32, seed=1))
    assert t.state.finished
    assert 0.0 <= float(t.callback_metrics["eval/flat_top1" if kind == "kNN" else "eval/flat_best_top1"]) <= 1.0


def _probe_set(kind, **config):
    _, argument, options = MEMBERS[kind]
    member = {"name": "flat", "num_classes": 3, "input": "emb", "target": "y", **options, **config}
    return ProbeSet.build([], **{argument: [member]})


def _batch(width, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"emb": torch.randn(6, width, generator=g)}, {"y": torch.randint(0, 3, (6,), generator=g)}


@pytest.mark.parametrize("kind", MEMBERS)
def test_a_probe_set_member_refuses_another_width_configured_or_loaded(kind):
    with pytest.raises(ValueError, match=f"{kind} 'flat': input 'emb' has 5 features per sample, .* sized for 8"):
        _probe_set(kind, in_features=8).step(*_batch(5))

    trained = _probe_set(kind)
    trained.step(*_batch(8))  # sized from its first batch
    resumed = _probe_set(kind)
    resumed.load_state_dict(trained.state_dict())  # sized from the saved state
    with pytest.raises(ValueError, match=f"{kind} 'flat': input 'emb' has 5 features per sample, .* sized for 8"):
        resumed.step(*_batch(5))
    resumed.step(*_batch(8, seed=1))  # the refused batch changed nothing: the right width still trains
