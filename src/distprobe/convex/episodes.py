"""Few-shot episodes: which training samples an episode takes, a function of ``(seed, shots, class)`` (torch only).

An episode takes ``shots`` training samples of every class: a generator seeded from ``(seed, shots, class)`` permutes
the class's positions in the training set (ascending), and the first ``shots`` are taken. So an episode is the same
on any world size, after any resume, in any order of computation (torchgeo-bench #177 reports few-shot runs that
could not be reproduced). Each episode has an id (`distprobe.keys.episode_id`) so a requeued job can redo only the
ones it lacks.

The labels are grouped by class once per label set (`ClassMembers`, one stable sort) and every episode reads its
classes' positions from there: scanning every label once per class per episode took about 1 s an episode at 1000
classes and 1.28M labels.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from distprobe import keys


@dataclass(frozen=True)
class Episode:
    """One episode: ``shots`` samples of each class, drawn with ``seed``."""

    shots: int
    seed: int
    indices: torch.Tensor
    """``(num_classes * shots,)`` positions in the training set, class by class, each class in its draw order."""

    @property
    def id(self) -> str:
        """``shots={shots}/seed={seed}``."""
        return keys.episode_id(self.shots, self.seed)

    def folds(self, num_folds: int) -> torch.Tensor:
        """``(num_classes * shots,)`` each sample's cross-validation fold: the j-th shot of every class in fold j mod k.

        So every fold holds every class, whatever the number of classes.
        """
        return torch.arange(self.indices.numel()) % self.shots % num_folds


@dataclass(frozen=True)
class ClassMembers:
    """Each class's positions in a label set, ascending, grouped once for every episode drawn from it.

    A label outside ``[0, num_classes)`` (``-1`` for a row that may not be drawn) belongs to no class.

    Example:
        >>> members = ClassMembers.of(torch.tensor([2, 0, -1, 2, 0, 0]), num_classes=3)
        >>> members.of_class(0).tolist(), members.of_class(1).tolist(), members.of_class(2).tolist()
        ([1, 4, 5], [], [0, 3])
    """

    num_classes: int
    positions: torch.Tensor
    """``(M,)`` the positions of the labels in range, by class, ascending within a class (CPU)."""
    starts: tuple[int, ...]
    """``num_classes + 1`` offsets: class ``c``'s positions are ``positions[starts[c]:starts[c + 1]]``."""

    @classmethod
    def of(cls, labels: torch.Tensor, num_classes: int) -> ClassMembers:
        """Group ``labels`` ``(N,)`` by class: one stable sort, so each class keeps its positions in order."""
        labels = labels.detach().cpu().long().reshape(-1)
        kept = torch.nonzero((labels >= 0) & (labels < num_classes)).flatten()
        kept_labels = labels[kept]
        positions = kept[torch.argsort(kept_labels, stable=True)]
        counts = torch.bincount(kept_labels, minlength=num_classes)
        return cls(num_classes, positions, (0, *torch.cumsum(counts, 0).tolist()))

    def of_class(self, cls: int) -> torch.Tensor:
        """Class ``cls``'s positions in the label set, ascending."""
        return self.positions[self.starts[cls] : self.starts[cls + 1]]


def _class_seed(seed: int, shots: int, cls: int) -> int:
    # A fixed mix of the three numbers (no Python hash(), which is salted per process).
    return ((seed * 1_000_003 + shots) * 1_000_033 + cls) % (2**63 - 1)


def _grouped(labels: torch.Tensor | ClassMembers, num_classes: int) -> ClassMembers:
    if not isinstance(labels, ClassMembers):
        return ClassMembers.of(labels, num_classes)
    if labels.num_classes != num_classes:
        raise ValueError(
            f"fewshot: the labels were grouped for num_classes={labels.num_classes}, the episode asks for "
            f"num_classes={num_classes}; group them again with ClassMembers.of(labels, {num_classes})"
        )
    return labels


def draw_episode(labels: torch.Tensor | ClassMembers, num_classes: int, shots: int, seed: int) -> Episode:
    """The episode ``(seed, shots)`` over the training labels ``(N,)``, or over them grouped once (`ClassMembers`)."""
    if shots < 1:
        raise ValueError(f"fewshot: shots={shots}; expected a number of samples per class >= 1, e.g. [1, 5, 10, 25]")
    members = _grouped(labels, num_classes)
    picked = []
    for cls in range(num_classes):
        of_class = members.of_class(cls)
        if of_class.numel() < shots:
            raise ValueError(
                f"fewshot: class {cls} has {of_class.numel()} training samples, fewer than shots={shots}; "
                f"drop that shot count or use a larger training set"
            )
        generator = torch.Generator().manual_seed(_class_seed(seed, shots, cls))
        picked.append(of_class[torch.randperm(of_class.numel(), generator=generator)[:shots]])
    return Episode(shots, seed, torch.cat(picked))


def draw_episodes(
    labels: torch.Tensor | ClassMembers,
    num_classes: int,
    shots: Iterable[int],
    seeds: int | Sequence[int],
    skip: Iterable[str] = (),
) -> list[Episode]:
    """Every ``(shots, seed)`` episode whose id is not in ``skip``, shots-major; ``seeds`` a count or the seeds.

    The labels are grouped by class once for all of them (pass a `ClassMembers` to group them once for many calls).
    """
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    done = set(skip)
    pairs = [(s, seed) for s in shots for seed in seed_list if keys.episode_id(s, seed) not in done]
    if not pairs:
        return []
    members = _grouped(labels, num_classes)
    return [draw_episode(members, num_classes, s, seed) for s, seed in pairs]
