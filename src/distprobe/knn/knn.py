"""`ShardedKNN`: a weighted kNN classifier whose buffer is sharded over the data-parallel group, never gathered whole.

- Training: each rank pushes its own detached features into its `RingShard` (``ceil(queue_length / world)`` slots):
  no communication.
- Evaluation, per batch: the ranks' query features are all-gathered (``O(queries x D x world)``); each rank scores
  every query against its shard and keeps its ordered top-``max(k)``; those candidates are all-gathered
  (``O(queries x k x world)``) and each rank merges its own queries' candidates into the exact global top-k.
- Checkpoints: `state_dict` gathers every shard to group rank 0 (Lightning writes rank 0's callback state only);
  `load_state_dict` gives each rank its own shard back.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from typing_extensions import Self, override

from distprobe import keys
from distprobe.bank.multilabel import MULTILABEL_METRICS, EvalSamples, head_values
from distprobe.engine import bad_data
from distprobe.engine.replicate import group_rank_and_size, is_distributed
from distprobe.engine.shapes import batch_rows, flat_input_shapes, stand_in_preds
from distprobe.engine.sized import Group, SizedEngine
from distprobe.knn import multilabel, search
from distprobe.knn.config import KNNConfig
from distprobe.knn.metrics import KNNAccuracy
from distprobe.knn.shard import RingShard
from distprobe.metrics.flat_sync import compute_metrics_synced
from distprobe.metrics.shape import per_row

log = logging.getLogger(__name__)

STATE_FORMAT = 1


class ShardedKNN(SizedEngine[KNNConfig]):
    """The kNN engine: one shard per rank, exact global top-k at evaluation. Build it with `ShardedKNN.build`.

    Every rank of ``dp_group`` must call `eval_step`, `compute_eval_metrics`, `state_dict` and `load_state_dict`
    at the same points (they are collectives); `update` is rank-local.

    Example:
        >>> knn = ShardedKNN.build(KNNConfig(name="knn", num_classes=2, queue_length=4, k=(1, 3)), in_features=2)
        >>> knn.update(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]]), torch.tensor([0, 1, 0]))
        >>> knn.eval_step(torch.tensor([[0.9, 0.0]]), torch.tensor([0])).tolist()
        [[0, 0]]
    """

    def __init__(
        self, config: KNNConfig, shard: RingShard, dp_group: dist.ProcessGroup | None, device: torch.device
    ) -> None:
        self.config = config
        self.shard = shard
        self.dp_group = dp_group if is_distributed(dp_group) else None
        self.device = device
        self.metrics = KNNAccuracy(len(config.k)).to(device)
        self.samples = EvalSamples().to(device)
        """Multi-label: every counted validation sample's label scores per k, gathered at the epoch's end."""
        self.batch_shapes = flat_input_shapes("kNN", config).to(device)
        """The first training batch's shapes: a later training or validation batch of others is skipped and counted
        (`distprobe.engine.shapes`); a skipped training batch adds nothing to the buffer."""

    @classmethod
    @override
    def create(cls, config: KNNConfig, in_features: int, dp_group: Group, device: torch.device) -> Self:
        """An empty kNN of ``in_features``-sized features, sharded over ``dp_group`` (`SizedEngine.build` makes one)."""
        _, world = group_rank_and_size(dp_group)
        shard = RingShard(config.shard_capacity(world), in_features, config.dtype, device, config.label_width)
        return cls(config, shard, dp_group, device)

    @property
    def name(self) -> str:
        """The kNN's name."""
        return self.config.name

    @property
    def in_features(self) -> int:
        """Stored feature size."""
        return int(self.shard.features.shape[1])

    # --- training -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def update(self, features: torch.Tensor | None, targets: torch.Tensor | None) -> None:
        """Push this rank's batch of training features (detached, normalized, cast to the storage dtype).

        A batch of other shapes than the first (None: an input missing from it) adds nothing, counted as bad data.
        """
        (features, targets), _ = self.batch_shapes.conform([features, targets], self.device)
        targets = targets.to(self.device)
        labels = multilabel.pack(targets) if self.config.multilabel else targets
        features = search.normalized(features.to(self.device))
        if not self.config.multilabel:
            # A class out of range must never vote (scatter_add_ would index past the classes at every later eval):
            # its row is stored as NaN, which scores -inf and weighs 0, like a non-finite feature. No host sync.
            bad = ~((labels >= 0) & (labels < self.config.num_classes))  # a NaN float label fails both, so is bad
            features = torch.where(bad[:, None], float("nan"), features)
            labels = torch.where(bad, -1, labels)
        self.shard.push(features, labels)

    # --- evaluation ---------------------------------------------------------------------------------------------

    def _gather_queries(self, queries: torch.Tensor) -> tuple[torch.Tensor, list[int], int]:
        """Every rank's queries padded to the largest batch, in rank order; the batch sizes; the padded size."""
        if self.dp_group is None:
            return queries, [queries.shape[0]], queries.shape[0]
        _, world = group_rank_and_size(self.dp_group)
        size = torch.tensor([queries.shape[0]], dtype=torch.long, device=self.device)
        sizes = [torch.empty_like(size) for _ in range(world)]
        dist.all_gather(sizes, size, group=self.dp_group)
        counts = [int(s) for s in sizes]
        padded = max(counts)
        mine = queries.new_zeros(padded, queries.shape[1])
        mine[: queries.shape[0]] = queries
        every = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(every, mine, group=self.dp_group)
        return torch.cat(every), counts, padded

    def _local_candidates(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This shard's ordered top-``max(k)`` for each query: scores, global positions and labels."""
        k = self.config.max_k
        rank, _ = group_rank_and_size(self.dp_group)
        labels = self.shard.logical_labels()
        filled = max(1, self.shard.filled)
        rows = max(1, search.SCORE_BLOCK // filled)
        values, positions = [], []
        for start in range(0, queries.shape[0], rows):
            scores = self.shard.logical_scores(queries[start : start + rows], block=search.CAST_BLOCK)
            v, p = search.ordered_topk(scores, k)
            values.append(v)
            positions.append(p)
        value = torch.cat(values) if values else queries.new_zeros(0, k)
        position = torch.cat(positions) if positions else torch.zeros(0, k, dtype=torch.long, device=self.device)
        valid = position >= 0 if labels.ndim == 1 else (position >= 0)[..., None]
        if labels.numel():
            label = torch.where(valid, labels[position.clamp(min=0)], 0)
        else:  # an empty shard: every candidate is padding (weight 0)
            label = torch.zeros(*position.shape, *labels.shape[1:], dtype=torch.long, device=self.device)
        # Global position: rank-major, then the shard's logical order (the union buffer's order).
        global_position = torch.where(position >= 0, position + rank * self.shard.capacity, -1)
        return value, global_position, label

    def _merge(self, value: torch.Tensor, ids: torch.Tensor, own: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact global top-k of this rank's queries from every rank's candidates (``ids``: positions, labels).

        Labels are ``ids[..., 1:]``: one class index, or a multi-label vector's packed words.
        """
        k = self.config.max_k
        if self.dp_group is None:
            return value[own], self._labels_of(ids[own])
        _, world = group_rank_and_size(self.dp_group)
        values = [torch.empty_like(value) for _ in range(world)]
        every_ids = [torch.empty_like(ids) for _ in range(world)]
        dist.all_gather(values, value.contiguous(), group=self.dp_group)
        dist.all_gather(every_ids, ids.contiguous(), group=self.dp_group)
        # (queries, world * k) in rank order: among equal scores, lower columns are lower global positions.
        cand_values = torch.cat([v[own] for v in values], dim=1)
        cand_labels = torch.cat([i[own, :, 1:] for i in every_ids], dim=1)
        merged, column = search.ordered_topk(cand_values, k)
        picked = column.clamp(min=0)[..., None].expand(-1, -1, cand_labels.shape[2])
        return merged, self._labels_of(cand_labels.gather(1, picked), packed=True)

    def _labels_of(self, ids: torch.Tensor, packed: bool = False) -> torch.Tensor:
        """``(Q, k)`` class indices, or ``(Q, k, words)`` packed label vectors, from ``ids`` (or labels alone)."""
        labels = ids if packed else ids[..., 1:]
        return labels if self.config.multilabel else labels[..., 0]

    @torch.no_grad()
    def eval_step(self, features: torch.Tensor, targets: torch.Tensor, num_valid: int | None = None) -> torch.Tensor:
        """Classify this rank's batch against the union of all shards; count the first ``num_valid`` samples.

        A batch of other shapes than training established is skipped and counted (`distprobe.engine.shapes`): this
        rank joins the batch's collectives with no query, counts none of its samples, and returns -1 for its classes
        (NaN for multi-label scores).

        Returns:
            ``(B, len(k))`` predicted classes, one column per k in the configured order.
        """
        given = [features, targets]
        (features, targets), skipped = self.batch_shapes.conform_eval(given, self.device)
        preds = self._eval_step(features, targets, num_valid)
        return stand_in_preds(preds, batch_rows(given)) if skipped else preds

    def _eval_step(self, features: torch.Tensor, targets: torch.Tensor, num_valid: int | None) -> torch.Tensor:
        config = self.config
        features = features.to(self.device)
        queries = search.normalized(features)
        every, counts, padded = self._gather_queries(queries)
        value, position, label = self._local_candidates(every)
        rank, _ = group_rank_and_size(self.dp_group)
        own = slice(rank * padded, rank * padded + counts[rank])
        ids = torch.cat([position[..., None], label if label.ndim == 3 else label[..., None]], dim=2)
        scores, labels = self._merge(value, ids, own)
        valid = scores.shape[0] if num_valid is None else min(num_valid, scores.shape[0])
        targets = targets.to(self.device)[:valid]
        finite = bad_data.row_checks(features)[:valid]  # a non-finite query is not counted
        if config.multilabel:
            shares = multilabel.label_scores(scores, labels, tuple(config.k), config.num_classes, config.temperature)
            keep = ((targets == 0) | (targets == 1)).all(dim=1) & finite  # nor is a label outside {0, 1}
            self.samples.update(shares[:valid], targets, keep, keep)
            return shares
        preds = search.predict(scores, labels, tuple(config.k), config.num_classes, config.temperature)
        # Bad samples are left out, as a probe's are: a non-finite query, a label outside [0, num_classes).
        keep = finite & (targets >= 0) & (targets < config.num_classes)
        self.metrics.update(preds[:valid], targets, keep)
        return preds

    def compute_eval_metrics(self) -> dict[str, torch.Tensor]:
        """``{"top1": ..., "k{K}_top1": ...}`` over the group (one flat all-reduce), then reset for the next run.

        ``top1`` is the first k's accuracy. Multi-label: ``mAP``, ``f1_micro``, ``f1_macro`` and ``k{K}_...`` instead
        (torchmetrics on every rank's samples, gathered).
        """
        if self.config.multilabel:
            return self._multilabel_values()
        (accuracy,) = compute_metrics_synced([self.metrics], self.dp_group)
        accuracy = per_row(accuracy, len(self.config.k))  # one k: torchmetrics returned it 0-d
        self.metrics.reset()
        values = {"top1": accuracy[0]}
        values.update(
            {keys.relative_key("top1", head=keys.knn_head(k)): accuracy[i] for i, k in enumerate(self.config.k)}
        )
        return values

    def _multilabel_values(self) -> dict[str, torch.Tensor]:
        ks, c = self.config.k, self.config.num_classes
        shares, targets, _ = self.samples.gathered(self.dp_group, len(ks), c)
        self.samples.reset()
        values: dict[str, torch.Tensor] = {}
        for i, k in enumerate(ks):
            for metric, value in head_values(shares[:, i], targets, list(MULTILABEL_METRICS)).items():
                values[keys.relative_key(metric, head=keys.knn_head(k))] = value
                if i == 0:
                    values[metric] = value
        return values

    def reset_eval_metrics(self) -> None:
        """Forget the counts of an evaluation (a sanity check, an interrupted run)."""
        self.metrics.reset()
        self.samples.reset()

    # --- memory and checkpoints ---------------------------------------------------------------------------------

    @property
    def buffer_nbytes(self) -> int:
        """Bytes this rank's shard holds (features and labels)."""
        return self.shard.nbytes

    def state_dict(self) -> dict[str, Any]:
        """The shards: group rank 0 gets every rank's (a collective), the others their own.

        On group rank 0 the state is the whole buffer, ``world x capacity`` rows, only while it is saved.
        """
        rank, world = group_rank_and_size(self.dp_group)
        own = self.shard.state()
        shards: dict[int, dict[str, Any]] = {rank: own}
        if self.dp_group is not None:
            shards = _gather_shards(self.shard, self.dp_group, rank, world)
        return {
            "format": STATE_FORMAT,
            "in_features": self.in_features,
            "capacity": self.shard.capacity,
            "storage_dtype": self.config.storage_dtype,
            "world_size": world,
            "shards": shards,
            "wrong_shape_batches": self.batch_shapes.state_dict(self.dp_group),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take this rank's shard back from a state saved by `state_dict` (rank 0's: every shard is in it).

        At another world size, new rank ``r`` keeps the newest samples of the old shards ``j`` with
        ``j % world == r`` (the buffer's content survives; its tie order and exact predictions do not).
        """
        rank, world = group_rank_and_size(self.dp_group)
        shards = state["shards"]
        self.batch_shapes.load_state_dict(state.get("wrong_shape_batches"), self.dp_group)
        if int(state["in_features"]) != self.in_features:
            raise ValueError(
                f"kNN '{self.name}': the loaded state holds {state['in_features']}-dimensional features but this kNN "
                f"stores {self.in_features}; load a state of the same feature size."
            )
        if int(state["world_size"]) == world and int(state["capacity"]) == self.shard.capacity and rank in shards:
            self.shard.load(shards[rank])
            return
        missing = [j for j in range(int(state["world_size"])) if j not in shards]
        if missing:
            raise ValueError(
                f"kNN '{self.name}': the loaded state lacks the shards of ranks {missing}; load the state saved by "
                "group rank 0 (its state_dict gathers every shard)."
            )
        log.warning(
            "kNN '%s': re-sharding a buffer saved on %s ranks (capacity %s) onto %d ranks (capacity %d).",
            self.name,
            state["world_size"],
            state["capacity"],
            world,
            self.shard.capacity,
        )
        dtype, width = self.shard.features.dtype, self.config.label_width
        fresh = RingShard(self.shard.capacity, self.in_features, dtype, self.device, width)
        for j in range(int(state["world_size"])):
            if j % world == rank:
                old = RingShard(int(state["capacity"]), self.in_features, dtype, "cpu", width)
                old.load(shards[j])
                fresh.push(old.logical_features().to(self.device), old.logical_labels().to(self.device))
        self.shard = fresh


def _gather_shards(shard: RingShard, group: dist.ProcessGroup, rank: int, world: int) -> dict[int, dict[str, Any]]:
    """Every rank's shard on group rank 0 (``dist.gather``: the other ranks never hold the whole buffer)."""
    written = torch.tensor([shard.written], dtype=torch.long, device=shard.features.device)
    dst = dist.get_global_rank(group, 0)
    tensors = [shard.features, shard.labels, written]
    gathered: list[list[torch.Tensor]] = []
    for tensor in tensors:
        parts = [torch.empty_like(tensor) for _ in range(world)] if rank == 0 else None
        dist.gather(tensor, gather_list=parts, dst=dst, group=group)
        gathered.append(parts or [])
    if rank != 0:
        return {rank: shard.state()}
    return {
        j: {"features": gathered[0][j].cpu(), "labels": gathered[1][j].cpu(), "written": int(gathered[2][j])}
        for j in range(world)
    }
