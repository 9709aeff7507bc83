"""The lowest versions distprobe declares, read from pyproject.toml: what the floors environment pins.

Each ``name>=X`` of ``[project] dependencies`` and of the tested extras becomes ``name==X`` in the floors environment
(tests/floors/setup_floors_env.sh, ``make test-floors``), so pyproject.toml is the one place where a floor is written.
One exception, `CI_PINS`: a floor that CI cannot install is tested elsewhere, and CI pins the lowest release it can.

    python tests/floors/declared.py [pyproject.toml]   # prints a pip constraints file: one ``name==X`` per floor
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

try:  # a fresh venv (tests/floors/setup_floors_env.sh) has no packaging yet: pip vendors it
    from packaging.version import Version
except ModuleNotFoundError:
    from pip._vendor.packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip vendors the same parser
    from pip._vendor import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
#: Extras whose floors are tested with the runtime dependencies; demo, bench and dev are tools, not distprobe's API.
TESTED_EXTRAS = ("deepspeed",)
#: Floors CI cannot install, and the release CI pins instead. torch 2.11.0's only Linux x86-64 build on PyPI is the
#: CUDA one (about 4 GB with its nvidia-* wheels); the CPU builds come from PyTorch's own index, which CI cannot reach.
#: The 2.11 floor is proven on the GPU machine's torch 2.11.0+cu130: the CUDA suite and this environment's test
#: selection (docs/benchmarks.md, "Session H"). CI keeps torch 2.13.0, the CPU build on local disk.
CI_PINS = {"torch": "2.13.0"}
_FLOOR = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*>=\s*([0-9][0-9A-Za-z.]*)")


def declared_floors(pyproject: Path = PYPROJECT) -> dict[str, str]:
    """``{distribution: lowest allowed version}`` of every runtime dependency and of every tested extra.

    Raises:
        ValueError: a requirement is not ``name>=X.Y.Z`` (a cap, a marker or an exact pin leaves no single floor).
    """
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in TESTED_EXTRAS:
        requirements += project["optional-dependencies"][extra]
    floors = {}
    for requirement in requirements:
        match = _FLOOR.fullmatch(requirement.strip())
        if match is None:
            raise ValueError(
                f"{pyproject}: requirement {requirement!r} is not of the form 'name>=X.Y.Z'; the floors environment "
                "pins every dependency at its lower bound, so give each one a lower bound and nothing else"
            )
        floors[match[1].lower()] = match[2]
    return floors


def ci_pins(pyproject: Path = PYPROJECT) -> dict[str, str]:
    """What the floors environment installs: every floor, bar those of `CI_PINS` that lie below what CI can install."""
    floors = declared_floors(pyproject)
    for name, pin in CI_PINS.items():
        if name in floors and Version(floors[name]) < Version(pin):
            floors[name] = pin
    return floors


if __name__ == "__main__":
    for name, version in ci_pins(Path(sys.argv[1]) if len(sys.argv) > 1 else PYPROJECT).items():
        print(f"{name}=={version}")
