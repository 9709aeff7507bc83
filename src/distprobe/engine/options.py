"""How every trainable kind (a probe, a bank) trains: accumulation, clipping, scheduler; checked once, here.

`ProbeConfig` and `BankConfig` inherit these fields, so a probe and a bank accept and refuse the same values with
the same messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, get_args

from distprobe.arguments import require_choice, require_count
from distprobe.engine.functional.grads import ClipAlgorithm

#: The values of `ClipAlgorithm`, for messages and checks.
CLIP_ALGORITHMS: tuple[str, ...] = get_args(ClipAlgorithm)


@dataclass(kw_only=True)
class TrainingOptions:
    """The training options every trainable kind shares."""

    scheduler: Any = None
    """A name, ``{"type": ...}`` dict, Hydra config, partial/class/callable, instance, or None for a constant rate."""
    accumulate_grad_batches: int = 1
    """Micro-batches per optimizer step; gradients are not communicated on the micro-steps in between."""
    gradient_clip_val: float | None = None
    """Clip threshold of each head's own (all-reduced, unscaled) gradients, as for a separate probe; None: off."""
    gradient_clip_algorithm: ClipAlgorithm = "norm"
    """``"norm"`` clips the total gradient norm, ``"value"`` clamps each element."""

    def check_training_options(self, owner: str) -> None:
        """Raise a ValueError naming ``owner`` (``"probe 'linear'"``) for a bad accumulation or clipping option.

        ``accumulate_grad_batches=True`` is refused: a bool is an int to Python, but 1 is surely not what was meant.
        """
        require_count(owner, "accumulate_grad_batches", self.accumulate_grad_batches, hint="1 disables accumulation")
        require_choice(owner, "gradient_clip_algorithm", self.gradient_clip_algorithm, CLIP_ALGORITHMS)
        clip_val = self.gradient_clip_val
        if clip_val is not None and not (
            isinstance(clip_val, int | float) and not isinstance(clip_val, bool) and clip_val > 0
        ):
            raise ValueError(
                f"{owner}: argument 'gradient_clip_val' got {clip_val!r}; expected a positive number, or None to "
                "disable clipping."
            )
