"""Read a backbone's full weights out of a training checkpoint, whichever Lightning strategy wrote it.

An evaluation job builds the backbone from its config and loads the weights on every rank (it replicates the
backbone for inference), so a checkpoint written at any world size loads at any other: each call reads the whole
tensors by itself, with no collective, whether or not ``torch.distributed`` is initialised. The formats:

- ``"lightning"``: one ``.ckpt`` file (``torch.save``'s zip); the module's weights are ``checkpoint["state_dict"]``.
- ``"dcp"``: a directory of ``torch.distributed.checkpoint`` shards, as ``ModelParallelStrategy`` (FSDP2, tensor
  parallel) writes by default: the module under the DCP key ``"state_dict"`` (``"model"`` for ``FSDPStrategy`` with
  ``state_dict_type="sharded"``), the optimizers under ``"optimizer_<i>"``, and the rest of Lightning's checkpoint
  (``global_step`` included) in ``meta.pt``.
- ``"deepspeed"``: a directory as ``DeepSpeedStrategy`` writes: ``latest`` names a tag folder (``checkpoint``) that
  holds ``mp_rank_00_model_states.pt`` (ZeRO 0-2: the whole module, in its training dtype, and Lightning's
  ``global_step``) or one ``zero_pp_rank_<r>_mp_rank_00_model_states.pt`` per rank (ZeRO-3: the parameters are
  partitioned; DeepSpeed consolidates the fp32 master weights from every rank's optimizer states).

Pickles are read with ``torch.load(weights_only=True)``, which rebuilds tensors and plain containers and calls no
other code, so reading a checkpoint from a shared run folder cannot run code planted in it. A checkpoint holding
other objects (e.g. an ``argparse.Namespace`` or an OmegaConf config in ``hyper_parameters``) is refused with the
names of those types; allow the ones you trust with ``torch.serialization.add_safe_globals``. A DCP's own
``.metadata`` is a plain pickle: it is read with a restricted unpickler that builds only torch's DCP metadata
records, sizes, dtypes and paths (`_DCP_METADATA_GLOBALS`). One reader is outside the guarantee: DeepSpeed's ZeRO-3
consolidation loads every file unrestricted, after each file was vetted with ``weights_only=True``.

Example:
    >>> info = detect("runs/a/epoch=1-step=800.ckpt")  # doctest: +SKIP
    >>> load_weights(info, backbone, prefix="backbone.")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

# signals.py owns the preemption checkpoints' naming: match with its own pattern, so the two never drift apart.
from distprobe.cluster.signals import CHECKPOINT_NAME as PREEMPTION_NAME
from distprobe.cluster.signals import COMPLETE_SUFFIX

__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "Format",
    "detect",
    "is_complete",
    "load_backbone_state",
    "load_weights",
]

logger = logging.getLogger(__name__)

Format = Literal["lightning", "dcp", "deepspeed"]

_DCP_METADATA = ".metadata"
_LIGHTNING_META = "meta.pt"  # lightning.fabric.utilities.load._METADATA_FILENAME
_DCP_ROOTS = ("state_dict", "model")  # ModelParallelStrategy's key, then FSDPStrategy's (state_dict_type="sharded")
_DS_MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")  # ZeRO 0-2, ZeRO-3
_WRAPPER_PREFIX = "_forward_module."  # Lightning < 2.1 saved DeepSpeed's module through its wrapper
_STEP_IN_NAME = re.compile(r"\bstep=(\d+)")  # ModelCheckpoint's "{step}" in a file name, e.g. "epoch=1-step=800.ckpt"
_SHOWN = 5  # keys and prefixes quoted in an error


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: the message names the path, what was found, what was expected."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What `detect` found at a path."""

    path: Path
    """The checkpoint: a ``.ckpt`` file, or the directory a sharded strategy wrote."""
    format: Format
    """Which strategy's layout it has."""
    step: int | None
    """The training's global step: the checkpoint's own ``global_step``, else a ``step=N`` in its name (or the N of a
    preemption checkpoint's ``preempt-N.ckpt``), else None."""


