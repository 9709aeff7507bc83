"""The strategy x feature matrix of docs/matrix.md reads each strategy off the tests' parameter ids."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("matrix", ROOT / "docs" / "_hooks" / "matrix.py")
matrix = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(matrix)


@pytest.mark.parametrize(
    ("param_id", "strategy"),
    [
        ("fsdp2_tp_1x2", "FSDP2 + TP"),
        ("tp_1x2", "FSDP2 + TP"),
        ("distprobe_fsdp2", "FSDP2"),
        ("fsdp1_sharded", "FSDP1"),
        ("distprobe_fsdp", "FSDP1"),
        ("deepspeed_stage_3", "ZeRO-3"),
        ("zero1", "ZeRO-1"),
        ("ddp_bf16", "DDP"),
        ("distprobe_ddp", "DDP"),
        ("torchrun_ddp.py-args0", "DDP"),
        ("SGD-cosine", None),
        ("world2-1", None),
    ],
)
def test_strategy_of_a_parameter_id(param_id, strategy):
    assert matrix.strategy_of(param_id) == strategy


@pytest.mark.slow  # a pytest subprocess collects two test files (17 s on 2 loaded cores)
def test_the_matrix_counts_the_collected_tests_of_each_feature_and_strategy():
    ids = matrix.collect(["tests/knn/test_knn_lightning.py", "tests/strategies/test_lightning_strategies.py"])
    table = matrix.render(ids)
    knn = next(line for line in table.splitlines() if line.startswith("| Online kNN |"))
    cells = [cell.strip() for cell in knn.split("|")[2:-1]]
    assert dict(zip(matrix.STRATEGIES, cells)) == {
        "DDP": "1", "FSDP1": "1", "FSDP2": "1", "FSDP2 + TP": "1", "ZeRO-1": "", "ZeRO-2": "1", "ZeRO-3": "1",
    }  # fmt: skip
    assert "| Probe banks |" in table  # the strategy fits train a bank beside the probe
