import os

import pytest
import torch
import torch.distributed as dist

# The tests' models are tiny, and spawned ranks share 2 cores with this process: more than one intra-op thread per
# process only oversubscribes the cores (measured: a 20 s test took 146 s under load with 2 threads).
torch.set_num_threads(1)


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
