"""`KNNConfig`: what an online kNN classifier is (its buffer, its neighbours, its weighting)."""

from __future__ import annotations

import logging
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch

from distprobe.arguments import require_choice, require_count, require_name
from distprobe.specs import TargetSpec

StorageDtype = Literal["float32", "bfloat16", "float16"]
log = logging.getLogger(__name__)

STORAGE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass(kw_only=True)
class KNNConfig:
    """One weighted kNN classifier over a ring buffer of recent training features, sharded over the dp group.

    Example:
        >>> KNNConfig(name="knn", num_classes=10, queue_length=4096, k=(20, 10)).max_k
        20
    """

    name: str
    """Unique name; keys logs (``eval/{name}_top1``) and checkpoint state."""
    num_classes: int
    """Number of classes of the labels."""
    queue_length: int
    """Training samples kept over the whole data-parallel group; each rank holds ``ceil(queue_length / world)``."""
    k: Sequence[int] = (10, 20, 100, 200)
    """Numbers of neighbours: one int or a non-empty sequence, all answered from one search of ``max(k)``; the first
    is the headline (``eval/{name}_top1`` and ``{name}_preds``). A k larger than the buffer holds (``queue_length``,
    or fewer samples early in training) votes with every sample there is."""
    temperature: float = 0.07
    """T of the neighbour weight ``exp(cosine / T)`` (DINO's eval_knn.py)."""
    storage_dtype: StorageDtype = "float32"
    """How features are stored; similarities are always computed in float32."""
    in_features: int | None = None
    """Feature size; None: read from the first training batch (or a loaded state)."""
    input: str | None = field(default=None)
    """Key of the features (ProbeSet and the callback route by it); None: one tensor is passed."""
    multilabel: bool = False
    """Targets are ``(B, num_classes)`` multi-hot: neighbours vote with their label vectors, reported as mAP and F1
    (`distprobe.knn.multilabel`, docs/multilabel.md)."""

    def __post_init__(self) -> None:
        name = require_name("kNN", self.name)
        if isinstance(self.k, int):
            self.k = (self.k,)
        iterable = isinstance(self.k, Iterable) and not isinstance(self.k, str) and getattr(self.k, "ndim", 1) != 0
        ks = tuple(self.k) if iterable else ()  # a 0-d tensor iterates into a TypeError
        if not ks or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in ks):
            # numpy and torch integers are refused as every count is (distprobe.arguments), with the conversion.
            convert = " (numpy or torch integers: convert them with int())" if _holds_integers(self.k) else ""
            raise ValueError(
                f"kNN '{name}': argument 'k' got {self.k!r}; expected an int >= 1 or a non-empty list of them, such "
                f"as (10, 20){convert}."
            )
        if len(set(ks)) != len(ks):
            raise ValueError(f"kNN '{name}': argument 'k' got {self.k!r} with repeats; give each k once.")
        self.k = ks
        require_count(f"kNN '{name}'", "num_classes", self.num_classes)
        require_count(f"kNN '{name}'", "queue_length", self.queue_length)
        if max(ks) > self.queue_length:
            log.warning(
                "kNN '%s': k=%d is larger than queue_length=%d; it votes with all %d stored samples.",
                name,
                max(ks),
                self.queue_length,
                self.queue_length,
            )
        if not self.temperature > 0:
            raise ValueError(f"kNN '{name}': argument 'temperature' got {self.temperature!r}; expected a float > 0.")
        require_choice(f"kNN '{name}'", "storage_dtype", self.storage_dtype, get_args(StorageDtype))
        if self.in_features is not None:
            require_count(f"kNN '{name}'", "in_features", self.in_features, or_none=True)

    @property
    def max_k(self) -> int:
        """The one search's depth."""
        return max(self.k)

    @property
    def dtype(self) -> torch.dtype:
        """The storage dtype as a torch dtype."""
        return STORAGE_DTYPES[self.storage_dtype]

    @property
    def label_width(self) -> int:
        """int64 words per stored label: 0 for a class index, else the packed multi-hot vector's."""
        from distprobe.knn.multilabel import words

        return words(self.num_classes) if self.multilabel else 0

    def shard_capacity(self, world_size: int) -> int:
        """Slots per rank: ``ceil(queue_length / world_size)``."""
        return -(-self.queue_length // world_size)


def _holds_integers(value: Any) -> bool:
    """Whether ``value`` is, or holds only, integer scalars that are not Python ints (numpy's, 0-d torch tensors)."""
    items = [value] if getattr(value, "ndim", 1) == 0 or not isinstance(value, Iterable) else list(value)
    try:
        return bool(items) and all(operator.index(v) >= 1 for v in items)
    except TypeError:
        return False


class KNNSpec(TargetSpec[KNNConfig], config_type=KNNConfig, kind="kNN"):
    """One kNN of a `distprobe.loop.ProbeSet`: its configuration (features by ``config.input``) and its target key."""


to_knn_spec = KNNSpec.of
"""A `KNNSpec` from itself, a `KNNConfig`, or a dict of its fields plus ``target`` (ValueError: unknown keys)."""
