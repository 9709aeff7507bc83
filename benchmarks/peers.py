"""The peer implementations the benchmark compares with: stable-pretraining's OnlineProbe, imported from PyPI.

stable-pretraining (``pip install -e .[bench]``) imports about 80 distributions at import time, most of them for
features the benchmark never touches (datasets, kornia, HuggingFace, image transforms, experiment loggers). Where one
of the modules in `STAND_IN_CANDIDATES` is not installed, an empty stand-in module takes its place so that
``stable_pretraining.Module`` and ``stable_pretraining.callbacks.OnlineProbe`` import; the code paths the benchmark
runs (the Module's manual-optimisation ``training_step``, the probe's wrapped ``forward``, its optimizer and metrics)
use none of them. `import_stable_pretraining` returns which modules were stood in, and the benchmark prints them.
Modules it does run (loguru, omegaconf, prettytable, tabulate, lightning, torchmetrics) must be really installed.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import types
from typing import Any

#: Top-level modules that stable-pretraining imports but the benchmark's code paths never call.
STAND_IN_CANDIDATES = (
    "torchvision",
    "transformers",
    "kornia",
    "datasets",
    "huggingface_hub",
    "requests",
    "requests_cache",
    "PIL",
    "timm",
    "rich",
    "matplotlib",
    "pandas",
    "sklearn",
    "wandb",
)


class _AnyType(type):
    """Attribute access on a stand-in class yields another stand-in class (``tv_tensors.Image``, ...)."""

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _AnyType(name, (), {})

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        return type.__call__(cls)


class _StandInModule(types.ModuleType):
    __path__: list[str] = []

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _AnyType(name, (), {})


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, names: set[str]) -> None:
        self.names = names

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname.split(".")[0] in self.names:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _StandInModule(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def import_stable_pretraining() -> tuple[Any, list[str]] | tuple[None, str]:
    """Import stable-pretraining; return ``(module, stood_in_names)``, or ``(None, reason)`` when it is missing."""
    if not _installed("stable_pretraining"):
        return None, "stable-pretraining is not installed (pip install -e .[bench])"
    # Installed but broken modules (torchvision built for another torch) are replaced too: only the ones that fail.
    missing = {name for name in STAND_IN_CANDIDATES if not _installed(name)}
    for name in STAND_IN_CANDIDATES:
        if name in missing:
            continue
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - any failure to import means the peer cannot use it either
            for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
                del sys.modules[key]
            missing.add(name)
    if missing:
        sys.meta_path.insert(0, _StandInFinder(missing))
    os.environ.setdefault("LOGURU_LEVEL", "WARNING")
    try:
        import stable_pretraining as spt
        from stable_pretraining.callbacks.probe import OnlineProbe  # noqa: F401 - checks the import chain
        from stable_pretraining.module import Module  # noqa: F401
    except Exception as err:  # noqa: BLE001 - report why the peer is skipped instead of failing the benchmark
        return None, f"stable-pretraining failed to import: {type(err).__name__}: {err}"
    return spt, sorted(missing)


def spt_module(spt: Any, backbone: Any, embed_dim: int, lr: float = 1e-4) -> Any:
    """A ``stable_pretraining.Module`` training ``backbone`` with the same loss and optimizer as ``SSLModule``."""
    from functools import partial

    import torch
    from torch import nn

    def forward(self: Any, batch: dict[str, Any], stage: str) -> dict[str, Any]:
        embedding = self.backbone(batch["image"])
        out = {"embedding": embedding}
        if stage == "fit":
            out["loss"] = self.projector(embedding).float().pow(2).mean()
        return out

    return spt.Module(
        forward=forward,
        backbone=backbone,
        projector=nn.Linear(embed_dim, 256),
        optim={
            "optimizer": partial(torch.optim.AdamW, lr=lr, weight_decay=0.05),
            "scheduler": "ConstantLR",
            "interval": "step",
        },
        hparams={},
    )


def spt_callbacks(spt: Any, module: Any, count: int, embed_dim: int, num_classes: int, metrics: Any) -> list[Any]:
    """``count`` stable-pretraining OnlineProbes on ``module``.

    Its other callbacks (``ModuleRegistryCallback``, progress printing, hardware monitor, ...) need no adding: an
    installed stable-pretraining adds them to every Trainer through a Lightning entry point.
    """
    from stable_pretraining.callbacks.probe import OnlineProbe
    from torch import nn

    callbacks: list[Any] = []
    for i in range(count):
        callbacks.append(
            OnlineProbe(
                module,
                name=f"spt_linear{i}",
                input="embedding",
                target="label",
                probe=nn.Linear(embed_dim, num_classes),
                loss=nn.CrossEntropyLoss(),
                optimizer={"type": "AdamW", "lr": 1e-3, "weight_decay": 0.0},
                metrics=metrics(),
                verbose=False,
            )
        )
    return callbacks


def spt_auto_linear_module(
    spt: Any, backbone: Any, workload: Any, lr_scaling: list[float], weight_decay: list[float]
) -> Any:
    """A ``stable_pretraining.Module`` whose forward also trains an ``AutoLinearClassifier`` grid, as its docs show.

    The grid (one head per lr scaling x weight decay, no normalization, dropout or label smoothing, so that it has
    the heads of distprobe's plain bank) reads the detached embedding; its summed loss joins the backbone's, and the
    Module's one AdamW trains both (with the grid's lr-scaling hooks on the heads' gradients).
    """
    from functools import partial

    import torch
    from stable_pretraining.backbone import AutoLinearClassifier
    from torch import nn

    def forward(self: Any, batch: dict[str, Any], stage: str) -> dict[str, Any]:
        embedding = self.backbone(batch["image"])
        out = {"embedding": embedding}
        if stage == "fit":
            probe_loss = self.grid(embedding.detach(), batch["label"], self)
            out["loss"] = self.projector(embedding).float().pow(2).mean() + probe_loss
        return out

    grid = AutoLinearClassifier(
        "grid",
        workload.embed_dim,
        workload.num_classes,
        weight_decay=weight_decay,
        lr_scaling=lr_scaling,
        normalization=["none"],
        dropout=[0],
        label_smoothing=[0],
    )
    return spt.Module(
        forward=forward,
        backbone=backbone,
        projector=nn.Linear(workload.embed_dim, 256),
        grid=grid,
        optim={
            "optimizer": partial(torch.optim.AdamW, lr=1e-4, weight_decay=0.05),
            "scheduler": "ConstantLR",
            "interval": "step",
        },
        hparams={},
    )
