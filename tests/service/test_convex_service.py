"""The service's convex probes (``probes.ridge``, ``probes.logreg``, ``probes.fewshot``) and bootstrap intervals.

A real in-process ``distprobe eval`` of a real Lightning checkpoint: its stored numbers must equal the convex core
(`distprobe.convex`) called directly on the same cached features, every top-1 carries an interval that holds it,
and `distprobe results` shows them. A job folder holding some finished episodes (a requeued job) redoes only the
others. 1 rank == 2 ranks is checked by tests/service/test_eval.py's 2-task job, whose config includes these probes.
"""

from __future__ import annotations

import json

import pytest
import torch
from tests.service.models import CLASSES, eval_config, labeled

from distprobe.bank.selection import selects
from distprobe.convex import RidgeStatistics, logreg_grid, run_fewshot, summarise
from distprobe.report.results_table import render
from distprobe.service.job import evaluate_checkpoint
from distprobe.service.published import read_result
from distprobe.service.store import ResultsStore
from distprobe.service.train_convex import episode_file, read_episodes

L2 = [0.001, 1.0]
C_GRID = [0.01, 1.0, 100.0]
SHOTS, SEEDS, REG = [1, 5], 2, 0.1
CONVEX = {
    "ridge": {"l2": L2},
    "logreg": {"c_grid": C_GRID, "chain": 2, "max_iter": 200},
    "fewshot": {"shots": SHOTS, "seeds": SEEDS, "reg": REG},
    "intervals": {"resamples": 300, "seed": 1},
}


def convex_probes() -> dict:
    """The probes of these tests: a one-head bank, one k and the three convex probes (test_eval.py reuses them)."""
    return {"epochs": 1, "batch_size": 20, "bank": {"lr": [0.1]}, "knn": {"k": [5]}, **CONVEX}


def _cached(cache):
    (folder,) = cache.iterdir()
    out = {}
    for split in ("train", "val"):
        meta = json.loads((folder / f"{split}.json").read_text())
        features = torch.from_file(str(folder / f"{split}.features"), size=meta["size"] * meta["dim"])
        out[split] = features.view(meta["size"], meta["dim"]).clone(), labeled(split).labels
    return out


def _evaluate(trained_run, tmp_path, **kwargs):
    out, checkpoints = trained_run
    cache = tmp_path / "cache"
    config = eval_config(
        tmp_path / "eval.yaml",
        probes=convex_probes(),
        features={"keep": True, "cache_dir": str(cache)},
        results={"logger": "none", "store": str(tmp_path / "store.sqlite")},
    )
    summary = evaluate_checkpoint(checkpoints[0], config, run_dir=out, **kwargs)
    return summary, cache, checkpoints[0]


def test_convex_rows_equal_the_core_on_the_cached_features_with_intervals_shown(trained_run, tmp_path):
    summary, cache, checkpoint = _evaluate(trained_run, tmp_path)
    store = ResultsStore(summary["store"])
    rows = {(r.probe, r.head, r.metric): r for _, _, _, r in store.result_rows(checkpoint)}
    (train_x, train_y), (val_x, val_y) = _cached(cache).values()

    # Ridge: each lambda's top-1 is the float64 closed form on the whole training set; the best on the report split.
    stats = RidgeStatistics(train_x.shape[1], CLASSES)
    stats.update(train_x, train_y)
    correct = stats.solve(L2).predict(val_x) == val_y  # (L, N_val)
    for i, l2 in enumerate(L2):
        assert rows[("ridge", f"l2={l2:g}", "top1")].value == pytest.approx(correct[i].double().mean().item(), abs=1e-6)
    best = L2.index(rows[("ridge", "best", "l2")].value)
    report = ~selects(torch.arange(val_y.numel()), 0.2)
    expected = correct[best, report].double().mean().item()
    assert rows[("ridge", "best", "top1")].value == pytest.approx(expected, abs=1e-6)

    # Logistic regression: DINOv2/v3's protocol called directly.
    direct = logreg_grid(train_x, train_y, val_x, val_y, CLASSES, c_grid=C_GRID, chain=2, max_iter=200)
    assert rows[("logreg", "best", "C")].value == direct.best_c
    assert rows[("logreg", "best", "top1")].value == pytest.approx(direct.val_top1, abs=1e-9)

    # Few-shot: every episode and each shot count's mean and std over seeds.
    episodes = run_fewshot(train_x, train_y, val_x, val_y, CLASSES, shots=SHOTS, seeds=SEEDS, solver="ridge", reg=REG)
    for episode in episodes:
        assert rows[("fewshot", episode.id, "top1")].value == pytest.approx(episode.top1, abs=1e-9)
    for shots in summarise(episodes):
        assert rows[("fewshot", f"shots={shots.shots}", "top1")].value == pytest.approx(shots.mean, abs=1e-9)
        assert rows[("fewshot", f"shots={shots.shots}", "top1_std")].value == pytest.approx(shots.std, abs=1e-9)
    assert summary["values"]["fewshot_shots=5_top1"] == rows[("fewshot", "shots=5", "top1")].value

    # Every top-1 of every probe has an interval around it; the others (the chosen C, std) have none.
    top1 = [r for key, r in rows.items() if key[2] == "top1"]
    assert {r.probe for r in top1} == {"bank", "knn", "ridge", "logreg", "fewshot"}
    for row in top1:
        assert row.low is not None and row.high is not None, row
        assert row.low <= row.value <= row.high and row.high - row.low < 0.5, row
    assert rows[("logreg", "best", "C")].low is None and rows[("fewshot", "shots=5", "top1_std")].high is None

    # distprobe results: the table shows '0.7100 [0.7000, 0.7200]', JSON and CSV hold both ends.
    table = render(store, "table")
    ridge_best = rows[("ridge", "best", "top1")]
    assert f"{ridge_best.value:.4f} [{ridge_best.low:.4f}, {ridge_best.high:.4f}]" in table
    assert "seed=" not in table and "fewshot/shots=5_top1" in table
    (as_json,) = json.loads(render(store, "json"))
    logreg = rows[("logreg", "best", "top1")]
    assert as_json["intervals"]["ckpt/logreg_best_top1"] == [logreg.low, logreg.high]
    header = render(store, "csv").splitlines()[0].split(",")
    assert "ckpt/knn_k5_top1_low" in header and "ckpt/knn_k5_top1_high" in header


