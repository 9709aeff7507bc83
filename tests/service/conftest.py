"""The probing service's Slurm tests use the same real local Slurm as the launcher's (tests/helpers/slurm.py)."""

from tests.helpers.slurm import slurm_cluster  # noqa: F401 - the fixture
