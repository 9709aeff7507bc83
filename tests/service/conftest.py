"""Shared fixtures of the probing service's tests.

The Slurm tests use the same real local Slurm as the launcher's (tests/helpers/slurm.py). One real training,
written once per session, gives the checkpoints that the local tests copy into their run directories.
"""

from pathlib import Path

import pytest
import torch
from tests.helpers.slurm import slurm_cluster  # noqa: F401 - the fixture
from tests.service.models import pretrain


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """A training's run directory (with its own log) and its checkpoints at steps 10, 20 and 30.

    Tests copy the checkpoints into run directories of their own; only tests/service/test_eval.py writes into this
    one (its store and the training's log), as a user's ``distprobe eval`` would.
    """
    out = tmp_path_factory.mktemp("trained_run")
    return out, pretrain(str(out), steps=30, every_n_steps=10)


@pytest.fixture(scope="module")
def checkpoints(trained_run):
    """Checkpoints of one real training, at steps 10, 20 and 30 (copied into each test's run directory)."""
    return trained_run[1]


@pytest.fixture(autouse=True)
def _restore_safe_globals():
    """A job run in the test's process allows its config's ``weights.safe_globals`` for the whole process, as a real
    job does; put torch's allow-list back afterwards so that a later test's checkpoint refusal still sees it empty."""
    saved = list(torch.serialization.get_safe_globals())
    yield
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals(saved)
