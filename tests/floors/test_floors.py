"""The floors in pyproject.toml can be pinned, and the floors environment holds exactly them."""

from __future__ import annotations

import os
from importlib.metadata import version

import pytest
from packaging.version import Version

from floors.declared import CI_PINS, ci_pins, declared_floors


def test_every_floor_is_pinnable():
    floors = declared_floors()
    assert {"torch", "lightning", "torchmetrics"} <= set(floors)
    assert all(Version(v) for v in floors.values())


def test_a_requirement_without_a_single_floor_is_refused(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\ndependencies = ["torch>=2.13,<3"]\n[project.optional-dependencies]\ndeepspeed = []\n'
    )
    with pytest.raises(ValueError, match=r"'torch>=2.13,<3' is not of the form 'name>=X.Y.Z'"):
        declared_floors(pyproject)


IN_FLOORS_ENV = os.environ.get("DISTPROBE_FLOORS") == "1"  # set by `make test-floors`


def test_ci_pins_only_raise_a_floor_ci_cannot_install(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\ndependencies = ["torch>=2.11.0", "lightning>=2.4.0"]\n'
        '[project.optional-dependencies]\ndeepspeed = ["deepspeed>=0.19.1"]\n'
    )
    assert declared_floors(pyproject)["torch"] == "2.11.0"
    assert ci_pins(pyproject) == {"torch": CI_PINS["torch"], "lightning": "2.4.0", "deepspeed": "0.19.1"}
    pyproject.write_text(pyproject.read_text().replace("torch>=2.11.0", "torch>=2.15.0"))
    assert ci_pins(pyproject)["torch"] == "2.15.0"  # a floor above the CI pin is tested as it is


@pytest.mark.skipif(not IN_FLOORS_ENV, reason="only in the floors environment (make test-floors)")
def test_the_floors_environment_holds_exactly_the_floors():
    """A stale .venv-floors (built before a floor moved) must fail here, not pass on other versions."""
    floors = ci_pins()
    installed = {name: version(name) for name in floors}
    # `public` drops a local label: torch's CPU build is 2.13.0+cpu.
    assert {n: Version(Version(v).public) for n, v in installed.items()} == {n: Version(v) for n, v in floors.items()}
