"""A bad ``probes.fewshot.reg`` or ``probes.logreg.c_grid`` in the service's YAML is refused naming the file, the
section, the probe, the argument, the value, what was expected and an example that works.

Before: ``reg: -1`` gave "fewshot: reg=-1 for solver 'ridge'; expected one value or a list, each l2 >= 0" (no
probe name, no argument, no example) and ``c_grid: 0`` "expected values of C > 0" (no example).
"""

from __future__ import annotations

import pytest

from distprobe.service.config import EvalConfig, ServiceConfigError


def _load(**probes) -> EvalConfig:
    stand_in = {"_target_": "tests.service.models.labeled"}
    options = {"num_classes": 3, "backbone": stand_in, "data": {"train": stand_in, "val": stand_in}}
    return EvalConfig.from_dict({**options, "probes": probes}, source="eval.yaml")


@pytest.mark.parametrize(
    ("fewshot", "expected"),
    [
        ({"name": "fs", "reg": -1}, r"argument 'reg' got -1 with solver 'ridge'; expected .* lambda >= 0, e.g. reg:"),
        ({"name": "fs", "reg": [0.1, float("nan")]}, r"argument 'reg' got \[0.1, nan\] with solver 'ridge'"),
        ({"name": "fs", "solver": "logreg", "reg": 0}, r"argument 'reg' got 0 with solver 'logreg'; .* C > 0"),
    ],
)
def test_a_bad_fewshot_reg_names_the_probe_argument_value_and_an_example(fewshot, expected):
    with pytest.raises(ServiceConfigError, match=r"eval.yaml: probes.fewshot: fewshot 'fs': " + expected):
        _load(fewshot=fewshot)


def test_a_bad_c_grid_gives_an_example():
    with pytest.raises(ServiceConfigError, match=r"logreg 'logreg': argument 'c_grid' got 0; .*e.g. c_grid: \["):
        _load(logreg={"c_grid": 0})
