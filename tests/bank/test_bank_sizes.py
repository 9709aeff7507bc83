"""A bank whose heads exist before its first batch refuses features of another size by name, on every rank at once.

With ``in_features`` given (or sizes from a checkpoint) the heads are built at setup. Features of another width then
failed inside the batched matmul with torch's ``Expected size for first two dimensions of batch2 tensor to be:
[1, 17] but got: [1, 6]``: at the first training batch (one int for two sources of different widths, as the
docstring allows), in the sanity check, and in ``trainer.validate`` alone. Now each is a ValueError naming the bank,
the source, both sizes and the ``in_features`` that fits. Real `lightning.Trainer` runs on one process.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tests.helpers.models import EMBED_DIM, Backbone, loader, trainer

from distprobe.callbacks import OnlineProbeBank
from distprobe.loop import ProbeSet

NARROW = 5


class TwoWidths(Backbone):
    """Returns the embedding and a narrower slice of it as a second source."""

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        out = super().training_step(batch, batch_idx)
        return {**out, "narrow": out["embedding"][:, :NARROW]}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        out = super().validation_step(batch, batch_idx)
        return {**out, "narrow": out["embedding"][:, :NARROW]}


def _bank(in_features: Any, inputs: list[str]) -> OnlineProbeBank:
    return OnlineProbeBank(None, "grid", input=inputs, target="label", num_classes=3, lr=0.1, in_features=in_features)


def test_one_size_for_two_sources_of_different_widths_is_refused_at_the_first_batch():
    bank = _bank(EMBED_DIM, ["embedding", "narrow"])
    expected = (
        rf"^bank 'grid': input 'narrow' has {NARROW} features per sample, but the bank is sized for {EMBED_DIM} .*"
        rf"set in_features=\{{'embedding': {EMBED_DIM}, 'narrow': {NARROW}\}}"
    )
    with pytest.raises(ValueError, match=expected):
        trainer([bank], max_epochs=1, limit_train_batches=2).fit(TwoWidths(), loader())


@pytest.mark.parametrize("run", ["sanity_check", "validate"])
def test_validation_before_any_training_batch_refuses_another_size(run):
    bank = _bank(EMBED_DIM + 1, ["embedding"])
    expected = rf"^bank 'grid': input 'embedding' has {EMBED_DIM} features per sample, but the bank is sized for"
    if run == "validate":
        call = lambda: trainer([bank]).validate(TwoWidths(), loader(n=16, seed=1), verbose=False)  # noqa: E731
    else:
        call = lambda: trainer([bank], num_sanity_val_steps=1).fit(TwoWidths(), loader(), loader(n=16, seed=1))  # noqa: E731
    with pytest.raises(ValueError, match=expected):
        call()


def test_sizes_that_fit_train_and_validate():
    bank = _bank({"embedding": EMBED_DIM, "narrow": NARROW}, ["embedding", "narrow"])
    t = trainer([bank], max_epochs=1, limit_train_batches=2, num_sanity_val_steps=1)
    t.fit(TwoWidths(), loader(), loader(n=16, seed=1))
    assert "eval/grid_best_top1" in t.callback_metrics


@pytest.mark.parametrize(("family", "sample"), [("linear", (5,)), ("attentive", (4, 5)), ("dense", (16, 5))])
def test_a_probe_set_bank_refuses_another_size_configured_or_loaded(family, sample):
    """The same check in a plain-torch `ProbeSet`, for every head family, whether the heads came from
    ``in_features`` or from a loaded state (was torch's batched-matmul or view error)."""

    def bank(**config: Any) -> ProbeSet:
        spec = {"name": "grid", "num_classes": 3, "inputs": ["x"], "target": "y", "lr": [0.1], "family": family}
        return ProbeSet.build([], banks=[{**spec, **config}])

    def batch(width: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        y = torch.randint(0, 3, (4, 8, 8) if family == "dense" else (4,))
        return {"x": torch.randn(4, *sample[:-1], width)}, {"y": y}

    expected = (
        r"^bank 'grid': input 'x' has 5 features per sample, but the bank is sized for 8 .* in_features=\{'x': 5\}"
    )
    with pytest.raises(ValueError, match=expected):
        bank(in_features=8).step(*batch(5))
    trained = bank()
    trained.step(*batch(8))
    resumed = bank()
    resumed.load_state_dict(trained.state_dict())
    with pytest.raises(ValueError, match=expected):
        resumed.step(*batch(5))
    resumed.step(*batch(8))  # the refused batch changed nothing: the built width still trains
