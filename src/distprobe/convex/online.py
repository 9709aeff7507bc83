"""`RidgeProbe`: an online closed-form ridge probe over a data-parallel group (torch only; no Lightning).

Each rank sums the float64 sufficient statistics of its training batches (`RidgeStatistics`); at each evaluation
one flat all-reduce gives every rank the group's sums and every rank solves the same problem exactly, for every
lambda at once. Evaluation counts each validation sample once per lambda, and the best lambda is chosen on the
hashed selection share of the validation set and reported on the rest, as a bank chooses its best head
(`distprobe.bank.selection`). Nothing is gathered: memory is O(D^2 + DC) per rank, whatever the number of samples.

`distprobe.callbacks.OnlineRidge` drives it from Lightning; a plain loop calls `train_step`, `start_eval_epoch`,
`eval_step` and `compute_eval_metrics` on every rank at the same points.

Example:
    >>> probe = RidgeProbe.build(RidgeConfig(name="ridge", num_classes=3, l2=(1e-3, 1.0)), in_features=4)
    >>> probe.train_step(torch.randn(16, 4), torch.randint(0, 3, (16,)))
    >>> probe.start_eval_epoch()
    True
    >>> _ = probe.eval_step(torch.randn(8, 4), torch.randint(0, 3, (8,)))
    >>> sorted(probe.compute_eval_metrics())[:2]
    ['best_l2', 'best_top1']
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from typing_extensions import Self, override

from distprobe import keys
from distprobe.bank.selection import running_positions, selects
from distprobe.convex.ridge import RidgeSolution, RidgeStatistics
from distprobe.convex.ridge_config import DEFAULT_L2, RidgeConfig, RidgeSpec, to_ridge_spec
from distprobe.convex.usable import usable_rows
from distprobe.engine.bad_data import REASONS
from distprobe.engine.collectives import rank_and_world, sum_over_group
from distprobe.engine.shapes import batch_rows, flat_input_shapes, stand_in_preds
from distprobe.engine.sized import Group, SizedEngine

__all__ = ["DEFAULT_L2", "RidgeConfig", "RidgeProbe", "RidgeSpec", "to_ridge_spec"]

log = logging.getLogger(__name__)


class RidgeProbe(SizedEngine[RidgeConfig]):
    """The statistics of one training epoch, their exact solve, and exact per-lambda evaluation (see module doc)."""

    def __init__(
        self, config: RidgeConfig, in_features: int, dp_group: dist.ProcessGroup | None, device: torch.device
    ) -> None:
        self.config = config
        self.name = config.name
        self.l2: tuple[float, ...] = tuple(config.l2)
        self.in_features = in_features
        self.dp_group = dp_group
        self.device = device
        self.stats = RidgeStatistics(in_features, config.num_classes, device)
        # Run-long bad-batch counts (never reset by an epoch), in the order of engine.bad_data.REASONS.
        self.bad_counts = torch.zeros(len(REASONS), dtype=torch.float64, device=device)
        self.batch_shapes = flat_input_shapes("ridge", config).to(device)
        """The first training batch's shapes: a later training or validation batch of others is skipped and counted
        here (`distprobe.engine.shapes`); a skipped training batch adds nothing to the statistics."""
        # Per lambda: correct on the selection split, on the report split; then the two splits' sample counts.
        self._eval = torch.zeros(2 * len(self.l2) + 2, dtype=torch.float64, device=device)
        self._eval_seen = 0
        self.solution: RidgeSolution | None = None
        self.best_index: int | None = None
        self._warned = False
        self.solved = False
        """Whether the solution is of the current statistics (`start_eval_epoch` since the last training batch)."""
        self.evaluated = False
        """Whether an evaluation was computed since the statistics were last reset (`distprobe.loop.ProbeSet` then
        starts new statistics at its next training batch, when ``config.reset_statistics`` is
        ``"after_evaluation"``)."""

    @classmethod
    @override
    def create(cls, config: RidgeConfig, in_features: int, dp_group: Group, device: torch.device) -> Self:
        """A probe with empty statistics of ``in_features`` features (`SizedEngine.build` makes one)."""
        return cls(config, in_features, dp_group, device)

    # --- training -----------------------------------------------------------------------------------------------

    def train_step(self, features: torch.Tensor | None, targets: torch.Tensor | None) -> None:
        """Add one training batch to this rank's statistics; a batch with bad data is dropped and counted.

        No host sync: the verdict is a device tensor that weighs the batch by 0 or 1. A batch of other shapes than
        the first (None: an input missing from it) adds nothing (`distprobe.engine.shapes`).
        """
        self.solved = False
        (features, targets), _ = self.batch_shapes.conform([features, targets], self.device)
        x = features.detach().flatten(1).to(self.device)
        y = targets.detach().to(self.device).reshape(-1)
        finite_x = torch.isfinite(x).all()
        if y.is_floating_point():
            finite_y = torch.isfinite(y).all()
            y = torch.nan_to_num(y, nan=-1.0)
            y_int = y.round().long()
            in_range = ((y_int >= 0) & (y_int < self.config.num_classes) & (y_int == y)).all()
        else:
            finite_y = torch.ones((), dtype=torch.bool, device=self.device)
            y_int = y.long()
            in_range = ((y_int >= 0) & (y_int < self.config.num_classes)).all()
        ok = finite_x & in_range & finite_y
        self.bad_counts += torch.stack([~finite_x, ~in_range, ~finite_y]).double()
        safe_x = torch.nan_to_num(x.double(), nan=0.0, posinf=0.0, neginf=0.0)
        safe_y = y_int.clamp(0, self.config.num_classes - 1)
        self.stats.update(safe_x, safe_y, weight=ok.double().expand(x.shape[0]))

    def reset_train(self) -> None:
        """Start a new epoch's statistics (the run-long bad-batch counts stay)."""
        self.stats.reset()
        self.evaluated = False

    def compute_train_metrics(self) -> dict[str, torch.Tensor]:
        """The bad-batch counts by reason, summed over the group (relative keys ``bad_batches/{reason}``)."""
        counts = sum_over_group(self.bad_counts.clone(), self.dp_group)
        self._warn_once(counts)
        return {keys.bad_batches(reason): counts[i].float() for i, reason in enumerate(REASONS)}

    def _warn_once(self, counts: torch.Tensor) -> None:
        if self._warned or not bool(counts.any()):  # a host read at an epoch's end only
            return
        self._warned = True
        found = {reason: int(counts[i]) for i, reason in enumerate(REASONS) if counts[i] > 0}
        log.warning("ridge '%s': training batches with bad data were skipped (counts by reason: %s)", self.name, found)

    # --- evaluation ---------------------------------------------------------------------------------------------

    def start_eval_epoch(self) -> bool:
        """Sum the statistics over the group (one flat all-reduce) and solve every lambda; a collective.

        Returns whether there is a solution: False when no training sample was summed on any rank (the same on
        every rank), and then `eval_step` counts nothing.
        """
        self._eval.zero_()
        self._eval_seen = 0
        total = self.stats.all_reduce(self.dp_group)
        self.solution = total.solve(self.l2) if float(total.count) > 0 else None
        self.solved = True
        return self.solution is not None

    @torch.no_grad()
    def eval_step(
        self,
        features: torch.Tensor,
        targets: torch.Tensor,
        num_valid: int | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Count the first ``num_valid`` samples (all by default) for every lambda; return ``(B, L)`` predictions.

        ``positions`` are the samples' indices in the validation set (`distprobe.callbacks.OnlineRidge` passes the
        ones its loader's sampler dealt); by default they follow from this rank's running count since
        `start_eval_epoch`, as `DistributedSampler` without shuffle deals them. Samples with non-finite features or
        labels out of range are not counted. A batch of other shapes than training established is skipped and
        counted (`distprobe.engine.shapes`): none of its samples counts (they keep their places in the running
        count), and its predictions are -1.
        """
        if self.solution is None:
            return None
        given = [features, targets]
        (features, targets), skipped = self.batch_shapes.conform_eval(given, self.device)
        x = features.detach().flatten(1).to(self.device)
        preds = self.solution.predict(torch.nan_to_num(x.double(), nan=0.0, posinf=0.0, neginf=0.0)).T  # (B, L)
        if skipped:
            rows = batch_rows(given)
            self._eval_seen += (rows or 0) if num_valid is None else num_valid
            return stand_in_preds(preds, rows)
        n = x.shape[0] if num_valid is None else num_valid
        if positions is None:
            positions = running_positions(self._eval_seen, n, self.dp_group, self.device)
        self._eval_seen += n
        y = targets.detach().to(self.device).reshape(-1)[:n]
        # The training rule: a float label must be a whole number (2.5 is no class; it was counted as class 2 here).
        countable = usable_rows(x[:n], y, self.config.num_classes).double()
        correct = (preds[:n] == y[:, None].long()).double() * countable[:, None]  # (n, L)
        select = selects(positions.to(self.device)[:n], self.config.selection_fraction).double()
        num = len(self.l2)
        self._eval[:num] += (correct * select[:, None]).sum(0)
        self._eval[num : 2 * num] += (correct * (1 - select)[:, None]).sum(0)
        self._eval[2 * num] += (countable * select).sum()
        self._eval[2 * num + 1] += (countable * (1 - select)).sum()
        return preds

    def compute_eval_metrics(self) -> dict[str, torch.Tensor]:
        """Each lambda's top-1 over every counted sample, and the best one's on the report split; one all-reduce.

        Relative keys (`distprobe.keys`): ``l2={l2:g}_top1`` per lambda, ``best_top1``, ``best_l2``. Empty when there
        was no solution. The best lambda is the one most accurate on the selection split (ties: the largest).
        """
        self.evaluated = True
        if self.solution is None:
            return {}
        summed = sum_over_group(self._eval.clone(), self.dp_group)
        num = len(self.l2)
        select_correct, report_correct = summed[:num], summed[num : 2 * num]
        select_total, report_total = summed[2 * num], summed[2 * num + 1]
        whole = (select_correct + report_correct) / (select_total + report_total)
        select_top1 = (select_correct / select_total).nan_to_num(-1.0)
        # Ties go to the largest lambda: among equally accurate solutions, the most regularised.
        order = sorted(range(num), key=lambda i: -self.l2[i])
        best = max(order, key=lambda i: float(select_top1[i]))
        self.best_index = best
        values = {keys.relative_key("top1", head=keys.ridge_head(v)): whole[i].float() for i, v in enumerate(self.l2)}
        values[keys.relative_key("top1", head=keys.BEST)] = (report_correct[best] / report_total).float()
        # float64, not float32: Lightning keeps a float64 tensor as it is (it widens only narrower ones), so the
        # logged value is the configured lambda itself (1e-4, not float32's 9.99999975e-05).
        values[keys.relative_key("l2", head=keys.BEST)] = torch.tensor(self.l2[best], dtype=torch.float64)
        return values

    # --- checkpoints --------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The group's summed statistics and bad-batch counts (a collective: every rank must call it).

        Only rank 0 of the group writes a checkpoint under Lightning, so rank-local sums are reduced first.
        """
        stats = self.stats.all_reduce(self.dp_group).state_dict()
        counts = sum_over_group(self.bad_counts.clone(), self.dp_group).cpu()
        return {
            "in_features": self.in_features,
            "l2": list(self.l2),
            "stats": stats,
            "bad_counts": counts,
            # Whether an evaluation closed these sums: a set resumed between an evaluation and its next training
            # batch must still start them anew there ("after_evaluation"), not add the next epoch to the last one's.
            "evaluated": self.evaluated,
            "wrong_shape_batches": self.batch_shapes.state_dict(self.dp_group),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict`'s output: the group's sums go to rank 0 of the group, zeros to the others.

        So the next all-reduce gives the saved sums once, on any world size.
        """
        if int(state["in_features"]) != self.in_features:
            raise ValueError(
                f"ridge '{self.name}': the checkpoint's statistics are of {state['in_features']} features, this "
                f"probe reads {self.in_features}; resume with the same input, or drop its state"
            )
        saved_classes = int(state["stats"]["num_classes"])
        if saved_classes != self.config.num_classes:
            raise ValueError(
                f"ridge '{self.name}': the checkpoint's statistics are of num_classes={saved_classes}, this probe has "
                f"num_classes={self.config.num_classes}; resume with num_classes={saved_classes}, or give the changed "
                "probe a new name to start it afresh"
            )
        rank, _ = rank_and_world(self.dp_group)
        self.stats.load_state_dict(state["stats"])
        self.evaluated = bool(state.get("evaluated", False))
        counts = state.get("bad_counts")
        if counts is not None:
            self.bad_counts.copy_(torch.as_tensor(counts, dtype=torch.float64))
        if rank != 0:
            self.stats.reset()
            self.bad_counts.zero_()
        self.batch_shapes.load_state_dict(state.get("wrong_shape_batches"), self.dp_group)
