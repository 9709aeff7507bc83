"""Tapped OnlineProbes in one process with a real `lightning.Trainer`.

A tapped probe must equal its twin reading the same activation from ``training_step``'s outputs; the backbone must
train bitwise as without probes (weights, gradients, requires_grad); under torch.utils.checkpoint (reentrant and not)
the recomputed forward must not be captured again.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.checkpoint import set_checkpoint_early_stop
from torch.utils.data import DataLoader

from distprobe.callbacks import OnlineProbe
from distprobe.features import tap_inputs
from features.taps.models import IN_DIM, NUM_CLASSES, PAIRS, TokenModel, flat, our_hooks, probe_pairs
from helpers.models import RandomPoints, trainer


def _loader(size: int = 24, seed: int = 0) -> DataLoader:
    return DataLoader(RandomPoints(size, seed, in_dim=IN_DIM, num_classes=NUM_CLASSES), batch_size=4)


def steps_a_probe(pl_module: pl.LightningModule, optimizer: Any) -> bool:
    """Whether ``optimizer`` is a distprobe probe's (its parameters are those of ``pl_module.callbacks_modules``)."""
    probes = {id(p) for module in getattr(pl_module, "callbacks_modules", {}).values() for p in module.parameters()}
    return all(id(p) in probes for group in optimizer.param_groups for p in group["params"])


class GradRecorder(Callback):
    """The backbone's gradients before every optimizer step, and the block calls the tap saw per step."""

    def __init__(self) -> None:
        self.grads: list[list[torch.Tensor]] = []
        self.calls: list[int] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if steps_a_probe(pl_module, optimizer):
            return  # a probe's optimizer step: user callbacks see those too (docs/online-probe.md)
        self.grads.append([p.grad.clone() for p in pl_module.backbone.parameters()])

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any) -> None:
        shared = tap_inputs._SHARED.get(pl_module)
        taps = shared.taps._taps.values() if shared is not None else []
        self.calls.append(max((t.forwards_since_arm for t in taps if t.name == "backbone.blocks.1"), default=-1))


def _fit(callbacks: list[Callback], checkpointing: str | None = None) -> TokenModel:
    mode = None if checkpointing is None else checkpointing.removesuffix("_full_recompute")
    model = TokenModel(seed=0, checkpointing=mode)
    # Non-reentrant checkpointing stops its recomputation once it has every saved tensor back: by default before the
    # block returns, so the block's forward hooks do not run again. Without that early stop they do.
    with set_checkpoint_early_stop(not (checkpointing or "").endswith("_full_recompute")):
        trainer(callbacks, max_epochs=1).fit(model, _loader(), _loader(8, seed=1))
    return model


#: checkpointing -> how often the tapped block runs per training step.
FORWARDS = {None: 1, "reentrant": 2, "non_reentrant": 1, "non_reentrant_full_recompute": 2}


@pytest.mark.parametrize("checkpointing", list(FORWARDS))
def test_tapped_probe_equals_explicit_probe_and_backbone_is_unchanged(checkpointing: str | None) -> None:
    probes = probe_pairs()
    probed_grads, plain_grads = GradRecorder(), GradRecorder()
    initial = {p.name: flat(p.probe_spec) for p in probes}
    probed = _fit([*probes, probed_grads], checkpointing)
    plain = _fit([plain_grads], checkpointing)

    for i in range(len(PAIRS)):
        tapped, explicit = (next(p for p in probes if p.name == n) for n in (f"tap{i}", f"explicit{i}"))
        torch.testing.assert_close(flat(tapped.probe.module), flat(explicit.probe.module), rtol=0, atol=1e-6)
        assert not torch.equal(flat(tapped.probe.module), initial[tapped.name])  # it trained
    # A recomputed block ran twice a step (forward, then in the backward); the first was kept, as the twin shows.
    assert probed_grads.calls == [FORWARDS[checkpointing]] * 6
    # The backbone: same gradients at every step, same weights, nothing frozen or unfrozen, no hook left.
    assert len(probed_grads.grads) == len(plain_grads.grads) == 6
    for got, want in zip(probed_grads.grads, plain_grads.grads):
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    for a, b in zip(probed.backbone.parameters(), plain.backbone.parameters(), strict=True):
        assert torch.equal(a, b) and a.requires_grad
    assert our_hooks(probed) == 0 and probed not in tap_inputs._SHARED


