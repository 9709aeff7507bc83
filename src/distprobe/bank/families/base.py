"""The interface between a bank's engine and a family of heads (linear today; attentive and dense next).

A bank trains K heads as one: one flat parameter, one forward for every head, one loss, one backward, and at the
close of an accumulation window one all-reduce of the flat gradient. `ProbeBank` and `BankOptimizer` do that
(accumulation, clipping, per-head non-finite skips, the optimizer maths of `distprobe.engine.functional`, the
overlapped all-reduce, checkpoints by head id, best-head selection, metrics) and know no head's shape. A family
supplies what does depend on it:

- **stacked parameters**: `initial_flat`, every head's initial weights as one tensor (the base class makes it
  ``flat``, one float32 ``nn.Parameter``), and `views`, which cuts any tensor laid out like it (the parameter, its
  gradient, an optimizer state) into `ParamView` blocks of ``(K_s, ...)`` tensors, heads along the first dimension;
- **a batched forward**: ``forward(features, group)`` gives ``(K, B, C)`` outputs of every head from one feature
  tensor per source (``group`` serves statistics that span the data-parallel group, such as a BatchNorm's);
- **its loss**: ``loss(outputs, targets)`` gives ``(K,)``, each head's loss as a separate probe's;
- **its metric kind**: `metric_kind` names the per-head metrics the bank reports (`distprobe.bank.metrics_set`);
- **its running statistics** (`statistics`, restored when a window is skipped, saved in checkpoints) and `export`,
  one head as a plain module.

A new family is one file of `distprobe.bank.families` holding a subclass, one entry in its ``FAMILIES``, and tests.
The grid (`distprobe.bank.config.Head`: source, normalization, lr, weight decay) and the head ids stay the bank's.
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from distprobe.bank.config import BankConfig, Head
from distprobe.engine.precision import MatmulPrecision
from distprobe.engine.shapes import ndim_signature, width_signature


@dataclass(frozen=True)
class ParamView:
    """One block of heads inside a tensor laid out like a family's flat parameter."""

    heads: slice
    """The block's heads: their positions in the bank's order."""
    whole: torch.Tensor
    """``(K_s, ...)``: every element of each head, weights and biases together (elementwise maths, norms, masks)."""
    parts: tuple[torch.Tensor, ...]
    """``(K_s, ...)`` per kind of tensor (weight, bias): LARS takes a trust ratio per part."""
    bias_like: tuple[bool, ...]
    """Per part: a bias or a normalization's weight, which LARS may leave out of adaptation and weight decay."""


