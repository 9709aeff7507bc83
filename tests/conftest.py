import os
import sys

import pytest
import torch
import torch.distributed as dist

# DeepSpeed JIT-builds its CPU ops (shm_comm) into torch's extension cache, shared by default by every environment of
# the user: the floors environment's older DeepSpeed then overwrote the main environment's build ("module
# 'deepspeed_shm_comm' has no attribute 'vector_kernel_level'"). One cache per environment.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))

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
        _forget_deepspeed_groups()
    os.environ.clear()
    os.environ.update(saved_env)


def _forget_deepspeed_groups():
    """DeepSpeed keeps its communication backend and the groups it cloned from the world group in module globals;
    after the world group is destroyed, the next DeepSpeed Trainer in this process would use them and fail with
    "Group ... is not registered" (seen in the GPU suite: ZeRO-2, then ZeRO-3). Its own teardown is skipped here, as
    the group is destroyed through torch, so release what it holds the way its teardown does."""
    comm = sys.modules.get("deepspeed.comm.comm")
    if comm is not None:
        comm.cdb = None
    groups = sys.modules.get("deepspeed.utils.groups")
    release = getattr(groups, "_release_process_group_references", None)
    if release is not None:
        release()
    elif groups is not None:  # older DeepSpeed: the cloned world group is the one that outlives its parent
        groups._WORLD_GROUP = None


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip_gpu = pytest.mark.skip(reason="needs CUDA (run with -m gpu on a GPU machine)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)