def test_taps_in_validate_only_and_a_second_fit() -> None:
    probes = probe_pairs(PAIRS[:1])
    model = TokenModel(seed=0)
    fit = trainer(probes, max_epochs=1)
    fit.fit(model, _loader())
    first = flat(probes[0].probe.module)
    fit = trainer(probes, max_epochs=1)
    fit.fit(model, _loader())  # a second fit re-attaches the hooks
    assert not torch.equal(first, flat(probes[0].probe.module))
    torch.testing.assert_close(flat(probes[0].probe.module), flat(probes[1].probe.module), rtol=0, atol=1e-6)
    metrics = trainer(probes).validate(model, _loader(8, seed=1), verbose=False)[0]
    assert metrics["eval/tap0_top1"] == pytest.approx(metrics["eval/explicit0_top1"])
    assert our_hooks(model) == 0


def _probe(input: str, **kwargs: Any) -> OnlineProbe:  # noqa: A002 - the argument's name
    return OnlineProbe(None, name="p", input=input, target="label", probe=nn.Linear(12, NUM_CLASSES), **kwargs)


def test_a_key_wins_over_a_submodule_of_the_same_name() -> None:
    class KeyNamedLikeModule(TokenModel):
        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
            outputs = super().training_step(batch, batch_idx)
            outputs["backbone"] = {"proj": torch.zeros(batch["x"].shape[0], 12)}
            return outputs

    probe = _probe("backbone.proj", optimizer={"type": "SGD", "lr": 0.1})
    weight, bias = (p.detach().clone() for p in probe.probe_spec.parameters())
    trainer([probe], max_epochs=1).fit(KeyNamedLikeModule(), _loader())
    # Zero features: only the bias moved (the tapped (B, N, D) output would not even fit the probe), and no hook.
    assert torch.equal(probe.probe.module.weight, weight) and not torch.equal(probe.probe.module.bias, bias)


def test_errors_name_the_probe_the_value_and_the_fix() -> None:
    with pytest.raises(ValueError, match=r"probe 'p': argument 'input' got 'backbone.blocks:avg': unknown pooling"):
        _probe("backbone.blocks:avg")
    with pytest.raises(ValueError, match=r"may also name a submodule.*close names: \['backbone.blocks',"):
        trainer([_probe("backbone.blocs")], max_epochs=1).fit(TokenModel(), _loader())
    with pytest.raises(ValueError, match=r"no submodule 'backbone.blocs'.*close names"):
        trainer([_probe("backbone.blocs:cls")], max_epochs=1).fit(TokenModel(), _loader())
    with pytest.raises(ValueError, match=r"'backbone.blocks' has 3 child modules, fewer than 'last4'"):
        trainer([_probe("backbone.blocks:last4")], max_epochs=1).fit(TokenModel(), _loader())
    with pytest.raises(ValueError, match=r"token pooling needs a \(batch, tokens, dim\) output, got shape \(4, 30\)"):
        trainer([_probe("backbone.embed:cls")], max_epochs=1).fit(TokenModel(), _loader())

    class Skips(TokenModel):
        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
            out = self.backbone.proj(self.backbone.embed(batch["x"]).reshape(-1, 5, 6))
            return {"loss": out.pow(2).mean()}

    with pytest.raises(ValueError, match=r"module 'backbone.blocks.1' did not run a forward in this step"):
        trainer([_probe("backbone.blocks.1:cls")], max_epochs=1).fit(Skips(), _loader())
