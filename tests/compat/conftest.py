"""Set-up shared by the stable-pretraining compatibility tests (they run in .venv-spt: `make test-spt`)."""

import importlib.util
import os

import pytest

HAVE_SPT = importlib.util.find_spec("stable_pretraining") is not None

if HAVE_SPT:
    # stable-pretraining logs through loguru at INFO by default: hundreds of lines per fit.
    os.environ.setdefault("LOGURU_LEVEL", "WARNING")
    from tests.compat.torchvision_cpu_ops import install

    install()  # in case this environment lacks the .pth that setup_spt_env.sh writes


@pytest.fixture(autouse=True)
def _spt_cache_in_tmp(tmp_path):
    """stable-pretraining's callbacks write run files under its cache folder (~/.cache by default): keep them here."""
    if not HAVE_SPT:
        yield
        return
    import stable_pretraining as spt
    from stable_pretraining._config import get_config

    original = get_config().cache_dir
    spt.set(cache_dir=str(tmp_path / "spt-cache"))
    yield
    spt.set(cache_dir=original)