class HeadFamily(nn.Module, abc.ABC):
    """K heads of one kind over a bank's feature sources, stacked in one flat parameter (see the module docstring).

    Subclasses implement `initial_flat` (which lays the heads out), `forward`, `views` and `export`; the loss and
    metric kind default to classification by cross-entropy.

    Args:
        config: The bank's configuration (its grid of heads, ``head_options``).
        in_features: Feature size per source.
        device: Where the heads live (None: the CPU).
        generator: The CPU generator their initial weights are drawn from.
    """

    metric_kind: ClassVar[str] = "classification"
    """The per-head metrics the bank reports: ``"classification"`` is top-k accuracy."""
    default_matmul_precision: ClassVar[MatmulPrecision | None] = None
    """The bank's ``matmul_precision`` when the user gives none: None follows the process's setting. A family turns
    TF32 on by default only once its heads' accuracy is shown unchanged by it (benchmarks/tf32_accuracy.py)."""

    def __init__(
        self,
        config: BankConfig,
        in_features: dict[str, int],
        *,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.in_features = {source: in_features[source] for source in config.inputs}
        """Feature size per source, in the config's order (saved in checkpoints)."""
        self.head_list: list[Head] = config.heads()
        device = torch.device(device or "cpu")
        # float32 whatever the default dtype: Lightning's *-true precisions set it while callbacks set up, and heads
        # train in their own precision (features are cast to it).
        self.flat = nn.Parameter(self.initial_flat(generator, device).to(dtype=torch.float32, device=device))
        """Every head's parameters, in the layout `views` cuts."""

    @abc.abstractmethod
    def initial_flat(self, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        """Lay the heads out; return every head's initial parameters as one flat tensor, drawn from ``generator``.

        Called once, from ``__init__``, which makes it the ``flat`` parameter (float32, on ``device``). Anything else
        a family keeps on ``device`` (a BatchNorm's running statistics) is built here too.
        """

    @staticmethod
    def feature_size(sample_shape: torch.Size) -> int:
        """The feature size the heads read from one sample's shape (linear: every element, flattened)."""
        return int(sample_shape.numel())

    @classmethod
    def input_signature(cls, sample_shape: torch.Size) -> tuple[int, ...]:
        """What of one sample's features a later batch must keep: their dimensions and `feature_size`."""
        return (len(sample_shape), cls.feature_size(sample_shape))

    @classmethod
    def target_signature(cls, sample_shape: torch.Size) -> tuple[int, ...]:
        """What of one sample's target a later batch must keep: its dimensions and width (multi-hot: the labels).

        A family with targets of its own (``target_problem``: dense masks, whose size may change) keeps only their
        dimensions.
        """
        return ndim_signature(sample_shape) if hasattr(cls, "target_problem") else width_signature(sample_shape)

    @property
    def num_heads(self) -> int:
        """K, over every source."""
        return len(self.head_list)

    def flat_parts(self, sizes: list[int]) -> list[torch.Tensor]:
        """``flat`` cut into consecutive parts of ``sizes`` elements (a family's blocks, in order), for a forward.

        One part is the parameter itself: a view's backward is free, while split's would copy the gradient.
        """
        return [self.flat] if len(sizes) == 1 else list(torch.split(self.flat, sizes))

    @abc.abstractmethod
    def forward(self, features: list[torch.Tensor], group: dist.ProcessGroup | None = None) -> torch.Tensor:
        """``(K, B, C)`` outputs of every head, from one ``(B, ...)`` tensor per source.

        Contiguous, or a transposed view of a contiguous ``(B, K, C)`` buffer (the linear family's layout); `loss`
        reads either without a copy.
        """

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``(K,)``: each head's mean cross-entropy over the batch, as a separate probe's ``CrossEntropyLoss``.

        Multi-label targets (``config.multilabel``, ``(B, C)`` multi-hot): each head's mean binary cross-entropy
        with logits over the batch and labels, as ``BCEWithLogitsLoss``.
        """
        if self.config.multilabel:
            per_element = F.binary_cross_entropy_with_logits(
                outputs, targets.to(outputs.dtype).expand_as(outputs), reduction="none"
            )
            return per_element.mean(dim=(1, 2))
        k, b, c = outputs.shape
        # One call for every head, on contiguous rows (a strided class dimension is a slow path), in whichever of
        # the two layouts the family gave.
        if outputs.is_contiguous():
            per_sample = F.cross_entropy(outputs.view(k * b, c), targets.repeat(k), reduction="none")
            return per_sample.view(k, b).mean(dim=1)
        rows = outputs.transpose(0, 1).reshape(b * k, c)  # a view when (B, K, C) is the buffer's layout
        per_sample = F.cross_entropy(rows, targets.repeat_interleave(k), reduction="none")
        return per_sample.view(b, k).mean(dim=0)

    @abc.abstractmethod
    def views(self, flat: torch.Tensor) -> list[ParamView]:
        """The blocks of a tensor laid out like ``self.flat``, in the bank's head order (views, never copies)."""

    def statistics(self) -> list[torch.Tensor]:
        """Running statistics, in a fixed order: none unless the family normalises."""
        return []

    def statistics_readers(self) -> list[torch.Tensor] | None:
        """For each tensor of `statistics`, a ``(K,)`` bool mask of the heads that read it; None: every head.

        A window skipped by every head that reads a statistic puts it back as it was at the window's start, as a
        separate probe's skipped window puts back its BatchNorm's.
        """
        return None

    def untrainable_heads(self, batch_size: int, group: dist.ProcessGroup | None) -> torch.Tensor | None:
        """A ``(K,)`` bool mask of the heads that cannot train on this rank's micro-batch, or None (the usual case).

        Decided on the host from the batch's size, so the same on every rank that sees that size. The bank skips
        their window through the gradient, as `distprobe.engine.probe.Probe` skips a probe's (a BatchNorm of one
        process given one sample).
        """
        return None

    @abc.abstractmethod
    def export(self, index: int) -> nn.Module:
        """Head ``index`` as a plain module with its current weights (and statistics), in eval mode if it has any."""


def head_option_fields(cls: type, options: Any, bank_name: str, head: str) -> dict[str, Any]:
    """``head_options`` (None or a mapping) as a dict of family options class ``cls``'s fields.

    Raises:
        ValueError: for an unknown key, naming the bank and the head family and listing the valid options.
    """
    given = dict(options or {})
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise ValueError(
            f"bank '{bank_name}': argument 'head_options' got unknown option(s) {unknown} for head '{head}'; "
            f"valid options: {valid}."
        )
    return given
