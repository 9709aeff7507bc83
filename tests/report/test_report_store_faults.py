"""`distprobe report` over a results store it cannot read: one line naming the store and the fix, never a traceback.

A corrupt ``distprobe_eval/results.sqlite`` used to end the report with StoreError's traceback, even when the
training's own logs held probes to plot; now the store is left out with one warning and the logs still make a report.
"""

from __future__ import annotations

import logging

from distprobe.cli import main


def _corrupt_store(run):
    store = run / "distprobe_eval" / "results.sqlite"
    store.parent.mkdir(parents=True)
    store.write_bytes(b"not a database" * 100)
    return store


def test_a_corrupt_store_alone_is_one_line_and_exit_2(tmp_path, caplog, capsys):
    store = _corrupt_store(tmp_path)
    with caplog.at_level(logging.WARNING):
        assert main(["report", str(tmp_path)]) == 2
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"{store} is corrupt" in warning and f"mv {store}" in warning and "leaves its results out" in warning
    assert "Traceback" not in capsys.readouterr().err


def test_the_training_logs_still_make_a_report_beside_a_corrupt_store(tmp_path, caplog):
    _corrupt_store(tmp_path)
    logs = tmp_path / "lightning_logs" / "version_0"
    logs.mkdir(parents=True)
    (logs / "metrics.csv").write_text("step,epoch,eval/linear_top1\n9,0,0.5\n19,1,0.625\n")
    with caplog.at_level(logging.WARNING):
        assert main(["report", str(tmp_path)]) == 0
    summary = (tmp_path / "report.md").read_text()
    assert "linear" in summary and "0.6250" in summary
    assert "is corrupt" in caplog.text