def test_a_requeued_job_redoes_only_the_episodes_its_folder_lacks(trained_run, tmp_path):
    job_dir = tmp_path / "job"
    # The first run of the job finished one episode before it died; its file is planted with every answer right, so
    # a value of 1.0 in the published result shows it was read back, not solved again.
    kept = episode_file(job_dir, "fewshot", "shots=5/seed=1")
    kept.parent.mkdir(parents=True)
    val_size = len(labeled("val"))
    record = {"format": 1, "id": "shots=5/seed=1", "shots": 5, "seed": 1, "reg": REG, "correct": "1" * val_size}
    kept.write_text(json.dumps(record))

    summary, cache, checkpoint = _evaluate(trained_run, tmp_path, job_dir=job_dir, claim="c1")
    published = {(r.probe, r.head, r.metric): r.value for r in read_result(job_dir).rows}
    assert published[("fewshot", "shots=5/seed=1", "top1")] == 1.0
    (train_x, train_y), (val_x, val_y) = _cached(cache).values()
    others = run_fewshot(train_x, train_y, val_x, val_y, CLASSES, shots=SHOTS, seeds=SEEDS, solver="ridge", reg=REG)
    for episode in others:
        if episode.id != "shots=5/seed=1":
            assert published[("fewshot", episode.id, "top1")] == pytest.approx(episode.top1, abs=1e-9)
    # Every episode is now kept in the job's folder, so a third run would redo none.
    wanted = [f"shots={s}/seed={seed}" for s in SHOTS for seed in range(SEEDS)]
    assert sorted(read_episodes(job_dir, "fewshot", wanted, val_size)) == sorted(wanted)
    assert read_episodes(job_dir, "fewshot", wanted, val_size)["shots=5/seed=1"].top1 == 1.0


def test_a_store_written_before_intervals_gets_null_intervals_and_takes_new_rows(tmp_path):
    """The ``results`` table of an older release has no low/high columns: they are added, null, when it is opened."""
    import sqlite3

    from distprobe.service.store import ResultRow

    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE results (checkpoint TEXT NOT NULL, step INTEGER, probe TEXT NOT NULL, head TEXT NOT NULL,"
        " metric TEXT NOT NULL, value REAL NOT NULL, config_hash TEXT NOT NULL, created REAL NOT NULL,"
        " PRIMARY KEY (checkpoint, config_hash, probe, head, metric));"
        "INSERT INTO results VALUES ('old.ckpt', 10, 'knn', 'k5', 'top1', 0.5, 'h', 0.0);"
    )
    db.commit()
    db.close()
    store = ResultsStore(path)
    store.record_results("new.ckpt", 20, "h", [ResultRow("knn", "k5", "top1", 0.6, low=0.55, high=0.65)])
    found = {checkpoint: row for checkpoint, _, _, row in store.result_rows()}
    assert found["old.ckpt"] == ResultRow("knn", "k5", "top1", 0.5)
    assert found["new.ckpt"] == ResultRow("knn", "k5", "top1", 0.6, low=0.55, high=0.65)
    assert "0.6000 [0.5500, 0.6500]" in render(store, "table")


