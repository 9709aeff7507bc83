"""`distprobe.keys`: every kind of logged key formats and parses back to the same parts.

The keys written by real fits are checked through `distprobe report` (tests/report/test_report.py); these tests pin
the grammar itself, including names that hold ``_`` and keys of no probe.
"""

from __future__ import annotations

import pytest

from distprobe import keys
from distprobe.keys import LoggedKey

HEAD = keys.head_id("embedding", 0.01, 1e-05, "none")
TAP_HEAD = keys.head_id("backbone.layer_4/last2+mean", 3.0, 0.0, "bn")

# (key as logged, its parts): one row per kind of key any writer of distprobe logs.
KINDS = [
    ("train/linear_loss", LoggedKey("train", "linear", keys.LOSS)),
    ("train/linear_loss_epoch", LoggedKey("train", "linear", keys.LOSS_EPOCH)),
    ("train/linear_skipped_steps", LoggedKey("train", "linear", keys.SKIPPED_STEPS)),
    ("train/linear_top1", LoggedKey("train", "linear", "top1")),
    ("eval/linear_top5", LoggedKey("eval", "linear", "top5")),
    ("train/linear_bad_batches/nonfinite_features", LoggedKey("train", "linear", "bad_batches/nonfinite_features")),
    ("hparams/lr_linear", LoggedKey("hparams", "linear", keys.LR)),
    ("train/grid/embedding/lr=0.01/wd=1e-05/norm=none_top1", LoggedKey("train", "grid", "top1", HEAD)),
    ("train/grid/embedding/lr=0.01/wd=1e-05/norm=none_loss", LoggedKey("train", "grid", keys.LOSS, HEAD)),
    ("eval/grid/backbone.layer_4/last2+mean/lr=3/wd=0/norm=bn_top1", LoggedKey("eval", "grid", "top1", TAP_HEAD)),
    ("eval/grid_best_top1", LoggedKey("eval", "grid", "top1", keys.BEST)),
    ("eval/grid_best_head", LoggedKey("eval", "grid", keys.BEST_HEAD)),
    ("train/grid_loss_epoch", LoggedKey("train", "grid", keys.LOSS_EPOCH)),
    ("eval/knn_top1", LoggedKey("eval", "knn", "top1")),
    ("eval/knn_k20_top1", LoggedKey("eval", "knn", "top1", "k20")),
    ("train/backbone_rankme", LoggedKey("train", "backbone", "rankme")),
    ("eval/backbone_lidar", LoggedKey("eval", "backbone", "lidar")),
    ("ckpt/grid_best_top1", LoggedKey("ckpt", "grid", "top1", keys.BEST)),
    ("ckpt/grid/embedding/lr=0.01/wd=1e-05/norm=none_top1", LoggedKey("ckpt", "grid", "top1", HEAD)),
    ("ckpt/knn_k5_top1", LoggedKey("ckpt", "knn", "top1", "k5")),
    ("eval/ridge/l2=0.01_top1", LoggedKey("eval", "ridge", "top1", keys.ridge_head(0.01))),
    ("eval/ridge_best_l2", LoggedKey("eval", "ridge", "l2", keys.BEST)),
    ("ckpt/fewshot/shots=5/seed=0_top1", LoggedKey("ckpt", "fewshot", "top1", keys.episode_id(5, 0))),
    ("ckpt/fewshot/shots=5_top1_std", LoggedKey("ckpt", "fewshot", "top1_std", "shots=5")),
]


@pytest.mark.parametrize(("logged", "parts"), KINDS, ids=[k for k, _ in KINDS])
def test_every_kind_of_key_formats_and_parses_back(logged, parts):
    assert parts.format() == logged
    assert keys.parse(logged) == parts
    assert keys.parse(logged, names=[parts.probe, "other"]) == parts


@pytest.mark.parametrize(("logged", "parts"), [k for k in KINDS if k[1].stage != "hparams"], ids=lambda x: str(x))
def test_a_relative_key_made_absolute_is_the_logged_key(logged, parts):
    relative = keys.relative_key(parts.metric, head=parts.head)
    assert keys.split_relative(relative) == (parts.head, parts.metric)
    assert keys.absolute_key(parts.stage, parts.probe, relative) == logged


def test_the_builders_agree_with_the_grammar():
    assert keys.key(keys.TRAIN, "p", keys.bad_batches("nonfinite_targets")) == "train/p_bad_batches/nonfinite_targets"
    assert keys.stage_prefix(keys.LOG_STAGE["val"], "p") + "top1" == keys.key(keys.EVAL, "p", "top1")
    assert keys.key(keys.EVAL, "knn", "top1", head=keys.knn_head(20)) == "eval/knn_k20_top1"
    assert keys.predictions("linear") == "linear_preds"  # put in the step's outputs, never logged
    assert keys.parse("train/p_bad_batches/nonfinite_targets").reason == "nonfinite_targets"
    assert keys.parse("train/p_loss").reason is None
    assert keys.absolute_keys({"best_top1": 1.0, f"{HEAD}_top1": 2.0}, "eval", "g") == {
        "eval/g_best_top1": 1.0,
        f"eval/g/{HEAD}_top1": 2.0,
    }


def test_a_head_id_parses_into_the_numbers_it_was_written_with():
    parts = keys.parse_head_id(TAP_HEAD)
    assert parts == keys.HeadId(source="backbone.layer_4/last2+mean", lr="3", weight_decay="0", normalization="bn")
    assert keys.parse_head_id(HEAD) == keys.HeadId("embedding", "0.01", "1e-05", "none")
    assert keys.parse_head_id("embedding/lr=0.1") is None
    assert keys.knn_k(keys.knn_head(200)) == 200
    assert keys.knn_k("k") is None and keys.knn_k("best") is None


def test_names_that_hold_underscores_split_at_the_known_name():
    # Without the names, the last '_' would end the name: 'my_probe_f1' + 'macro'.
    assert keys.parse("eval/my_probe_f1_macro", names=["my_probe", "my"]) == LoggedKey("eval", "my_probe", "f1_macro")
    assert keys.parse("eval/my_probe_f1_macro") == LoggedKey("eval", "my_probe_f1", "macro")
    # Reserved metrics and heads end a name even without the names.
    assert keys.parse("train/my_probe_loss_epoch") == LoggedKey("train", "my_probe", keys.LOSS_EPOCH)
    assert keys.parse("eval/my_knn_k10_top1") == LoggedKey("eval", "my_knn", "top1", "k10")
    assert keys.parse("eval/my_bank_best_top1") == LoggedKey("eval", "my_bank", "top1", keys.BEST)
    assert keys.parse("train/my_bank_bad_batches/nonfinite_features").probe == "my_bank"


@pytest.mark.parametrize(
    "logged",
    [
        "train/ssl_loss",  # a probe's form: only the caller's names tell it is the model's own
        "epoch",
        "lr-SGD",
        "offline/logreg_top1",
        "train/ssl/loss",
        "train/grid/not_a_head_top1",
        "train/",
        "hparams/momentum_linear",
    ],
)
def test_keys_of_no_probe_parse_to_none_given_the_probe_names(logged):
    assert keys.parse(logged, names=["linear", "grid"]) is None
    if logged != "train/ssl_loss":
        assert keys.parse(logged) is None
