"""The probing service with an attentive bank (``probes.bank.head: attentive``): the cache keeps each sample's token
shape, the heads train on ``(B, N, D)`` tokens, and pooled features are refused with a message saying what to do."""

from __future__ import annotations

import json

import pytest
import torch
from tests.service.models import eval_config, pretrain

from distprobe.service.config import ServiceConfigError
from distprobe.service.job import evaluate_checkpoint
from distprobe.service.store import ResultsStore

TOKENS, DIM = 4, 4  # the encoder's 16 features as 4 tokens of 4


def tokens(backbone: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """``features.forward``: the encoder's output as ``(B, N, D)`` tokens."""
    return backbone(inputs).view(inputs.shape[0], TOKENS, DIM)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    (path,) = pretrain(str(out), steps=10, every_n_steps=10)
    return out, path


def _evaluate(run, tmp_path, features):
    out, path = run
    bank = {"head": "attentive", "head_options": {"num_queries": 2}, "lr": [1e-3, 1e-2], "optimizer": "AdamW"}
    config = eval_config(
        tmp_path / "eval.yaml",
        probes={"epochs": 2, "batch_size": 20, "bank": bank, "knn": None},
        features={"keep": True, "cache_dir": str(tmp_path / "cache"), **features},
        results={"logger": "none", "store": str(tmp_path / "results.sqlite")},
    )
    return evaluate_checkpoint(path, config, run_dir=out), path


def test_an_attentive_bank_trains_on_cached_tokens(checkpoint, tmp_path):
    summary, path = _evaluate(checkpoint, tmp_path, {"forward": "tests.service.test_attentive_service:tokens"})
    (folder,) = (tmp_path / "cache").iterdir()
    assert json.loads((folder / "train.json").read_text())["shape"] == [TOKENS, DIM]
    rows = {(head, metric): value for _, _, _, head, metric, value, _ in ResultsStore(summary["store"]).results(path)}
    heads = ["features/lr=0.001/wd=0/norm=none", "features/lr=0.01/wd=0/norm=none"]
    for head in heads:
        assert 0.0 <= rows[(head, "top1")] <= 1.0
    assert summary["values"]["best_head"] in heads and rows[(summary["values"]["best_head"], "selected")] == 1.0


def test_pooled_features_are_refused_for_an_attentive_bank(checkpoint, tmp_path):
    with pytest.raises(ServiceConfigError, match=r"probes.bank.head='attentive' reads \(tokens, dim\) tokens per "):
        _evaluate(checkpoint, tmp_path, {})