def test_a_published_result_keeps_each_rows_interval_or_its_absence(tmp_path):
    """A job's ``result.json`` row is ``[probe, head, metric, value]`` plus ``low, high`` only where both exist."""
    from distprobe.service.published import RESULT_NAME, PublishedResult, publish_result
    from distprobe.service.store import ResultRow

    rows = [ResultRow("knn", "k5", "top1", 0.6, low=0.55, high=0.65), ResultRow("knn", "k5", "top5", 0.9, low=0.8)]
    publish_result(tmp_path, PublishedResult(checkpoint="c.ckpt", step=3, config_hash="h", claim=None, rows=rows))
    written = json.loads((tmp_path / RESULT_NAME).read_text())["rows"]
    assert written == [["knn", "k5", "top1", 0.6, 0.55, 0.65], ["knn", "k5", "top5", 0.9]]
    assert read_result(tmp_path).rows == [rows[0], ResultRow("knn", "k5", "top5", 0.9)]


def test_columns_resampled_together_get_the_intervals_each_would_get_alone():
    """The service resamples a table's columns together (one draw of indices): the same draws as one column alone."""
    from distprobe.convex import bootstrap_interval
    from distprobe.service.config import IntervalsConfig
    from distprobe.service.intervals import interval_columns

    generator = torch.Generator().manual_seed(0)
    table = (torch.rand(3000, 5, generator=generator) < torch.linspace(0.1, 0.9, 5)).double()
    spec = IntervalsConfig(resamples=400, level=0.9, seed=7)
    together = interval_columns(table, spec)
    for column in range(5):
        alone = bootstrap_interval(table[:, column], resamples=400, level=0.9, seed=7)
        assert together[column] == pytest.approx((alone.low, alone.high), abs=1e-12)
    assert interval_columns(table, IntervalsConfig(resamples=0)) is None


def test_distprobe_report_draws_the_intervals_as_bars_and_a_band(tmp_path):
    """`distprobe report` reads the store's intervals: a bar at each checkpoint and a band through them."""
    pytest.importorskip("matplotlib")
    from distprobe.report.plot import figure
    from distprobe.report.probes import probes_of
    from distprobe.report.readers import read_run
    from distprobe.service.store import ResultRow

    store = ResultsStore(tmp_path / "distprobe_eval" / "results.sqlite")
    points = {10: (0.5, 0.45, 0.56), 20: (0.6, 0.55, 0.66), 30: (0.7, 0.64, 0.75)}
    for step, (value, low, high) in points.items():
        rows = [ResultRow("ridge", "best", "top1", value, low=low, high=high), ResultRow("ridge", "best", "l2", 0.01)]
        store.record_results(f"step={step}.ckpt", step, "hash", rows)
    (axes,) = figure(probes_of(read_run(tmp_path)), "test").axes
    (band,) = [c for c in axes.collections if c.get_label() == "checkpoints: best head, interval"]
    corners = {tuple(v) for v in band.get_paths()[0].vertices.tolist()}
    ends = {(s, low) for s, (_, low, _) in points.items()} | {(s, high) for s, (_, _, high) in points.items()}
    assert ends <= corners
    (bars,) = [c for c in axes.collections if c.get_label() == "_best head interval bars"]
    assert [segment.tolist() for segment in bars.get_segments()] == [
        [[s, low], [s, high]] for s, (_, low, high) in points.items()
    ]


def test_a_config_of_convex_probes_alone_runs_without_intervals_when_they_are_off(trained_run, tmp_path):
    out, checkpoints = trained_run
    config = eval_config(
        tmp_path / "eval.yaml",
        probes={"bank": None, "knn": None, "ridge": {"l2": 0.01}, "intervals": {"resamples": 0}},
        results={"logger": "none", "store": str(tmp_path / "store.sqlite")},
    )
    summary = evaluate_checkpoint(checkpoints[1], config, run_dir=out)
    rows = [row for *_, row in ResultsStore(summary["store"]).result_rows(checkpoints[1])]
    assert {(r.probe, r.head, r.metric) for r in rows} == {
        ("ridge", "l2=0.01", "top1"),
        ("ridge", "best", "top1"),
        ("ridge", "best", "l2"),
    }
    assert all(r.low is None and r.high is None for r in rows)
    assert summary["values"]["ridge_best_l2"] == 0.01 and summary["values"]["best_head"] is None
