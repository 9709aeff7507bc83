"""Few-shot episodes are drawn from labels grouped by class once, and are bit-identical to the documented drawing.

An episode is a documented, deterministic function of ``(seed, shots, class)``: a generator seeded from the three
numbers permutes the class's positions (ascending) and the first ``shots`` are taken. Before, every draw scanned
all the labels once per class (about 1 s an episode at 1000 classes and 1.28M labels); now the labels are grouped
once per label set (`ClassMembers`). `_reference_draw` is the drawing as it was, kept here as the reference.
"""

from __future__ import annotations

import time

import pytest
import torch

from distprobe.convex import ClassMembers, Episode, draw_episode, draw_episodes


def _class_seed(seed: int, shots: int, cls: int) -> int:
    return ((seed * 1_000_003 + shots) * 1_000_033 + cls) % (2**63 - 1)


def _reference_draw(labels: torch.Tensor, num_classes: int, shots: int, seed: int) -> Episode:
    """`draw_episode` before the labels were grouped once (distprobe at 2593a7f), verbatim but for the checks."""
    labels = labels.detach().cpu().long()
    picked = []
    for cls in range(num_classes):
        members = torch.nonzero(labels == cls).flatten()
        if members.numel() < shots:
            raise ValueError(f"class {cls} has too few samples")
        generator = torch.Generator().manual_seed(_class_seed(seed, shots, cls))
        picked.append(members[torch.randperm(members.numel(), generator=generator)[:shots]])
    return Episode(shots, seed, torch.cat(picked))


def _labels(num_samples: int, num_classes: int, seed: int = 0) -> torch.Tensor:
    """Unbalanced classes in no order, with rows that may not be drawn (-1), as `run_fewshot` passes them."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(num_classes, generator=g) + 0.2
    labels = torch.multinomial(weights, num_samples, replacement=True, generator=g)
    labels[torch.rand(num_samples, generator=g) < 0.05] = -1
    return labels


SHOTS, SEEDS = [1, 2, 5, 16], [0, 1, 7, 12345]


def test_episodes_are_bit_identical_to_the_reference_drawing():
    labels = _labels(3000, 13)
    expected = [_reference_draw(labels, 13, s, seed) for s in SHOTS for seed in SEEDS]
    drawn = draw_episodes(labels, 13, SHOTS, SEEDS)
    grouped = ClassMembers.of(labels, 13)
    assert [e.id for e in drawn] == [e.id for e in expected]
    for old, new in zip(expected, drawn, strict=True):
        assert new.indices.dtype == old.indices.dtype
        assert torch.equal(new.indices, old.indices), old.id
        assert torch.equal(draw_episode(labels, 13, old.shots, old.seed).indices, old.indices)
        assert torch.equal(draw_episode(grouped, 13, old.shots, old.seed).indices, old.indices)


def test_a_class_short_of_shots_is_still_refused():
    labels = torch.tensor([0, 1, 1, 0, 2, 1])
    with pytest.raises(ValueError, match=r"fewshot: class 2 has 1 training samples, fewer than shots=2"):
        draw_episodes(labels, 3, [2], 1)
    with pytest.raises(ValueError, match=r"grouped for num_classes=3, the episode asks for num_classes=4"):
        draw_episode(ClassMembers.of(labels, 3), 4, 1, 0)


def test_three_episodes_cost_less_than_one_did():
    """Three episodes (one grouping) take less time than one episode of the reference, which scans every label once
    per class (measured: about 6 times less at 1000 classes and 200,000 labels). One thread: a shared machine's
    other processes slow both sides alike then."""
    labels = _labels(200_000, 1000)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        one = _reference_draw(labels, 1000, 2, 0)
        reference = time.perf_counter() - start
        start = time.perf_counter()
        three = draw_episodes(labels, 1000, [2], 3)
        grouped = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(three[0].indices, one.indices)
    assert grouped < reference, (grouped, reference)
