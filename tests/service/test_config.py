"""A bad evaluation config fails before anything runs, with an error naming the file, the key and the fix."""

from __future__ import annotations

import pytest
import yaml
from tests.service.models import eval_config

from distprobe.service.config import EvalConfig, ServiceConfigError


def test_the_tests_config_loads_with_its_sections_typed(tmp_path):
    config = EvalConfig.load(eval_config(tmp_path / "eval.yaml"))
    assert config.num_classes == 4
    assert config.weights.prefix == "backbone."
    assert config.data.batch_size == 32
    assert config.probes.knn == {"k": [5, 20], "temperature": 0.1}
    assert config.source == str(tmp_path / "eval.yaml")


def test_the_fingerprint_changes_with_the_protocol_not_with_where_results_go(tmp_path):
    base = EvalConfig.load(eval_config(tmp_path / "a.yaml"))
    moved = EvalConfig.load(eval_config(tmp_path / "b.yaml", results={"store": str(tmp_path / "x.sqlite")}))
    other = EvalConfig.load(
        eval_config(tmp_path / "c.yaml", probes={"epochs": 4, "batch_size": 20, "bank": {"lr": [0.1]}})
    )
    assert base.fingerprint == moved.fingerprint
    assert base.fingerprint != other.fingerprint


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"probes": {"epoch": 3}}, "unknown key(s) 'probes.epoch' (did you mean 'probes.epochs'?)"),
        ({"num_classes": 1}, "num_classes=1; expected an integer >= 2"),
        ({"backbone": "tests.service.models.encoder"}, "backbone='tests.service.models.encoder'; expected a Hydra"),
        ({"features": {"autocast": "fp8"}}, "features.autocast='fp8'; expected one of"),
        ({"probes": {"bank": None, "knn": None}}, "probes has neither a bank nor a knn"),
        ({"data": {"train": {"_target_": "x"}}}, "data: "),
        ({"probe": {}}, "unknown key(s) 'probe' (did you mean 'probes'?)"),
    ],
)
def test_bad_values_name_the_file_the_key_and_what_was_expected(tmp_path, override, message):
    path = eval_config(tmp_path / "eval.yaml", **override)
    with pytest.raises(ServiceConfigError) as err:
        EvalConfig.load(path)
    assert str(path) in str(err.value)
    assert message in str(err.value)


def test_a_missing_file_and_broken_yaml_are_errors_naming_the_file(tmp_path):
    with pytest.raises(ServiceConfigError, match="no such config file"):
        EvalConfig.load(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("num_classes: [1, 2\n")
    with pytest.raises(ServiceConfigError, match="not a valid YAML config") as err:
        EvalConfig.load(broken)
    assert str(broken) in str(err.value)
    listed = tmp_path / "list.yaml"
    listed.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ServiceConfigError, match="expected a mapping at the top level"):
        EvalConfig.load(listed)
