"""Find a submodule by the dotted name a user writes, through the wrappers strategies insert (torch only).

FSDP1 inserts ``_fsdp_wrapped_module``, activation checkpointing ``_checkpoint_wrapped_module``, torch.compile
``_orig_mod``, and DDP/DeepSpeed/Lightning wrappers ``module`` or ``_forward_module``: ``backbone.blocks.8`` is still
``backbone.blocks.8`` under all of them. FSDP2 (``fully_shard``) and DeepSpeed ZeRO-3 keep the names as they are.
"""

from __future__ import annotations

import difflib

from torch import nn

WRAPPER_SEGMENTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})
"""Segments that only wrappers create: left out of a name wherever they appear."""

_OUTER_WRAPPERS = {
    "module": frozenset({"DistributedDataParallel", "DataParallel", "DeepSpeedEngine"}),
    "_forward_module": frozenset({"_LightningModuleWrapperBase", "_LightningPrecisionModuleWrapperBase"}),
}
"""Segments left out only below a wrapper of these types: a user's own submodule may well be called ``module``."""


def _is_wrapper_segment(name: str, parent: nn.Module) -> bool:
    if name in WRAPPER_SEGMENTS:
        return True
    wrappers = _OUTER_WRAPPERS.get(name)
    return wrappers is not None and type(parent).__name__ in wrappers


def canonical_modules(root: nn.Module) -> dict[str, nn.Module]:
    """Every submodule of ``root`` by its name without wrapper segments, in registration (pre-)order.

    Where a wrapper and the module it wraps share a name, the outermost wins: it runs once per call, whereas a
    module inside an activation-checkpointing wrapper runs again when the backward recomputes it.
    """
    found: dict[str, nn.Module] = {}

    def walk(module: nn.Module, name: str) -> None:
        found.setdefault(name, module)
        for child_name, child in module.named_children():
            if _is_wrapper_segment(child_name, module):
                walk(child, name)
            else:
                walk(child, f"{name}.{child_name}" if name else child_name)

    walk(root, "")
    return found


def canonical_path(path: str) -> str:
    """``path`` without the segments only wrappers create (a name copied from a wrapped model's printout)."""
    return ".".join(part for part in path.split(".") if part not in WRAPPER_SEGMENTS)


def find_module(root: nn.Module, path: str) -> nn.Module | None:
    """The submodule of ``root`` named ``path`` (wrapper segments ignored), or None."""
    modules = canonical_modules(root)
    path = canonical_path(path)
    if path in modules:
        return modules[path]
    head, _, rest = path.partition(".")
    if head in _OUTER_WRAPPERS and rest in modules:  # "module.backbone" copied from a DDP-wrapped printout
        return modules[rest]
    return None


def child_modules(root: nn.Module, path: str) -> list[tuple[str, nn.Module]]:
    """The direct children of the submodule named ``path``, by canonical name, in registration order."""
    prefix = f"{canonical_path(path)}."
    return [
        (name, module)
        for name, module in canonical_modules(root).items()
        if name.startswith(prefix) and "." not in name[len(prefix) :]
    ]


def near_names(root: nn.Module, path: str, limit: int = 5) -> list[str]:
    """Submodule names close to ``path`` (else the top-level ones), for error messages."""
    names = [name for name in canonical_modules(root) if name]
    close = difflib.get_close_matches(canonical_path(path), names, n=limit, cutoff=0.6)
    return close or [name for name in names if "." not in name][:limit]