def detect(path: str | Path) -> CheckpointInfo:
    """Which format `path` is, and its global step.

    Raises:
        CheckpointError: naming the path, when it is missing, of no known format, incomplete or corrupt.
    """
    path = Path(path)
    fmt = _format_of(path)
    _check_complete(path, fmt)
    step = _meta(path, fmt).get("global_step")
    if not isinstance(step, int):
        match = _STEP_IN_NAME.search(path.name) or PREEMPTION_NAME.match(path.name)
        step = int(match.group(1)) if match else None
    return CheckpointInfo(path=path, format=fmt, step=step)


def is_complete(path: str | Path) -> bool:
    """Whether the checkpoint at `path` may be read now; never raises (a watcher polls with it).

    Cheap: it checks that the files the writer puts down last are there and whole, and loads no weights. A
    preemption checkpoint (named as `distprobe.cluster.signals.checkpoint_path` names them) also needs the
    ``.complete`` marker that rank 0 writes beside it once every rank has saved.
    """
    try:
        path = Path(path)
        _check_complete(path, _format_of(path))
    except Exception:  # noqa: BLE001 - whatever a half-written or foreign file raises means "not readable now"
        return False
    return True


def load_backbone_state(info: CheckpointInfo, prefix: str = "") -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of the module stored under `prefix`, with the prefix stripped.

    Args:
        info: the checkpoint, from `detect`.
        prefix: the module's attribute path in the training's LightningModule, e.g. ``"backbone."`` for
            ``self.backbone`` (the trailing dot may be left out); ``""`` for the whole LightningModule.

    Returns:
        CPU tensors, full size, in the dtypes the checkpoint holds.

    Raises:
        CheckpointError: when nothing is stored under `prefix` (the message lists the prefixes there are), or when
            the checkpoint cannot be read.
    """
    return _select(info.path, _read_state(info), prefix)


def load_weights(info: CheckpointInfo, module: nn.Module, prefix: str = "", strict: bool = True) -> None:
    """Load the weights stored under `prefix` into `module` (see `load_backbone_state`).

    Args:
        info: the checkpoint, from `detect`.
        module: the backbone, built by the caller (any device and dtype: ``load_state_dict`` copies into it).
        prefix: as for `load_backbone_state`.
        strict: whether a missing or unexpected key raises. When it does, the tensors whose names match are copied
            already, as with ``nn.Module.load_state_dict(strict=True)``.

    Raises:
        CheckpointError: naming the path, the missing and unexpected keys and the fix, when the keys do not match
            (with ``strict``) or a shape differs.
    """
    state = _read_state(info)
    selected = _select(info.path, state, prefix)
    try:
        result = module.load_state_dict(selected, strict=False)
    except RuntimeError as exc:  # a shape mismatch raises whatever `strict` is
        raise CheckpointError(
            f"{info.path}: the weights under prefix {prefix!r} do not fit {type(module).__name__}: {exc}; expected "
            "the architecture the training used; fix: build the module from the training's config"
        ) from exc
    if strict and (result.missing_keys or result.unexpected_keys):
        missing, unexpected = result.missing_keys, result.unexpected_keys
        guess = _guess_prefix(state, missing)
        fix = (
            f"pass prefix={guess!r}"
            if guess is not None
            else f"pass the module's prefix (the checkpoint has {_prefixes(state)})"
        )
        raise CheckpointError(
            f"{info.path}: the weights under prefix {prefix!r} do not match {type(module).__name__}'s state_dict: "
            f"missing keys {missing[:_SHOWN]} ({len(missing)} in all), unexpected keys {unexpected[:_SHOWN]} "
            f"({len(unexpected)} in all); fix: {fix}, or strict=False to load only the keys that match"
        )


def _format_of(path: Path) -> Format:
    """The format the layout at `path` shows, complete or not yet."""
    if path.is_file():
        return "lightning"
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such file or directory; expected a checkpoint (.ckpt file or directory)")
    names = {p.name for p in path.iterdir()}
    if "latest" in names or "zero_to_fp32.py" in names or any(path.glob("*/*_model_states.pt")):
        return "deepspeed"
    if names & {_DCP_METADATA, _DCP_METADATA + ".tmp", _LIGHTNING_META} or any(path.glob("*.distcp")):
        return "dcp"
    found = f"files {sorted(names)[:_SHOWN]}" if names else "an empty directory"
    raise CheckpointError(
        f"{path}: found {found}; expected a Lightning checkpoint: a .ckpt file, a torch.distributed.checkpoint "
        f"directory ({_DCP_METADATA}, *.distcp, {_LIGHTNING_META}) or a DeepSpeed directory (latest, <tag>/"
        "*_model_states.pt); fix: pass the path Lightning saved to"
    )


def _incomplete(path: Path, found: str, expected: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: incomplete checkpoint: {found}; expected {expected}; fix: if the save is still running, wait for it "
        "(poll with is_complete), else use an earlier checkpoint"
    )


def _check_complete(path: Path, fmt: Format) -> None:
    """Raise `CheckpointError` unless everything the writer puts down last is there and whole."""
    marker = Path(str(path) + COMPLETE_SUFFIX)
    if PREEMPTION_NAME.match(path.name) and not marker.exists():
        # Rank 0 writes the marker once every rank's save returned: without it, the save may have been cut short.
        raise _incomplete(path, f"no {marker.name} beside this preemption checkpoint", f"{marker}")
    if fmt == "lightning":
        # torch.save writes the zip's central directory last: a file being written or truncated has none.
        if not zipfile.is_zipfile(path):
            raise _incomplete(
                path,
                "not a whole zip archive (truncated, still being written, or not a checkpoint)",
                "torch.save's zip format",
            )
    elif fmt == "dcp":
        # DCP renames .metadata into place once every rank's shards are written; Lightning's rank 0 then writes
        # meta.pt (global_step, loops, callbacks), so a directory is whole only with both.
        if not (path / _DCP_METADATA).is_file():
            raise _incomplete(
                path, f"no {_DCP_METADATA}", f"{path / _DCP_METADATA} (torch.distributed.checkpoint writes it last)"
            )
        if not zipfile.is_zipfile(path / _LIGHTNING_META):
            raise _incomplete(
                path, f"no whole {_LIGHTNING_META}", f"{path / _LIGHTNING_META} (Lightning writes it after the shards)"
            )
    else:
        _check_deepspeed_complete(path)


def _check_deepspeed_complete(path: Path) -> None:
    """Raise `CheckpointError` unless ``latest``, its tag folder and every rank's files are there and whole."""
    tag_dir, model_states = _deepspeed_layout(path)
    if not zipfile.is_zipfile(model_states):
        raise _incomplete(path, f"{model_states.name} is not a whole zip archive", "torch.save's zip format")
    # DeepSpeed's rank 0 writes `latest` after its own files but before the barrier that waits for the other ranks,
    # so `latest` does not prove that every rank's partition is down: count them against the world size it saved.
    meta = _safe_load(path, model_states, mmap=True)
    ranks = int(meta.get("dp_world_size", 1)) * int(meta.get("mp_world_size", 1))
    stage = ((meta.get("ds_config") or {}).get("zero_optimization") or {}).get("stage", 0)
    patterns = (["*_optim_states.pt"] if stage > 0 else []) + (["*_model_states.pt"] if stage == 3 else [])
    for pattern in patterns:
        whole = [f for f in tag_dir.glob(pattern) if zipfile.is_zipfile(f)]
        if len(whole) < ranks:
            raise _incomplete(path, f"{len(whole)} whole {pattern} files in {tag_dir.name}/", f"{ranks}, one per rank")


