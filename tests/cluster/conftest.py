"""Fixtures for the launcher tests: an uninterrupted reference training, and the real local Slurm.

The Slurm fixture is tests/helpers/slurm.py's ``slurm_cluster``, shared with the probing service's tests.
"""

from __future__ import annotations

import pytest
from launch_helpers import DEMO, DEMO_ARGS, STEPS
from tests.helpers.slurm import slurm_cluster  # noqa: F401 - the fixture, shared with tests/service

from distprobe.cluster import ClusterConfig, submit


@pytest.fixture(scope="session")
def reference_weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[float]]:
    """Final probe weights of the demo's training run without interruption on 2 local tasks (DDP, gloo)."""
    folder = tmp_path_factory.mktemp("reference") / "%j"
    config = ClusterConfig(cluster="local", tasks_per_node=2, folder=str(folder))
    job = submit(DEMO, config, **DEMO_ARGS)
    results = job.results()
    assert [r["global_step"] for r in results] == [STEPS, STEPS]
    assert results[0]["probe_weights"] == results[1]["probe_weights"], "probe replicas differ between ranks"
    return dict(results[0]["probe_weights"])
