"""Noise-floor helpers: bootstrap intervals over sequences, discover/evaluate splits, random controls."""

from __future__ import annotations

import numpy as np
import pytest

from ernie_lab import noise


@pytest.fixture(scope="module")
def per_sequence():
    """Per-sequence sums and token counts of 40 sequences of different lengths."""
    rng = np.random.default_rng(3)
    counts = rng.integers(3, 30, size=40).astype(float)
    sums = counts * rng.normal(0.2, 0.5, size=40)
    return sums, counts


def test_interval_contains_the_point_estimate_and_is_seeded(per_sequence):
    sums, counts = per_sequence
    point = sums.sum() / counts.sum()
    low, high = noise.bootstrap_ci(sums, counts, seed=7)
    assert low < point < high
    again = noise.bootstrap_ci(sums, counts, seed=7)
    assert (again[0], again[1]) == (low, high)
    other = noise.bootstrap_ci(sums, counts, seed=8)
    assert (other[0], other[1]) != (low, high)


def test_interval_widths_follow_level_and_sample_size(per_sequence):
    sums, counts = per_sequence
    low90, high90 = noise.bootstrap_ci(sums, counts, level=0.90)
    low99, high99 = noise.bootstrap_ci(sums, counts, level=0.99)
    assert low99 < low90 and high99 > high90
    # four times the sequences (same per-sequence values): about half the width
    low1, high1 = noise.bootstrap_ci(sums, counts)
    low4, high4 = noise.bootstrap_ci(np.tile(sums, 4), np.tile(counts, 4))
    assert (high4 - low4) < 0.7 * (high1 - low1)


def test_identical_sequences_have_no_noise():
    low, high = noise.bootstrap_ci(np.full(10, 2.0), np.full(10, 4.0))
    assert low == pytest.approx(0.5) and high == pytest.approx(0.5)


def test_vector_statistics_share_resamples(per_sequence):
    sums, counts = per_sequence
    both = np.stack([sums, 2 * sums], axis=1)  # [seq 2]
    low, high = noise.bootstrap_ci(both, counts)
    assert low.shape == (2,) and low[1] == pytest.approx(2 * low[0]) and high[1] == pytest.approx(2 * high[0])
    mean_low, mean_high = noise.bootstrap_ci(sums)  # no counts: the mean over sequences
    assert mean_low < sums.mean() < mean_high


@pytest.mark.parametrize(("level", "n_boot"), [(0.0, 100), (1.0, 100), (95, 100), (0.95, 0), (0.95, 1.5), (True, 10)])
def test_bad_interval_arguments(level, n_boot):
    with pytest.raises(ValueError, match="level|n_boot"):
        noise.bootstrap_ci(np.ones(4), level=level, n_boot=n_boot)


def test_halves_are_disjoint_and_cover_every_sequence():
    split = noise.split_sequences(11)
    assert split.held_out
    assert sorted([*split.discover, *split.evaluate]) == list(range(11))
    assert abs(len(split.discover) - len(split.evaluate)) <= 1


def test_halves_split_each_group():
    groups = ["en"] * 6 + ["zh"] * 4 + ["code"] * 2  # sorted by group: a plain first/second half would not do
    split = noise.split_sequences(len(groups), groups=groups)
    for g in set(groups):
        members = [i for i, x in enumerate(groups) if x == g]
        assert len(set(members) & set(split.discover)) == len(set(members) & set(split.evaluate))


def test_no_split_and_explicit_split():
    same = noise.split_sequences(5, None)
    assert not same.held_out and list(same.discover) == list(same.evaluate) == list(range(5))
    explicit = noise.split_sequences(5, ([0, 1], [2, 4]))
    assert explicit.held_out and list(explicit.evaluate) == [2, 4]
    for bad in ("thirds", ([0], [9]), ([], [1]), 3):
        with pytest.raises(ValueError, match="split"):
            noise.split_sequences(5, bad)
    with pytest.raises(ValueError, match="at least 2"):
        noise.split_sequences(1)


def test_control_draws_avoid_the_picked_experts():
    draws = noise.control_draws(16, [3, 11], draws=5, seed=1)
    assert len(draws) == 5
    for d in draws:
        assert len(d) == 2 and len(set(d)) == 2 and not set(d) & {3, 11}
    assert draws == noise.control_draws(16, [3, 11], draws=5, seed=1)
    assert noise.control_draws(16, [3, 11], draws=0) == []
    with pytest.raises(ValueError, match="control"):
        noise.control_draws(4, [0, 1, 2], draws=1)


def test_fit_through_origin_reveals_an_under_estimate():
    rng = np.random.default_rng(0)
    x = rng.normal(size=50)
    fit = noise.fit_through_origin(x, 0.5 * x + rng.normal(scale=0.01, size=50))
    assert fit["r"] > 0.99 and fit["slope"] == pytest.approx(0.5, abs=0.01) and fit["r2"] > 0.99
    exact = noise.fit_through_origin(x, x)
    assert exact["slope"] == pytest.approx(1.0) and exact["r2"] == pytest.approx(1.0)
    assert exact["r2_identity"] == pytest.approx(1.0) and fit["r2_identity"] < 0.5
    with pytest.raises(ValueError, match="at least 2"):
        noise.fit_through_origin([1.0], [np.nan])
