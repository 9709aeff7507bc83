"""Who decides whether a probe set's work goes on a side CUDA stream: the argument, the environment, the default.

The stream itself needs CUDA (tests/callbacks/test_overlap_gpu.py); what is decided, and what a bad switch gets, is
the same on any machine.
"""

from __future__ import annotations

import pytest

from distprobe.probeset.side_stream import LazySideStream, default_overlap, overlap_from_environment


@pytest.mark.parametrize("value", ["1", "true", "On", " yes "])
def test_the_environment_turns_it_on(monkeypatch, value):
    monkeypatch.setenv("DISTPROBE_OVERLAP", value)
    assert overlap_from_environment() is True


@pytest.mark.parametrize("value", ["0", "false", "OFF", "no"])
def test_the_environment_turns_it_off(monkeypatch, value):
    monkeypatch.setenv("DISTPROBE_OVERLAP", value)
    assert overlap_from_environment() is False
    assert LazySideStream(None, "cuda").wanted() is False  # whatever the machine


@pytest.mark.parametrize("value", ["", "2", "maybe"])
def test_a_value_that_is_neither_is_refused_when_the_set_is_built(monkeypatch, value):
    monkeypatch.setenv("DISTPROBE_OVERLAP", value)
    with pytest.raises(ValueError, match=r"DISTPROBE_OVERLAP got .*expected one of .*'1'.*'0'"):
        LazySideStream(None, None)


def test_the_argument_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("DISTPROBE_OVERLAP", "1")
    assert LazySideStream(False, "cuda").wanted() is False
    monkeypatch.setenv("DISTPROBE_OVERLAP", "0")
    assert LazySideStream(True, "cuda").wanted() is True


def test_the_default_is_on_for_one_process_on_cuda_only():
    assert default_overlap(cuda=True, processes=1) is True
    assert default_overlap(cuda=True, processes=2) is False  # the collectives' side-stream path is unchecked
    assert default_overlap(cuda=False, processes=1) is False


def test_unset_on_this_machine_follows_the_default(monkeypatch):
    import torch

    monkeypatch.delenv("DISTPROBE_OVERLAP", raising=False)
    assert LazySideStream(None, None).wanted() is default_overlap(torch.cuda.is_available(), 1)


@pytest.mark.parametrize("value", ["false", 0, 1])
def test_an_argument_that_is_not_a_bool_is_refused_when_the_set_is_built(value):
    import torch
    from torch import nn

    from distprobe.engine import ProbeConfig
    from distprobe.loop import ProbeSet, ProbeSpec

    spec = ProbeSpec(config=ProbeConfig(name="linear", probe=nn.Linear(4, 2)), input="x", target="y")
    with pytest.raises(ValueError, match=r"argument 'overlap' got .*; expected True, False or None"):
        ProbeSet.build([spec], overlap=value)  # type: ignore[arg-type]
    probes = ProbeSet.build([spec], overlap=False)  # the same spec builds with a bool
    assert set(probes.step({"x": torch.randn(3, 4)}, {"y": torch.tensor([0, 1, 0])})) == {"linear"}
