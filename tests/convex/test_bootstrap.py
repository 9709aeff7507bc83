import math

import pytest
import torch

from distprobe.convex import bootstrap_interval


def binomial_two_sided_range(trials: int, p: float, alpha: float) -> tuple[int, int]:
    """The smallest and largest counts not rejected at ``alpha`` (equal tails) under Binomial(trials, p)."""
    pmf = [math.comb(trials, k) * p**k * (1 - p) ** (trials - k) for k in range(trials + 1)]
    low, tail = 0, 0.0
    while tail + pmf[low] < alpha / 2:
        tail += pmf[low]
        low += 1
    high, tail = trials, 0.0
    while tail + pmf[high] < alpha / 2:
        tail += pmf[high]
        high -= 1
    return low, high


def test_intervals_cover_the_true_accuracy_about_95_percent_of_the_time():
    generator = torch.Generator().manual_seed(1234)
    truth, n, draws = 0.7, 400, 300
    covered = 0
    for draw in range(draws):
        per_sample = (torch.rand(n, generator=generator) < truth).double()
        interval = bootstrap_interval(per_sample, resamples=1000, seed=draw)
        covered += interval.low <= truth <= interval.high
    low, high = binomial_two_sided_range(draws, 0.95, alpha=0.001)
    assert low <= covered <= high, f"{covered}/{draws} intervals covered the truth; expected {low}..{high}"


def test_interval_is_seeded_and_brackets_the_mean():
    values = (torch.arange(50) % 3 == 0).double()
    a = bootstrap_interval(values, resamples=500, seed=7)
    assert a == bootstrap_interval(values, resamples=500, seed=7)
    assert a != bootstrap_interval(values, resamples=500, seed=8)
    assert a.value == pytest.approx(17 / 50)
    assert a.low < a.value < a.high


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="no per-sample values"):
        bootstrap_interval(torch.tensor([]))
    with pytest.raises(ValueError, match="resamples=0, level=0.95"):
        bootstrap_interval(torch.ones(3), resamples=0)


def test_the_plain_percentile_interval_is_one_argument_away():
    # A skewed sample (90% right): the bias correction moves the lower end; the plain percentiles stay available.
    values = (torch.rand(200, generator=torch.Generator().manual_seed(0)) < 0.9).double()
    corrected = bootstrap_interval(values, resamples=1000)
    plain = bootstrap_interval(values, resamples=1000, method="percentile")
    assert corrected.value == plain.value
    assert (corrected.low, corrected.high) != (plain.low, plain.high)
    assert plain.low <= plain.value <= plain.high
    with pytest.raises(ValueError, match="method 'bias_corrected' or 'percentile'"):
        bootstrap_interval(values, method="bca")  # type: ignore[arg-type]
