"""`ProbeBank`: K heads trained as one fused step, each with its own learning rate and weight decay.

The bank knows no head's shape: a head family (`distprobe.bank.families`; linear heads today) supplies the stacked
parameters, the batched forward, the loss and the metric kind. One train step is one forward of every head (for
linear heads, one batched matmul per feature source), one loss for every head, one backward, and
at the close of an accumulation window one all-reduce of the single flat gradient. That all-reduce is issued without
waiting: the step it feeds is applied when the bank is next used (its next forward, an evaluation, a checkpoint), so
the backbone's next forward runs while it travels. Every rank applies the same reduced gradient at the same point,
so replicas stay bitwise identical and the update equals the synchronous one.

Every decision stays on the device: per-head non-finite skips, clipping and bad-data verdicts are tensors; the host
never waits for the device inside a step.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from distprobe.bank import multilabel
from distprobe.bank.config import BankConfig
from distprobe.bank.families import FAMILIES, HeadFamily
from distprobe.bank.metric_kinds import build_metrics
from distprobe.bank.metrics_set import BankMetrics
from distprobe.bank.optimizer import BankOptimizer
from distprobe.bank.selection import running_positions, selects
from distprobe.engine import bad_data, functional, maths
from distprobe.engine.collectives import (
    PendingMean,
    agree_on_max,
    broadcast_from_global_rank0,
    default_group,
    gather_over_group,
    rank_and_world,
    start_mean,
)
from distprobe.engine.precision import float32_matmuls
from distprobe.engine.probe import to_probe_input
from distprobe.engine.shapes import BatchShapes, batch_rows, stand_in_preds
from distprobe.engine.state import resume_window

#: Bumped when the layout of `ProbeBank.state_dict` changes.
STATE_FORMAT = 1


@dataclass
class BankStepOutput:
    """What one bank train step returns: device tensors, and host facts known without a sync."""

    loss: torch.Tensor
    """``(K,)`` each head's loss on the micro-batch, detached."""
    preds: torch.Tensor
    """``(B, K, C)`` logits of every head, detached."""
    stepped: bool
    """Whether this micro-step closed an accumulation window."""
    bad: torch.Tensor
    """0-d bool: this rank's micro-batch held bad data (the window's step is skipped for every head)."""


