"""The benchmarks' CI forms: each runs on the CPU for a few steps; no assertion on speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _benchmark(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``benchmarks/{script}`` as a user would; fail with its output unless it exits 0."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow  # a benchmark's smoke run
def test_overhead_benchmark_smoke_runs_every_variant(tmp_path: Path) -> None:
    out = tmp_path / "smoke.json"
    proc = _benchmark("overhead.py", "--smoke", "--json", str(out))
    result = json.loads(out.read_text())
    rows = {row["variant"]: row for row in result["workloads"]["tiny"]["rows"]}
    for variant in ("none", "distprobe_x1", "distprobe_x8", "paramgroup"):
        assert rows[variant]["median_ms"] > 0
    assert "overhead" in rows["distprobe_x1"]
    peer = result["environment"]["stable_pretraining"]
    if isinstance(peer, str):
        # Without the bench extra the peer is skipped, and the benchmark says so.
        assert peer.startswith("skipped")
        assert "stable_pretraining: skipped" in proc.stdout
    else:
        assert {"spt_none", "spt_x1", "spt_x8"} <= set(rows)
    assert "| variant | median ms/step |" in proc.stdout


@pytest.mark.slow  # a benchmark's smoke run
def test_bank_levers_smoke_reaches_the_bank_optimizer_and_matches_the_eager_step(tmp_path: Path) -> None:
    """On a CPU every lever is off but the fused update's eager form, which must be bitwise the bank's own update.

    The fused calls count shows that the benchmark's patch still reaches the bank optimizer's SGD maths (a refactor
    that bypassed it would time nothing).
    """
    out = tmp_path / "levers.json"
    _benchmark("bank_levers.py", "--smoke", "--skip-timing", "--json", str(out))
    exactness = json.loads(out.read_text())["exactness"]
    assert exactness["fused_update_calls"] > 0
    assert all(exactness[v]["bitwise"] for v in ("side", "fused", "tf32", "all"))


@pytest.mark.slow  # a benchmark's smoke run
def test_update_bandwidth_benchmark_smoke_times_every_row(tmp_path: Path) -> None:
    out = tmp_path / "bandwidth.json"
    _benchmark("update_bandwidth.py", "--smoke", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert list(rows) == ["copy", "floor", "fused", "eager"]
    assert all(row["ms"] > 0 and row["gb_per_s"] > 0 for row in rows.values())


@pytest.mark.slow  # a benchmark's smoke run
def test_host_time_benchmark_smoke_prints_its_table() -> None:
    proc = _benchmark("host_time.py", "--steps", "5", "--rounds", "1")
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split("|")[1].strip() for row in rows] == ["0", "1", "8"]


@pytest.mark.slow  # a benchmark's smoke run
def test_probing_service_benchmark_smoke_writes_its_three_measurements(tmp_path: Path) -> None:
    out = tmp_path / "service.json"
    _benchmark("probing_service.py", "--smoke", "--json", str(out))
    result = json.loads(out.read_text())
    assert result["extraction"]["service_images_per_s"] > 0 and result["extraction"]["bare_images_per_s"] > 0
    assert result["bank"]["heads"] == 64
    assert result["job"]["rows"] == 64 + 1 + 1 + 2  # every head, the best, the selected head, the kNN's two k


@pytest.mark.slow  # a benchmark's smoke run
def test_head_families_benchmark_smoke_times_every_variant_and_the_dense_epoch(tmp_path: Path) -> None:
    out = tmp_path / "families.json"
    _benchmark("head_families.py", "--workload", "attentive,dense,dense-epoch", "--smoke", "--json", str(out))
    workloads = json.loads(out.read_text())["workloads"]
    attentive = ["none", "bank16", "probes16", "bare16", "bank16-bf16", "probes16-bf16", "bare16-bf16"]
    for workload, variants in (("attentive", attentive), ("dense", ["none", "dense16", "dense16@side"])):
        rows = workloads[workload]["rows"]
        assert all(rows[v]["ms_per_step"] > 0 and "error" not in rows[v] for v in variants), rows
    checks = {"bank_vs_probes", "bank_vs_bare", "bank_vs_probes-bf16", "bank_vs_bare-bf16"}
    assert set(workloads["attentive"]["checks"]) == checks
    epoch = workloads["dense-epoch"]["runs"]["4"]
    assert epoch["steps_per_epoch"] == epoch["timed_steps"] == 4 and epoch["s_per_epoch"] > 0


@pytest.mark.parametrize("script", ["multigpu.sh", "ddp_scaling.sh"])
def test_gpu_scripts_refuse_a_world_size_that_is_not_a_number(script: str, tmp_path: Path) -> None:
    """A mistyped mode ("check") would otherwise be taken for a world size and fail later inside torchrun."""
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / script), "check", "2"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "OUT": str(tmp_path)},
    )
    assert proc.returncode == 2
    assert "world size 'check' is not a positive integer" in proc.stderr
    assert f"usage: {script}" in proc.stderr


@pytest.mark.slow  # a benchmark's smoke run under torchrun
@pytest.mark.distributed
def test_local_variant_runs_on_two_ranks() -> None:
    """``local_x1`` gives each rank its own one-rank probe group: the subgroup collective must not hang the ranks."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(ROOT / "benchmarks" / "overhead.py"),
            "--smoke",
            "--strategy",
            "distprobe_ddp",
            "--variants",
            "none,local_x1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # A variant that raised prints "| local_x1 | failed: ... |" instead of its step time.
    (row,) = [line.split("|") for line in proc.stdout.splitlines() if line.startswith("| local_x1 |")]
    assert float(row[2]) > 0, row


@pytest.mark.slow  # starts the benchmark (torch and Lightning imports) before it refuses
def test_local_variant_refuses_a_strategy_it_cannot_change() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "overhead.py"), "--smoke", "--variants", "none,local_x8"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode != 0
    assert "got --strategy 'auto'" in proc.stderr
    assert "--strategy distprobe_ddp" in proc.stderr


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ROUNDS": "three"}, "ROUNDS='three' is not a positive integer"),
        ({"STEPS": "0"}, "STEPS='0' is not a positive integer"),
        ({"STRATEGIES": "distprobe_ddp fsdp"}, "STRATEGIES names 'fsdp'; choose from: distprobe_ddp"),
    ],
)
def test_multigpu_script_refuses_bad_settings_before_any_run(env: dict[str, str], message: str, tmp_path: Path) -> None:
    """Checked up front: on the GPU machine a bad value would otherwise surface only after minutes of device time."""
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "multigpu.sh"), "overhead", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "OUT": str(tmp_path), **env},
    )
    assert proc.returncode == 2
    assert message in proc.stderr
