"""Let PyPI's torchvision import beside the CPU build of torch, as stable-pretraining needs.

PyPI's torchvision wheel is built against the CUDA build of torch: its ``_C.so`` links ``libtorch_cuda.so`` and does
not load beside torch's CPU build. torchvision then runs without its C++ operators, which stable-pretraining's probe
code paths never call, except that ``torchvision/_meta_registrations.py`` registers fake kernels for
``torchvision::nms`` and ``torchvision::qnms`` unconditionally, and that fails with "operator torchvision::nms does
not exist". Defining those two schemas (without kernels) before torchvision is imported is enough.

`install()` does that lazily: it puts a finder on ``sys.meta_path`` that acts the first time ``torchvision`` is
imported, so interpreters that never import torchvision do not import torch for it. tests/compat/setup_spt_env.sh
copies this file into the spt environment's site-packages with a ``.pth`` line calling `install()`, so that every
interpreter of that environment has it: pytest, the ranks it spawns, and a user's own script.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from typing import Any

#: The schemas torchvision 0.28 registers fake kernels for without checking that its operators loaded.
SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}

_libraries: list[Any] = []  # the torch.library fragments holding the definitions; kept alive for the process


def _extension_loads(package_dir: str) -> bool:
    """Whether torchvision's own ``_C`` extension loads beside this torch (then it defines the schemas itself)."""
    import glob
    import os

    import torch

    for path in glob.glob(os.path.join(package_dir, "_C*.so")):
        try:
            torch.ops.load_library(path)
        except OSError:
            return False
        return True
    return False


def _defined(name: str) -> bool:
    import torch

    try:
        getattr(torch.ops.torchvision, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def define_schemas(package_dir: str) -> list[str]:
    """Define the ``torchvision::`` schemas that neither torchvision's extension nor an earlier call defined.

    Returns the names defined by this call. Idempotent, also across two copies of this file in one process (the
    environment's ``.pth`` copy and the one in tests/compat).
    """
    missing = [name for name in SCHEMAS if not _defined(name)]
    if not missing or _extension_loads(package_dir):
        return []
    import torch

    library = torch.library.Library("torchvision", "FRAGMENT")  # noqa: TOR901 - schemas only, no kernels
    for name in missing:
        library.define(SCHEMAS[name])
    _libraries.append(library)
    return missing


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    """Defines the schemas the first time ``torchvision`` is looked up, then steps aside for the real finders."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "torchvision":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("torchvision")
        if spec is not None and spec.submodule_search_locations:
            define_schemas(next(iter(spec.submodule_search_locations)))
        return None  # the regular finders import torchvision itself


def install() -> None:
    """Arrange for the schemas to be defined before torchvision is first imported (idempotent)."""
    if "torchvision" in sys.modules:
        return
    # By class name: the environment's .pth copy of this file installs a finder of its own class.
    if not any(type(finder).__name__ == _BeforeTorchvision.__name__ for finder in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTorchvision())
