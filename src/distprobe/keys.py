"""Every logged key and bank head id, formatted and parsed back in one place (standard library only).

The callbacks, `distprobe.loop`, the bank, the kNN, the monitors, the probing service and `distprobe report` all
build and read keys through this module, so a key renamed here is renamed for the writers and the readers at once.

The grammar (``{probe}`` is a probe's, bank's, kNN's or monitor's name, never containing ``/``):

- ``{stage}/{probe}_{metric}``: a probe-wide value, ``train/linear_loss``, ``eval/linear_top1``;
- ``{stage}/{probe}_{head}_{metric}``: ``head`` is `BEST` (a bank's selected head, on the report split) or a
  kNN's ``k{K}``, ``eval/grid_best_top1``, ``eval/knn_k20_top1``;
- ``{stage}/{probe}/{head_id}_{metric}``: one bank head, ``eval/grid/embedding/lr=0.1/wd=0/norm=none_top1``;
- ``{stage}/{probe}_bad_batches/{reason}``: bad-data counts, ``train/linear_bad_batches/nonfinite_input``;
- ``hparams/lr_{probe}``: a probe's learning rate on logging steps.

``{stage}`` is `TRAIN`, `EVAL` or, for the probing service's results written into a training's log, `CHECKPOINT`.
Without its ``{stage}/{probe}`` part a key is *relative* (`relative_key`: ``best_top1``, ``k20_top1``,
``{head_id}_top1``): the form a bank's or a kNN's ``compute_*`` returns before the caller knows its stage.

Example:
    >>> key("eval", "grid", "top1", head=head_id("embedding", 0.1, 0.0, "none"))
    'eval/grid/embedding/lr=0.1/wd=0/norm=none_top1'
    >>> parse("eval/grid/embedding/lr=0.1/wd=0/norm=none_top1")
    LoggedKey(stage='eval', probe='grid', metric='top1', head='embedding/lr=0.1/wd=0/norm=none')
    >>> parse("eval/knn_k20_top1").head, parse("train/my_probe_loss_epoch", names=["my_probe"]).metric
    ('k20', 'loss_epoch')
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, TypeVar

TRAIN = "train"
EVAL = "eval"
CHECKPOINT = "ckpt"
"""The stage of the probing service's numbers in a training's own log (`distprobe.service.training_log`)."""
HPARAMS = "hparams"
STAGES = (TRAIN, EVAL, CHECKPOINT)
LOG_STAGE = {"train": TRAIN, "val": EVAL}
"""The logged stage of each metric stage (eval metrics are ``eval/*``, as the reference API names them)."""

LOSS = "loss"
"""Train loss on logging steps (a bank's: the mean over its heads; per head: the epoch's mean)."""
LOSS_EPOCH = "loss_epoch"
"""The train epoch's mean loss over every micro-batch of every rank."""
SKIPPED_STEPS = "skipped_steps"
"""Optimizer steps skipped for non-finite gradients (a bank's: summed over heads)."""
BAD_BATCHES = "bad_batches"
"""Micro-batches with bad data, one key per reason: ``bad_batches/{reason}``."""
BEST = "best"
"""The head of ``{probe}_best_{metric}``: a bank's selected head, scored on the report split."""
BEST_HEAD = "best_head"
"""A bank's selected head as its index in the bank's order (a metric, not a head)."""
LR = "lr"
"""The metric of ``hparams/lr_{probe}``."""
SELECTED = "selected"
"""The probing service's result row naming the head a bank selected (stored, never logged)."""

Normalization = Literal["none", "bn"]
V = TypeVar("V")


@dataclass(frozen=True)
class LoggedKey:
    """One logged key, taken apart."""

    stage: str
    """`TRAIN`, `EVAL`, `CHECKPOINT` or `HPARAMS`."""
    probe: str
    """The probe's (bank's, kNN's, monitor's) name."""
    metric: str
    """``top1``, `LOSS`, `LOSS_EPOCH`, `SKIPPED_STEPS`, `BEST_HEAD`, ``bad_batches/{reason}``, `LR`..."""
    head: str | None = None
    """A bank head's id, `BEST`, a kNN's ``k{K}``, or None for a probe-wide value."""

    def format(self) -> str:
        """The key as logged."""
        return key(self.stage, self.probe, self.metric, head=self.head)

    @property
    def reason(self) -> str | None:
        """The reason of a bad-data count, else None."""
        kind, slash, reason = self.metric.partition("/")
        return reason if slash and kind == BAD_BATCHES else None


@dataclass(frozen=True)
class HeadId:
    """A bank head's id, taken apart (the numbers as written in the id)."""

    source: str
    """The input (an output or batch key, a tap) the head reads."""
    lr: str
    weight_decay: str
    normalization: Normalization


# --- formatting -------------------------------------------------------------------------------------------------


def key(stage: str, probe: str, metric: str, *, head: str | None = None) -> str:
    """The logged key of ``metric`` of ``probe`` (or of one of its heads) at ``stage``."""
    if stage == HPARAMS:
        return f"{HPARAMS}/{metric}_{probe}"
    if head is None or head == BEST or knn_k(head) is not None:
        return f"{stage}/{probe}_{relative_key(metric, head=head)}"
    return f"{stage}/{probe}/{relative_key(metric, head=head)}"


def relative_key(metric: str, *, head: str | None = None) -> str:
    """A key without its ``{stage}/{probe}`` part: ``top1``, ``best_top1``, ``k20_top1``, ``{head_id}_top1``."""
    return metric if head is None else f"{head}_{metric}"


def absolute_key(stage: str, probe: str, relative: str) -> str:
    """The logged key of a relative key (`relative_key`)."""
    head, metric = split_relative(relative)
    return key(stage, probe, metric, head=head)


def absolute_keys(values: Mapping[str, V], stage: str, probe: str) -> dict[str, V]:
    """Every relative key of ``values`` made absolute; the values untouched."""
    return {absolute_key(stage, probe, rel): value for rel, value in values.items()}


def stage_prefix(stage: str, probe: str) -> str:
    """``{stage}/{probe}_``: the prefix of a probe's probe-wide keys (a torchmetrics collection's ``prefix``)."""
    return f"{stage}/{probe}_"


def bad_batches(reason: str) -> str:
    """The metric counting bad micro-batches for ``reason``: ``bad_batches/{reason}``."""
    return f"{BAD_BATCHES}/{reason}"


def head_id(source: str, lr: float, weight_decay: float, normalization: Normalization) -> str:
    """A bank head's readable id: ``"embedding/lr=0.01/wd=0/norm=none"`` (numbers in ``%g`` form)."""
    return f"{source}/lr={lr:g}/wd={weight_decay:g}/norm={normalization}"


def predictions(probe: str) -> str:
    """The key under which a probe's predictions are put into a step's outputs and batch: ``{probe}_preds``."""
    return f"{probe}_preds"


def knn_head(k: int) -> str:
    """A kNN's head for ``k`` neighbours: ``k20``."""
    return f"k{k}"


def ridge_head(l2: float) -> str:
    """An OnlineRidge head, one per lambda: ``l2=0.01`` (``%g`` form), logged as ``eval/{probe}/l2=0.01_top1``."""
    return f"l2={l2:g}"


def episode_id(shots: int, seed: int) -> str:
    """A few-shot episode's id: ``shots=5/seed=0`` (its draw depends on these and the class alone)."""
    return f"shots={shots}/seed={seed}"


def fewshot_shots(head: str) -> tuple[int, int | None] | None:
    """The shots and seed of a few-shot head: ``shots=5/seed=0`` gives ``(5, 0)``, ``shots=5`` ``(5, None)``.

    ``shots=5`` is a shot count's head (its mean over seeds); any other head gives None.

    Example:
        >>> fewshot_shots("shots=5/seed=2"), fewshot_shots("shots=5"), fewshot_shots("l2=0.1")
        ((5, 2), (5, None), None)
    """
    match = _FEWSHOT_HEAD.match(head)
    if match is None:
        return None
    return int(match["shots"]), None if match["seed"] is None else int(match["seed"])


# --- parsing ----------------------------------------------------------------------------------------------------

_HEAD_ID = re.compile(r"^(?P<source>.+)/lr=(?P<lr>[^/]+)/wd=(?P<wd>[^/]+)/norm=(?P<norm>none|bn)$")
_KNN_HEAD = re.compile(r"^k(\d+)$")
_RIDGE_HEAD = re.compile(r"^l2=([^/_]+)$")
_FEWSHOT_HEAD = re.compile(r"^shots=(?P<shots>\d+)(?:/seed=(?P<seed>\d+))?$")
_SETTING = re.compile(r"^[A-Za-z][A-Za-z0-9]*=[^/_=]+$")


def parse_head_id(head: str) -> HeadId | None:
    """The parts of a bank head's id, or None if ``head`` is not one."""
    match = _HEAD_ID.match(head)
    if match is None:
        return None
    norm: Normalization = "bn" if match["norm"] == "bn" else "none"
    return HeadId(source=match["source"], lr=match["lr"], weight_decay=match["wd"], normalization=norm)


def knn_k(head: str) -> int | None:
    """The k of a kNN's head (``k20`` gives 20), or None if ``head`` is not one."""
    match = _KNN_HEAD.match(head)
    return int(match[1]) if match else None


def ridge_l2(head: str) -> float | None:
    """The lambda of an OnlineRidge head (``l2=0.01`` gives 0.01), or None if ``head`` is not one."""
    match = _RIDGE_HEAD.match(head)
    if match is None:
        return None
    try:
        return float(match[1])
    except ValueError:
        return None


def is_setting_head(head: str) -> bool:
    """Whether ``head`` is named by its settings, ``name=value`` parts joined by ``/``.

    A ridge lambda (``l2=0.01``), a few-shot episode (``shots=5/seed=0``) or its shots (``shots=5``). Such a head is
    logged under the probe's name as a path, as a bank head is.
    """
    return all(_SETTING.match(part) for part in head.split("/"))


def parse(logged: str, names: Iterable[str] = ()) -> LoggedKey | None:
    """Take a logged key apart; None for a key of no probe's form (the model's own ``train/ssl_loss``...).

    Only a bank head's key holds a ``/`` after the name (a bad-data count holds one before its reason), and its
    head id says where the head ends. A name may hold ``_``, so ``train/a_b_c`` alone does not say where the name
    ends. Given ``names`` (the known probes), the longest that fits wins and a key that fits none gives None;
    without them, the name ends before a reserved metric (`LOSS_EPOCH`, `SKIPPED_STEPS`, `BEST_HEAD`,
    ``bad_batches/*``), a `BEST` or ``k{K}`` head, or else at the last ``_``.

    Args:
        logged: The key.
        names: The probe names to split flat keys at, if known.
    """
    stage, slash, rest = logged.partition("/")
    if not slash or not rest:
        return None
    if stage == HPARAMS:
        metric, sep, probe = rest.partition("_")
        return LoggedKey(HPARAMS, probe, metric) if sep and probe and metric == LR else None
    if stage not in STAGES:
        return None
    candidates = sorted(set(names), key=len, reverse=True)
    probe, sep, tail = rest.partition("/")
    if sep and not probe.endswith(f"_{BAD_BATCHES}"):
        if candidates and probe not in candidates:
            return None
        head, metric = _split_head(tail)
        return LoggedKey(stage, probe, metric, head) if head is not None else None
    if candidates:
        name = next((n for n in candidates if rest.startswith(f"{n}_") and len(rest) > len(n) + 1), None)
        if name is None:
            return None
        head, metric = split_relative(rest[len(name) + 1 :])
        return LoggedKey(stage, name, metric, head)
    return _parse_unnamed(stage, rest)


def split_relative(relative: str) -> tuple[str | None, str]:
    """``(head, metric)`` of a relative key (`relative_key`)."""
    if relative == BEST_HEAD or relative.startswith(f"{BAD_BATCHES}/"):
        return None, relative
    if "/" in relative:
        head, metric = _split_head(relative)
        if head is None:
            raise ValueError(f"relative key {relative!r}: expected '{{head_id}}_{{metric}}' for a bank head")
        return head, metric
    first, sep, metric = relative.partition("_")
    if sep and metric and (first == BEST or knn_k(first) is not None or is_setting_head(first)):
        return first, metric
    return None, relative


def _split_head(tail: str) -> tuple[str | None, str]:
    """``(head, metric)`` of ``{head}_{metric}``: a bank head's id or a head of settings (`is_setting_head`) first.

    ``(None, tail)`` for any other tail.
    """
    for index in (i for i, char in enumerate(tail) if char == "_"):
        metric = tail[index + 1 :]
        head = tail[:index]
        if metric and "/" not in metric and (parse_head_id(head) is not None or is_setting_head(head)):
            return tail[:index], metric
    return None, tail


def _parse_unnamed(stage: str, rest: str) -> LoggedKey | None:
    bad, sep, reason = rest.partition(f"_{BAD_BATCHES}/")
    if sep:
        return LoggedKey(stage, bad, bad_batches(reason)) if bad and reason and "/" not in reason else None
    if "/" in rest:
        return None
    for reserved in (LOSS_EPOCH, SKIPPED_STEPS, BEST_HEAD):
        if rest.endswith(f"_{reserved}") and len(rest) > len(reserved) + 1:
            return LoggedKey(stage, rest[: -len(reserved) - 1], reserved)
    name, sep, metric = rest.rpartition(f"_{BEST}_")
    if sep and name and metric:
        return LoggedKey(stage, name, metric, BEST)
    parts = rest.split("_")
    for i in range(len(parts) - 2, 0, -1):
        if knn_k(parts[i]) is not None:
            return LoggedKey(stage, "_".join(parts[:i]), "_".join(parts[i + 1 :]), parts[i])
    name, sep, metric = rest.rpartition("_")
    return LoggedKey(stage, name, metric) if sep and name and metric else None