def _deepspeed_layout(path: Path) -> tuple[Path, Path]:
    """The tag folder that ``latest`` names and rank 0's model-states file in it."""
    latest = path / "latest"
    if not latest.is_file():
        raise _incomplete(path, "no 'latest' file", f"{latest} naming the tag folder (DeepSpeed writes it last)")
    tag_dir = path / latest.read_text().strip()
    for name in _DS_MODEL_STATES:
        if (tag_dir / name).is_file():
            return tag_dir, tag_dir / name
    raise _incomplete(path, f"no model-states file in {tag_dir}", f"one of {list(_DS_MODEL_STATES)}")


def _meta(path: Path, fmt: Format) -> Mapping[str, Any]:
    """Lightning's non-tensor checkpoint state (``global_step`` ...), with tensors memory-mapped, not read."""
    if fmt == "lightning":
        checkpoint = _safe_load(path, path, mmap=True)
        if not isinstance(checkpoint.get("state_dict"), Mapping):
            raise CheckpointError(
                f"{path}: a torch.save file with keys {sorted(checkpoint)[:_SHOWN]}; expected a Lightning checkpoint "
                "with a 'state_dict'; fix: pass a checkpoint Trainer.save_checkpoint or ModelCheckpoint wrote"
            )
        return checkpoint
    if fmt == "dcp":
        return _safe_load(path, path / _LIGHTNING_META, mmap=True)
    return _safe_load(path, _deepspeed_layout(path)[1], mmap=True)


