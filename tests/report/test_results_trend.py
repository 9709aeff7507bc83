"""`distprobe results`' trend line follows each config's headline score, never a hyper-parameter or a side metric.

It used to follow the first key in sorted order: a logreg-only config's trend was its chosen C ("best 100.0000"), a
ridge-only one's a fixed lambda's top-1 instead of the selected one's, a multi-label bank's its macro F1 instead of
the mAP that chose its head.
"""

from __future__ import annotations

import pytest

from distprobe.cli import main
from distprobe.service.store import ResultRow, ResultsStore


def _store(tmp_path, rows_by_step):
    store = ResultsStore(tmp_path / "distprobe_eval" / "results.sqlite")
    for step, rows in rows_by_step.items():
        store.record_results(f"/run/step={step}.ckpt", step, "h" * 16, [ResultRow(*row) for row in rows])
    return store


def _trend(tmp_path, capsys) -> str:
    assert main(["results", str(tmp_path)]) == 0
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("trend ")]
    return line


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        (  # logreg alone: C moves 100 -> 0.1 while the top-1 rises
            lambda s: [("logreg", "best", "C", 100.0 / 10**s), ("logreg", "best", "top1", 0.5 + 0.1 * s)],
            "trend logreg_best_top1 (config hhhhhhhh): 0.5000 at step 0 -> 0.7000 at step 2",
        ),
        (  # ridge alone: the selected lambda's top-1, not the first lambda's
            lambda s: [
                ("ridge", "l2=0.01", "top1", 0.2),
                ("ridge", "best", "l2", 1.0),
                ("ridge", "best", "top1", 0.6 + 0.1 * s),
            ],
            "trend ridge_best_top1 (config hhhhhhhh): 0.6000 at step 0 -> 0.8000 at step 2",
        ),
        (  # a multi-label bank: its best head by mAP
            lambda s: [("bank", "best", "f1_macro", 0.9), ("bank", "best", "mAP", 0.3 + 0.1 * s)],
            "trend bank_best_mAP (config hhhhhhhh): 0.3000 at step 0 -> 0.5000 at step 2",
        ),
        (  # a bank and a kNN (the order that already worked stays)
            lambda s: [("bank", "best", "top1", 0.4), ("knn", "k20", "top1", 0.9), ("bank", "best", "top3", 0.99)],
            "trend bank_best_top1 (config hhhhhhhh): 0.4000 at step 0 -> 0.4000 at step 2",
        ),
    ],
    ids=["logreg", "ridge", "multilabel", "bank_and_knn"],
)
def test_the_trend_follows_the_headline_score(tmp_path, capsys, rows, expected):
    _store(tmp_path, {step: rows(step) for step in range(3)})
    assert _trend(tmp_path, capsys).startswith(expected)


def test_a_checkpoint_without_a_step_stays_out_of_the_trend(tmp_path, capsys):
    """It was sorted last and became the trend's end: '0.4000 at step 10 -> 0.3000 at step None'."""
    store = _store(tmp_path, {10: [("bank", "best", "top1", 0.4)], 20: [("bank", "best", "top1", 0.5)]})
    store.record_results("/run/final.ckpt", None, "h" * 16, [ResultRow("bank", "best", "top1", 0.3)])
    line = _trend(tmp_path, capsys)
    assert line.startswith("trend bank_best_top1 (config hhhhhhhh): 0.4000 at step 10 -> 0.5000 at step 20 (")
    assert "over 2 checkpoint(s)" in line and "None" not in line
