"""The bookkeeping of exact evaluation agrees with what torch's DistributedSampler really yields."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler

from distprobe.metrics import real_samples_on_rank, valid_in_batch, valid_in_loader_batch
from distprobe.metrics.exact import dataloader_at


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 40),
    world=st.integers(1, 6),
    batch_size=st.integers(1, 9),
    shuffle=st.booleans(),
)
def test_every_sample_counted_exactly_once(n, world, batch_size, shuffle):
    counted: list[int] = []
    for rank in range(world):
        sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=shuffle, seed=3)
        loader = DataLoader(range(n), batch_size=batch_size, sampler=sampler)
        for batch_idx, batch in enumerate(loader):
            num_valid = valid_in_loader_batch(loader, batch_idx, len(batch))
            assert num_valid is not None
            assert 0 <= num_valid <= len(batch)
            counted.extend(batch[:num_valid].tolist())
    assert sorted(counted) == list(range(n))


def test_five_samples_on_two_ranks():
    sampler = DistributedSampler(range(5), num_replicas=2, rank=1, shuffle=False)
    assert list(sampler) == [1, 3, 0]
    assert real_samples_on_rank(sampler) == 2
    assert [valid_in_batch(2, start, length) for start, length in [(0, 2), (2, 1)]] == [2, 0]


@pytest.mark.parametrize(
    "sampler",
    [SequentialSampler(range(5)), DistributedSampler(range(5), num_replicas=2, rank=1, drop_last=True), None],
)
def test_no_padding_means_every_sample_is_real(sampler):
    assert real_samples_on_rank(sampler) is None
    assert valid_in_batch(None, 4, 3) is None


def test_loader_without_fixed_batch_size_counts_every_sample():
    loader = DataLoader(range(5), batch_sampler=[[0, 1], [2, 3, 4]])
    assert valid_in_loader_batch(loader, 1, 3) is None


def test_dataloader_at_handles_one_or_several_loaders():
    a, b = DataLoader(range(2)), DataLoader(range(3))
    assert dataloader_at(a, 0) is a
    assert dataloader_at([a, b], 1) is b
    assert dataloader_at({"x": a, "y": b}, 1) is b
    assert dataloader_at(None, 0) is None
