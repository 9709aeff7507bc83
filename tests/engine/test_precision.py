"""A bank's ``matmul_precision``: set around its own forward and backward, and the process's setting put back.

The TF32 numbers themselves need a GPU (tests/bank/test_bank_gpu.py); here the plumbing is checked on the CPU, which
is what CI runs: what the CUDA switch reads while the heads' forward and backward run, that nothing leaks to the
training after a step, an evaluation or an error, that a user's own precision (either torch API) survives, and that
bad values are refused with the bank's name.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from distprobe.bank import BankConfig, ProbeBank
from distprobe.callbacks import OnlineProbeBank
from distprobe.engine.precision import float32_matmuls

D, C, B = 6, 4, 8


@pytest.fixture(autouse=True)
def process_precision() -> Iterator[None]:
    """Each test starts from, and leaves, the process's precision as it found it."""
    before = torch.backends.cuda.matmul.fp32_precision
    yield
    torch.backends.cuda.matmul.fp32_precision = before


def spied_bank(precision: str | None) -> tuple[ProbeBank, dict[str, list[str]]]:
    """A bank whose forward and weight-gradient hooks record the CUDA matmul precision they run under."""
    config = BankConfig(name="grid", inputs=["x"], num_classes=C, lr=[0.1, 0.01], in_features=D)
    config.matmul_precision = precision  # type: ignore[assignment]
    bank = ProbeBank.build(config)
    seen: dict[str, list[str]] = {"forward": [], "backward": []}
    bank.heads.register_forward_hook(lambda *_: seen["forward"].append(torch.backends.cuda.matmul.fp32_precision))
    bank.heads.flat.register_hook(lambda grad: seen["backward"].append(torch.backends.cuda.matmul.fp32_precision))
    return bank, seen


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=g), torch.randint(0, C, (B,), generator=g)


@pytest.mark.parametrize(
    ("process", "precision", "inside"),
    [
        ("none", "high", "tf32"),  # a fresh process asks nothing: the bank's TF32 stays the bank's
        ("ieee", "high", "tf32"),  # the user asked IEEE for the backbone
        ("tf32", "highest", "ieee"),  # the user asked TF32 for the backbone; the bank wants IEEE
        ("tf32", None, "tf32"),  # None on a built config (attentive and dense banks' default): follows the process
        ("ieee", None, "ieee"),
    ],
)
def test_the_heads_run_at_the_bank_s_precision_and_the_process_keeps_its_own(process, precision, inside):
    torch.backends.cuda.matmul.fp32_precision = process
    bank, seen = spied_bank(precision)
    x, y = batch()
    bank.train_step([x], y)
    assert torch.backends.cuda.matmul.fp32_precision == process  # the training's next matmuls: as before
    bank.settle()
    bank.start_eval_epoch()
    bank.eval_step([x], y)
    assert torch.backends.cuda.matmul.fp32_precision == process
    assert seen["forward"] == [inside, inside]  # the train step's forward, then the evaluation's
    assert seen["backward"] == [inside]  # the weight gradient's matmul, launched inside autograd.grad


@pytest.mark.parametrize(
    ("family", "head_options", "default"),
    [
        ("linear", None, "high"),  # TF32: accuracy measured unchanged by it (benchmarks/tf32_accuracy.py)
        ("attentive", {"num_heads": 2}, None),  # not measured: the process's setting
        ("dense", None, None),
    ],
)
def test_none_takes_the_head_family_s_default_wherever_the_bank_is_built(family, head_options, default) -> None:
    kwargs = {"num_classes": C, "head_options": head_options, "in_features": 8}
    assert BankConfig(name="grid", inputs=["x"], family=family, **kwargs).matmul_precision == default
    callback = OnlineProbeBank(None, "grid", input="x", target="y", head=family, **kwargs)
    assert callback.config.matmul_precision == default
    # An explicit value always wins over the family's default.
    for explicit in ("highest", "high"):
        config = BankConfig(name="grid", inputs=["x"], family=family, matmul_precision=explicit, **kwargs)
        assert config.matmul_precision == explicit


def test_a_default_linear_bank_steps_in_tf32_and_leaves_an_ieee_process_as_it_was() -> None:
    # What a user gets without asking: the bank's heads in TF32, the training's matmuls at the process's IEEE.
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    bank = ProbeBank.build(BankConfig(name="grid", inputs=["x"], num_classes=C, lr=[0.1, 0.01], in_features=D))
    seen: list[str] = []
    bank.heads.register_forward_hook(lambda *_: seen.append(torch.backends.cuda.matmul.fp32_precision))
    bank.heads.flat.register_hook(lambda grad: seen.append(torch.backends.cuda.matmul.fp32_precision))
    x, y = batch()
    bank.train_step([x], y)
    assert seen == ["tf32", "tf32"]  # forward, then the weight gradient
    assert torch.backends.cuda.matmul.fp32_precision == "ieee"


def test_an_error_inside_puts_the_process_precision_back() -> None:
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    seen = []

    def fails_inside() -> None:
        with float32_matmuls("high"):
            seen.append(torch.backends.cuda.matmul.fp32_precision)
            raise RuntimeError("inside")

    with pytest.raises(RuntimeError, match="inside"):
        fails_inside()
    assert seen == ["tf32"]
    assert torch.backends.cuda.matmul.fp32_precision == "ieee"


def test_a_user_of_the_legacy_api_can_still_read_and_set_it_after_a_step() -> None:
    # Writing the legacy switch then the new one makes torch.get_float32_matmul_precision raise ("mix of legacy and
    # new APIs"); restoring exactly the value found keeps the user's own calls working.
    torch.set_float32_matmul_precision("high")
    bank, _ = spied_bank("highest")
    x, y = batch()
    bank.train_step([x], y)
    assert torch.get_float32_matmul_precision() == "high"
    torch.set_float32_matmul_precision("highest")
    assert torch.backends.cuda.matmul.fp32_precision == "ieee"


def test_on_the_cpu_the_option_leaves_the_heads_bitwise_unchanged() -> None:
    # CPU matmuls do not read the CUDA switch: CI's numbers are the same whatever a config asks.
    flats = []
    for precision in ("highest", "high", None):
        bank, _ = spied_bank(precision)
        for seed in range(3):
            x, y = batch(seed)
            bank.train_step([x], y)
        bank.settle()
        flats.append(bank.heads.flat.detach().clone())
    assert torch.equal(flats[0], flats[1]) and torch.equal(flats[0], flats[2])


@pytest.mark.parametrize("value", ["tf32", "HIGH", "medium", 32, True])
def test_a_bad_value_is_refused_with_the_bank_and_the_choices_named(value) -> None:
    with pytest.raises(ValueError, match=r"bank 'grid': argument 'matmul_precision' got .*'highest', 'high'"):
        BankConfig(name="grid", inputs=["x"], num_classes=C, matmul_precision=value)
    with pytest.raises(ValueError, match=r"bank 'grid': argument 'matmul_precision'"):
        OnlineProbeBank(None, "grid", input="x", target="y", num_classes=C, matmul_precision=value)
