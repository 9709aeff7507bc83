import os

import pytest
import torch
import torch.distributed as dist


@pytest.fixture(autouse=True)
def _clean_process_state():
    """Destroy any process group and restore environment variables a test changed."""
    saved_env = dict(os.environ)
    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved_env)


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip_gpu = pytest.mark.skip(reason="needs CUDA (run with -m gpu on a GPU machine)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)