class ProbeBank:
    """A grid of heads (of one family) over one or more feature sources, replicated over a data-parallel group.

    Build with `ProbeBank.build`; call `train_step` on every training micro-batch and `eval_step` on every
    validation batch. Every rank of the group must make the same calls (they hold collectives).

    Example:
        >>> bank = ProbeBank.build(BankConfig(name="grid", inputs=["x"], num_classes=3, lr=[0.1, 0.01], in_features=8))
        >>> out = bank.train_step([torch.randn(4, 8)], torch.tensor([0, 1, 2, 0]))
        >>> bank.head_ids[0], tuple(out.preds.shape)
        ('x/lr=0.1/wd=0/norm=none', (4, 2, 3))
    """

    def __init__(
        self,
        config: BankConfig,
        heads: HeadFamily,
        dp_group: dist.ProcessGroup | None,
        metrics: BankMetrics,
        total_steps: int | None = None,
    ) -> None:
        self.config = config
        self.heads = heads
        self.dp_group = dp_group
        self.metrics = metrics
        self.device = heads.flat.device
        self.optimizer = BankOptimizer(config, heads, total_steps=total_steps)
        """Every head's optimizer state, step counts, skip counts and scheduled rates."""
        self.micro_step = 0
        self._grad: torch.Tensor | None = None
        """The open window's gradient sum of this rank (autograd's own result, so no zero_grad can drop it)."""
        self._pending: PendingMean | None = None
        """An issued all-reduce and its gradient, whose step has not been applied yet."""
        self._window_bn: list[torch.Tensor] | None = None
        self._bn_buffers = heads.statistics()
        self._statistics_readers = heads.statistics_readers()
        self._counted = hasattr(heads, "summed_loss")
        """The family's loss is a sum with a count (dense heads): the window's gradient carries the count last."""
        self._eval_seen = 0
        self.best_index: torch.Tensor | None = None
        """The head chosen on the selection split at the last `compute_eval_metrics` (a device tensor)."""
        self.batch_shapes = BatchShapes(
            "bank",
            config.name,
            [*(f"input {source!r}" for source in config.inputs), "target 'targets'"],
            [*(heads.input_signature for _ in config.inputs), heads.target_signature],
        ).to(self.device)
        """The first training batch's shapes; a later batch of other shapes is skipped and counted
        (``bad_batches/wrong_shape``). Adapters name the target by its key."""

    @classmethod
    def build(
        cls,
        config: BankConfig,
        *,
        in_features: dict[str, int] | None = None,
        dp_group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
        total_steps: int | None = None,
        metrics: BankMetrics | None = None,
        seed: int = 0,
    ) -> ProbeBank:
        """Create the heads (identical on every rank: rank 0's are broadcast) and the optimizer state.

        Args:
            config: The bank's grid and training options.
            in_features: Feature size per source (else ``config.in_features``).
            dp_group: The data-parallel group to replicate over; None: a single replica.
            device: Where the heads live.
            total_steps: The bank's number of optimizer steps, for scheduler defaults such as ``T_max``.
            metrics: Already built metrics (an adapter that shows them before set-up).
            seed: Seeds the heads' initialisation.
        """
        sizes = dict(in_features or {})
        for source in config.inputs:
            if source not in sizes:
                size = config.in_features_of(source)
                if size is None:
                    raise ValueError(
                        f"bank '{config.name}': no feature size for source {source!r}; pass 'in_features' or build "
                        "the bank from a first batch."
                    )
                sizes[source] = size
        generator = torch.Generator(device="cpu").manual_seed(seed)
        heads = FAMILIES[config.family](config, sizes, device=device, generator=generator)
        # Every replica starts from global rank 0's heads (also across tensor-parallel groups).
        broadcast_from_global_rank0([heads.flat])
        if metrics is None:
            metrics = build_metrics(config, heads.num_heads)
        metrics.to(heads.flat.device)
        metrics.set_process_group(dp_group)
        return cls(config, heads, dp_group, metrics, total_steps=total_steps)

    @property
    def name(self) -> str:
        """The bank's unique name."""
        return self.config.name

    @property
    def skipped_steps(self) -> torch.Tensor:
        """``(K,)``: each head's optimizer steps skipped for a non-finite gradient (a device tensor)."""
        return self.optimizer.skipped_steps

    @property
    def head_ids(self) -> list[str]:
        """Readable ids of the heads, in the bank's order: ``"embedding/lr=0.01/wd=0/norm=none"``."""
        return [h.head_id for h in self.heads.head_list]

    def name_target(self, key: str) -> None:
        """Name the targets by the key they are read from, for the warning about a later batch of other shapes."""
        self.batch_shapes.name([*self.batch_shapes.labels[:-1], f"target {key!r}"])

    def head_index(self, head_id: str) -> int:
        """The position of ``head_id`` in `head_ids`."""
        ids = self.head_ids
        if head_id not in ids:
            raise KeyError(f"bank '{self.name}': no head {head_id!r}; heads: {ids}")
        return ids.index(head_id)

    def head(self, head_id: str) -> nn.Module:
        """That head as a plain module with its current weights (linear: an ``nn.Linear``, behind its BatchNorm)."""
        self.settle()
        return self.heads.export(self.head_index(head_id))

    # --- training ---------------------------------------------------------------------------------------------

    def _check_targets(
        self, targets: torch.Tensor, preds: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Class-index targets, multi-hot ones (``config.multilabel``), or the family's own (dense masks)."""
        family_check = getattr(self.heads, "check_targets", None)
        if family_check is not None:
            return family_check(targets, preds)
        if self.config.multilabel:
            return multilabel.check_targets(targets, preds)
        return bad_data.check_targets(targets, preds, None)

    def _check_count(self, features: list[Any]) -> None:
        if len(features) != len(self.config.inputs):
            raise ValueError(
                f"bank '{self.name}': got {len(features)} feature tensors for {len(self.config.inputs)} sources "
                f"{self.config.inputs}."
            )

    def _inputs(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        self._check_count(features)
        return [to_probe_input(f, self.heads.flat) for f in features]

    def train_step(self, features: list[torch.Tensor | None], targets: torch.Tensor | None) -> BankStepOutput:
        """Train every head on one micro-batch (one ``(B, ...)`` tensor per source); step at a window's close.

        Bad data never raises: the batch is cleaned, its gradient poisoned, and the window skipped for every head on
        every rank. A head whose own gradient is not finite (it diverged) is skipped alone. A batch of other shapes
        than the first (None: an input missing from it) trains as an empty batch of the first one's shapes, counted
        as bad data (`distprobe.engine.shapes`).
        """
        self.settle()
        self._check_count(features)
        given = [*features, targets]
        (*batch, y), skipped = self.batch_shapes.conform(given, self.device)
        share = getattr(self.heads, "samples_per_step", None)
        if share is not None:  # a fixed-size share of the batch bounds the cost (dense heads)
            batch, y = [f[:share] for f in batch], y[:share]
        accumulate = self.config.accumulate_grad_batches
        window_start = self.micro_step % accumulate == 0
        boundary = maths.is_boundary(self.micro_step, accumulate)
        xs = self._inputs(batch)
        targets = y.to(self.device)
        features_ok = torch.stack([bad_data.finite_features(x) for x in xs]).all()
        xs = [bad_data.zero_nonfinite(x) for x in xs] if self._bn_buffers else xs
        if window_start and self._bn_buffers:
            self._window_bn = [b.clone() for b in self._bn_buffers]
        self.heads.train()
        device_type = self.device.type
        in_autocast = torch.is_autocast_enabled(device_type)
        outside_autocast = torch.autocast(device_type, enabled=False) if in_autocast else contextlib.nullcontext()
        with outside_autocast, float32_matmuls(self.config.matmul_precision), torch.enable_grad():
            logits = self.heads(xs, self.dp_group)  # (K, B, C)
            safe_targets, countable, in_range, finite = self._check_targets(targets, logits[0])
            checked = bad_data.verdict(features_ok, countable, in_range, finite)
            summed = getattr(self.heads, "summed_loss", None)
            if summed is None:
                losses = self.heads.loss(logits, safe_targets)  # (K,): each head's loss, as a separate probe's
                weightless = checked.bad
                total = bad_data.poison(losses.sum(), checked.bad, scale=1.0 / accumulate)
                (grad,) = torch.autograd.grad(total, self.heads.flat)
                untrainable = self.heads.untrainable_heads(int(targets.shape[0]), self.dp_group)
                if untrainable is not None:
                    self._skip_window_of(grad, untrainable)
            else:
                # A mean over units whose number varies by sample (valid pixels): sums now, and their count rides
                # as the gradient's last element, so the window's all-reduce also sums the global count.
                sums, count = summed(logits, safe_targets)
                (grad,) = torch.autograd.grad(bad_data.poison(sums.sum(), checked.bad), self.heads.flat)
                grad = torch.cat([grad, count.to(grad.dtype).view(1)])
                # A micro-batch without a unit (masks all ignore_index) sums to 0 over a count of 0: its step loss
                # reads 0 (not 0 / 0 = NaN, no host sync to decide), it trains nothing, and it weighs nothing in the
                # epoch's mean loss, or every head's would read NaN to the epoch's end.
                losses = sums / count.clamp(min=1)
                weightless = checked.bad | (count == 0)
            if not targets.shape[0]:  # no sample (known on the host): see `Probe._untrainable_step`
                checked = bad_data.untrainable_verdict(0, self.device)
                weightless = checked.bad
                grad = torch.full_like(grad, float("nan"))  # its gradient is zero: the NaN skips the window everywhere
        if window_start or self._grad is None:
            self._grad = grad
        else:
            self._grad.add_(grad)
        losses = losses.detach()
        logits = logits.detach().transpose(0, 1)  # (B, K, C) for users and metrics: a view, contiguous for linear heads
        self.metrics.deferred.add(
            losses, weightless, int(targets.shape[0]), checked.counts, logits, safe_targets, checked.keep
        )
        self.micro_step += 1
        if boundary:
            self._reduce_and_step()
        preds = stand_in_preds(logits, batch_rows(given)) if skipped else logits
        return BankStepOutput(loss=losses, preds=preds, stepped=boundary, bad=checked.bad)

    def _skip_window_of(self, grad: torch.Tensor, heads: torch.Tensor) -> None:
        """NaN in the gradient of ``heads``, a ``(K,)`` mask: their window is skipped and counted in `skipped_steps`.

        As a separate probe skips a micro-batch it cannot train on (`Probe._untrainable_step`).
        """
        for view in self.heads.views(grad):
            rows = heads[view.heads].view(-1, *([1] * (view.whole.ndim - 1)))
            view.whole.masked_fill_(rows, float("nan"))

    def _reduce_and_step(self) -> None:
        grad = self._grad
        assert grad is not None, "a window closes with a gradient"
        self._grad = None
        pending = start_mean(grad, self.dp_group)
        if rank_and_world(self.dp_group)[1] == 1:
            self._apply(pending.wait())
            return
        self._pending = pending

    def settle(self) -> None:
        """Wait for the last window's all-reduce and apply its step (a no-op when none is pending).

        Called before anything reads the heads: the next train step, an evaluation, a checkpoint, `head`.
        """
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        self._apply(pending.wait())

    def _apply(self, grad: torch.Tensor) -> None:
        """One optimizer step of every head from the reduced gradient (identical on every rank)."""
        if self._counted:
            # Summed losses: the mean over every counted unit of the window's global batch. No unit at all gives
            # sums of 0, hence a zero gradient (weight decay and momentum still step, as every rank agrees).
            grad = grad[:-1] / grad[-1].clamp(min=torch.finfo(grad.dtype).tiny)
        finite = self.optimizer.step(grad)
        if self._window_bn is not None:
            # A window skipped for every head that reads a statistic (bad data; one sample for BatchNorm heads) leaves
            # no trace in it either, as a separate probe's skipped window leaves none in its BatchNorm.
            skipped = finite.logical_not()
            readers = self._statistics_readers
            if readers is None:
                functional.restore_where(skipped.all(), self._bn_buffers, self._window_bn)
            else:
                for buffer, saved, heads in zip(self._bn_buffers, self._window_bn, readers, strict=True):
                    functional.restore_where((skipped | ~heads).all(), [buffer], [saved])
            self._window_bn = None

    # --- evaluation -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, features: list[torch.Tensor]) -> torch.Tensor:
        """``(B, K, C)`` logits in eval mode (non-finite features give 0s), without touching metrics."""
        self.settle()
        xs = [bad_data.zero_nonfinite(x) for x in self._inputs(features)]
        was_training = self.heads.training
        self.heads.eval()
        try:
            precision = float32_matmuls(self.config.matmul_precision)
            with torch.autocast(device_type=self.device.type, enabled=False), precision:
                return self.heads(xs).transpose(0, 1)
        finally:
            self.heads.train(was_training)

    def start_eval_epoch(self) -> None:
        """Count validation samples from 0 again (the selection split follows their positions)."""
        self._eval_seen = 0

    def eval_step(
        self,
        features: list[torch.Tensor],
        targets: torch.Tensor,
        num_valid: int | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict and count the first ``num_valid`` samples (all by default) into the selection or report split.

        ``positions`` are the samples' indices in the validation set; by default they follow from this rank's
        running count, as `DistributedSampler` without shuffle deals them (`distprobe.bank.selection`). A batch of
        other shapes than training established is skipped and counted (`distprobe.engine.shapes`): none of its
        samples counts (they keep their places in the running count), and its predictions are NaN rows.
        """
        self._check_count(features)
        given = [*features, targets]
        rows = batch_rows(given)
        (*features, targets), skipped = self.batch_shapes.conform_eval(given, self.device)
        preds = self.predict(features)
        if skipped:
            self._eval_seen += (rows or 0) if num_valid is None else num_valid
            return stand_in_preds(preds, rows)
        n = targets.shape[0] if num_valid is None else num_valid
        if positions is None:
            positions = running_positions(self._eval_seen, n, self.dp_group, self.device)
        self._eval_seen += n
        keep_rows = slice(0, n)
        kept_preds = preds[keep_rows]
        safe_targets, countable, _, _ = self._check_targets(targets[keep_rows].to(self.device), kept_preds[:, 0])
        rows_ok = countable
        for f in features:
            rows_ok = rows_ok & bad_data.row_checks(to_probe_input(f, self.heads.flat)[keep_rows])
        select = selects(positions.to(self.device)[:n], self.config.selection_fraction)
        self.metrics.update_eval(kept_preds, safe_targets, rows_ok, select)
        return preds

    def compute_eval_metrics(self) -> dict[str, torch.Tensor]:
        """Every head's metrics (all samples), and the best head's on the report split; one flat collective.

        The best head is the one with the highest first metric on the selection split; it is never chosen on the
        samples it reports. Resets the eval states.
        """
        values, self.best_index = self.metrics.compute_eval(self.dp_group)
        return values

    def compute_train_metrics(self) -> dict[str, torch.Tensor]:
        """Per-head train metrics and losses, and the bad-batch counts (one flat collective)."""
        self.settle()
        return self.metrics.compute_train(self.dp_group)

    def reset_train_metrics(self) -> None:
        """Start a new epoch of train metrics (the run-long bad-batch counts stay)."""
        self.metrics.reset_train()

    def set_total_steps(self, total_steps: int | None) -> None:
        """Rebuild the scheduler with lengths from ``total_steps`` (largest over the world), unless training began."""
        total_steps = agree_on_max(total_steps, default_group(), device=self.device)
        self.optimizer.rates.set_total_steps(total_steps)

    @property
    def best_head_id(self) -> str | None:
        """The id of the head chosen at the last evaluation (reads the device: call it at an epoch end)."""
        if self.best_index is None:
            return None
        return self.head_ids[int(self.best_index)]

    # --- checkpoints -------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly, keyed by head id (a collective: mid-window gradients are gathered)."""
        self.settle()
        in_window = self.micro_step % self.config.accumulate_grad_batches != 0
        window = None
        if in_window:
            size = self.heads.flat.numel() + int(self._counted)
            local = self._grad if self._grad is not None else self.heads.flat.new_zeros(size)
            window = [parts[0] for parts in gather_over_group([local], self.dp_group)]
        return {
            "format": STATE_FORMAT,
            "name": self.name,
            "head_ids": self.head_ids,
            "in_features": dict(self.heads.in_features),
            "heads": self.heads.state_dict(),
            "batchnorm": [t.clone() for t in self._bn_buffers],
            **self.optimizer.state_dict(),
            "micro_step": self.micro_step,
            "window_grads_per_rank": window,
            "window_bn": None if not in_window else self._window_bn,
            "metrics": self.metrics.synced_states(self.dp_group),
            "wrong_shape_batches": self.batch_shapes.state_dict(self.dp_group),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` saved.

        Raises:
            ValueError: unless the grid is the same heads in the same order (`head_ids`): the flat parameters and
                optimizer state are laid out in that order.
        """
        saved_ids = list(state["head_ids"])
        if saved_ids != self.head_ids:
            raise ValueError(
                f"bank '{self.name}': the checkpoint holds heads {saved_ids}, but this bank's grid is "
                f"{self.head_ids}; resume with the same grid (lr, weight_decay, normalization, input), or give "
                "the changed bank a new name to start it fresh."
            )
        self.heads.load_state_dict(state["heads"])
        for mine, saved in zip(self._bn_buffers, state.get("batchnorm", []), strict=True):
            mine.copy_(saved)
        self.optimizer.load_state_dict(state)
        self.micro_step = int(state.get("micro_step", 0))
        window = state.get("window_grads_per_rank")
        self._grad = None
        if window is not None:
            (mine,) = resume_window([[g] for g in window], self.dp_group)
            world = rank_and_world(self.dp_group)[1]
            if self._counted and len(window) != world:
                # Summed losses with their count: the window's reduced ratio needs the saved ranks' total sums and
                # count spread over this world (each rank its share), not their mean, which a mean loss needs.
                mine = mine * (len(window) / world)
            self._grad = mine.to(self.device).clone()
        saved_bn = state.get("window_bn")
        self._window_bn = None if saved_bn is None else [b.to(self.device) for b in saved_bn]
        self._pending = None
        self.metrics.load_synced_states(state.get("metrics", {}), self.dp_group)
        self.batch_shapes.load_state_dict(state.get("wrong_shape_batches"), self.dp_group)