def _safe_load(checkpoint: Path, file: Path, mmap: bool) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` of a dict, with failures turned into a `CheckpointError`."""
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        try:
            refused: Any = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(file))
        except Exception:  # noqa: BLE001 - only a detail of the message below
            refused = "(see the cause)"
        raise CheckpointError(
            f"{checkpoint}: {file.name} holds objects that torch.load(weights_only=True) refuses: {refused}; "
            "expected tensors and plain containers (distprobe reads checkpoints so that no code in them runs); "
            "fix: if you trust these types, list them in the eval config's weights.safe_globals (or call "
            "torch.serialization.add_safe_globals([...]) before loading), or store plain types (e.g. "
            "hyper-parameters as a dict) in the training's checkpoint"
        ) from exc
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(
            f"{checkpoint}: {file.name} cannot be read ({type(exc).__name__}: {exc}); expected a whole torch.save "
            "file; fix: check that the save finished (is_complete) and the file is not corrupt"
        ) from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{checkpoint}: {file.name} holds a {type(obj).__name__}; expected a checkpoint dict")
    return obj


def _read_state(info: CheckpointInfo) -> dict[str, Any]:
    """The whole module's state dict, full tensors, keys as in the LightningModule's ``state_dict()``."""
    path = info.path
    if info.format == "lightning":
        state = _copied(_meta(path, "lightning")["state_dict"])
    elif info.format == "dcp":
        state = _read_dcp(path)
    else:
        state = _read_deepspeed(path)
    logger.debug("Read %d entries from the %s checkpoint %s", len(state), info.format, path)
    return {key.removeprefix(_WRAPPER_PREFIX): value for key, value in state.items()}


def _copied(state: Mapping[str, Any]) -> dict[str, Any]:
    """The tensors of a memory-mapped load, copied into memory.

    Mapped, then copied: only the module's tensors are read (not the optimizer states, often twice their size), and
    what is returned does not change when the file is later overwritten in place (a ``last.ckpt`` saved again).
    """
    return {key: value.clone() if isinstance(value, torch.Tensor) else value for key, value in state.items()}


_DCP_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch": {"Size", "device", "layout", "memory_format"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "PurePosixPath", "Path"},
    "collections": {"OrderedDict"},
}  # fmt: skip
"""What a DCP ``.metadata`` pickle may build: torch's own metadata records, sizes, dtypes, paths; nothing that runs."""


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP ``.metadata`` file, refusing every global outside `_DCP_METADATA_GLOBALS` (and dtypes)."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = name in _DCP_METADATA_GLOBALS.get(module, ()) or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        )
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a DCP .metadata file")
        return super().find_class(module, name)


def _restricted_reader(path: Path) -> Any:
    """A DCP ``FileSystemReader`` whose ``.metadata`` is read by `_MetadataUnpickler` instead of plain ``pickle``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import StorageMeta

    class RestrictedReader(dcp.FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            # FileSystemReader.read_metadata, with the restricted unpickler (torch 2.13's steps otherwise).
            with (Path(self.path) / _DCP_METADATA).open("rb") as handle:
                metadata = _MetadataUnpickler(handle).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return RestrictedReader(path)


def _read_dcp(path: Path) -> dict[str, torch.Tensor]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = _restricted_reader(path)
    try:
        entries = reader.read_metadata().state_dict_metadata
    except Exception as exc:  # noqa: BLE001 - a corrupt .metadata raises anything pickle can
        raise CheckpointError(f"{path}: {_DCP_METADATA} cannot be read ({exc}); expected DCP metadata") from exc
    root = next((r for r in _DCP_ROOTS if any(k.startswith(r + ".") for k in entries)), None)
    if root is None:
        raise CheckpointError(
            f"{path}: DCP keys {sorted(entries)[:_SHOWN]}; expected the module under one of {list(_DCP_ROOTS)} "
            "(as Lightning's ModelParallelStrategy and FSDPStrategy save it); fix: pass a checkpoint Lightning wrote"
        )
    # Plain CPU tensors of the full sizes: DCP reads into each the parts of every shard that overlap it, whatever
    # world size wrote them. Non-tensor entries (a module's extra state) are left out: DCP would unpickle them
    # without weights_only.
    state = {
        key[len(root) + 1 :]: torch.empty(entry.size, dtype=entry.properties.dtype)
        for key, entry in entries.items()
        if key.startswith(root + ".") and isinstance(entry, TensorStorageMetadata)
    }
    loaded = {root: state}
    with warnings.catch_warnings():
        # no_dist on purpose: every rank reads whole tensors by itself, so no collective can hang or mismatch.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        dcp.load(loaded, storage_reader=reader, no_dist=True)
    return loaded[root]


def _read_deepspeed(path: Path) -> dict[str, torch.Tensor]:
    tag_dir, model_states = _deepspeed_layout(path)
    if model_states.name == _DS_MODEL_STATES[0]:
        # ZeRO 0-2 do not partition the parameters: rank 0's model states hold the whole module.
        return _copied(_safe_load(path, model_states, mmap=True)["module"])
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError as exc:
        raise CheckpointError(
            f"{path}: a DeepSpeed ZeRO-3 checkpoint, whose partitions only DeepSpeed can consolidate, and deepspeed "
            f"is not importable ({exc}); fix: pip install distprobe[deepspeed]"
        ) from exc
    # DeepSpeed's consolidation torch.loads every file unrestricted: vet each with weights_only first, allowing only
    # the plain state classes DeepSpeed itself puts in its optimizer states.
    with torch.serialization.safe_globals([DynamicLossScaler, LossScaler, ZeroStageEnum]):
        for file in sorted(tag_dir.glob("*.pt")):
            _safe_load(path, file, mmap=True)
    return dict(get_fp32_state_dict_from_zero_checkpoint(str(path), tag=tag_dir.name))


def _select(path: Path, state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    if not prefix:
        return dict(state)
    key_prefix = prefix if prefix.endswith(".") else prefix + "."
    selected = {key[len(key_prefix) :]: value for key, value in state.items() if key.startswith(key_prefix)}
    if not selected:
        raise CheckpointError(
            f"{path}: nothing under prefix {prefix!r}; the checkpoint's weights are under {_prefixes(state)}; "
            "expected the backbone's attribute path in the training's LightningModule (e.g. 'backbone.'); "
            "fix: pass one of those prefixes, or '' for the whole module"
        )
    return selected


def _prefixes(state: Mapping[str, Any]) -> list[str]:
    """The first components of the keys, e.g. ``['backbone.', 'head.']`` (the first few)."""
    prefixes = sorted({key.split(".", 1)[0] + ("." if "." in key else "") for key in state})
    return prefixes[: 2 * _SHOWN]


def _guess_prefix(state: Mapping[str, Any], missing: list[str]) -> str | None:
    """The prefix under which the checkpoint holds every missing key, if there is one."""
    if not missing:
        return None
    first = missing[0]
    candidates = sorted(key[: -len(first)] for key in state if key.endswith("." + first))
    return next((c for c in candidates if all(c + key in state for key in missing)), None)
