"""Unit tests of the pure budget arithmetic (spec §2.1 / §2.4), on hand-computed numbers.

No torch and no model: these run in milliseconds.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pruning_env.envs.budget import (bisect_increasing, channel_sparsity, charged, cumulative_goal,
                                     distribution_to_counts, filter_num, normalize_distribution,
                                     step_channel_budget)


def test_counts_exact_split():
    assert distribution_to_counts([0.5, 0.5], [1, 1], 10).tolist() == [5, 5]


def test_counts_search_upwards_finds_exact_budget():
    # p = [0.25, 0.5]; M=9 rounds to [2, 4] (4.5 rounds half to even) -> charge 2*2+4 = 8;
    # M'=10 gives [2, 5] -> charge 9 == M
    counts = distribution_to_counts([0.5, 0.5], [2, 1], 9)
    assert counts.tolist() == [2, 5]
    assert charged(counts, [2, 1]) == 9


def test_counts_search_downwards_finds_exact_budget():
    # p = [0.5, 0.25]; M=7 -> [4, 2] charge 8 > 7; M'=6 -> [3, 2] charge 7
    assert distribution_to_counts([0.5, 0.5], [1, 2], 7).tolist() == [3, 2]


def test_counts_keeps_closest_and_first_on_ties():
    # [1/3]*3, M=10: M -> 9 (err 1), M'=11 -> 12 (err 2, sign changed): keep M
    assert distribution_to_counts([1 / 3] * 3, [1, 1, 1], 10).tolist() == [3, 3, 3]
    # [0.3, 0.3, 0.4], M=5: M -> 6 (err -1), M'=4 -> 4 (err +1, a tie): the first (M) is kept
    assert distribution_to_counts([0.3, 0.3, 0.4], [1, 1, 1], 5).tolist() == [2, 2, 2]


def test_counts_walks_several_steps_when_distribution_sums_below_one():
    # authors' adjust_PD may leave sum < 1: M'=4,5 charge 2, M'=6 charge 4 == M
    assert distribution_to_counts([0.25, 0.25], [1, 1], 4).tolist() == [2, 2]


def test_counts_floor_and_edge_cases():
    assert distribution_to_counts([0.5, 0.5], [1, 1], 10, max_remove=[2, 9]).tolist() == [2, 5]
    assert distribution_to_counts([0.5, 0.5], [1, 1], 10, max_remove=[-1, 0]).tolist() == [0, 0]
    assert distribution_to_counts([0.0, 0.0], [1, 1], 10).tolist() == [0, 0]
    assert distribution_to_counts([0.5, 0.5], [1, 1], 0).tolist() == [0, 0]
    with pytest.raises(ValueError, match="layer_counts"):
        distribution_to_counts([0.5, 0.5], [1], 4)
    with pytest.raises(ValueError, match="non-negative"):
        distribution_to_counts([np.nan, 0.5], [1, 1], 4)
    with pytest.raises(ValueError, match="budget"):
        distribution_to_counts([0.5, 0.5], [1, 1], -3)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.0, 10.0), min_size=1, max_size=8), st.integers(0, 400), st.data())
def test_counts_never_worse_than_plain_rounding(weights, budget, data):
    weights = np.asarray(weights)
    if weights.sum() <= 0:
        weights = np.ones_like(weights)
    dist = weights / weights.sum()
    k = np.asarray(data.draw(st.lists(st.integers(1, 4), min_size=len(dist), max_size=len(dist))))
    counts = distribution_to_counts(dist, k, budget)
    plain = np.rint(dist / k * budget).astype(np.int64)
    assert abs(charged(counts, k) - budget) <= abs(charged(plain, k) - budget)
    assert np.all(counts >= 0)


def test_normalize_distribution():
    np.testing.assert_allclose(normalize_distribution([1, 3]), [0.25, 0.75])
    np.testing.assert_allclose(normalize_distribution([-1, 2]), [0.0, 1.0])
    np.testing.assert_allclose(normalize_distribution([0, 0, 0], eligible=[True, False, True]), [0.5, 0, 0.5])
    np.testing.assert_allclose(normalize_distribution([5, 1], eligible=[False, True]), [0.0, 1.0])
    np.testing.assert_allclose(normalize_distribution([1, 1], eligible=[False, False]), [0.0, 0.0])


def test_channel_sparsity_counts_every_member_layer():
    # groups: 10 channels x 1 layer, 20 channels x 3 layers (a residual group) -> filter_num 70
    assert filter_num([10, 20], [1, 3]) == 70
    assert channel_sparsity([10, 20], [10, 20], [1, 3]) == 0.0
    assert channel_sparsity([5, 20], [10, 20], [1, 3]) == pytest.approx(5 / 70)
    assert channel_sparsity([10, 10], [10, 20], [1, 3]) == pytest.approx(30 / 70)
    assert step_channel_budget([10, 20], [1, 3], target=0.5, n_steps=4) == int(70 * 0.5 / 4)


def test_cumulative_goal():
    assert cumulative_goal(0.5, 1, 4) == pytest.approx(0.125)
    assert cumulative_goal(0.5, 4, 4) == pytest.approx(0.5)
    assert cumulative_goal(0.5, 9, 4) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        cumulative_goal(0.5, 1, 0)


def test_bisect_increasing_real_and_integer():
    x, v = bisect_increasing(lambda s: min(1.0, s / 2), 0.3, 0.0, 1.0)
    assert x == pytest.approx(0.6, abs=1e-6) and v == pytest.approx(0.3, abs=1e-6)
    # step function: value = floor(m / 3) / 10; goal 0.25 lies between 0.2 (m=6..8) and 0.3 (m=9): tie -> lower
    m, v = bisect_increasing(lambda m: (m // 3) / 10, 0.25, 0, 30, integer=True)
    assert v == pytest.approx(0.2) and m == 8
    m, v = bisect_increasing(lambda m: (m // 3) / 10, 0.27, 0, 30, integer=True)
    assert v == pytest.approx(0.3) and m == 9
    # goal beyond reach -> the upper end; goal below the start -> the lower end
    assert bisect_increasing(lambda s: s, 5.0, 0.0, 1.0) == (1.0, 1.0)
    assert bisect_increasing(lambda s: s + 1, 0.5, 0.0, 1.0) == (0.0, 1.0)


def test_bisect_tolerance_bounds_the_number_of_calls():
    calls = []

    def fn(s):
        calls.append(s)
        return s

    x, _ = bisect_increasing(fn, 0.3, 0.0, 1.0, iters=60, tol=1e-3)
    assert abs(x - 0.3) <= 1e-3
    assert len(calls) <= 2 + 11  # ends, then ceil(log2(1 / 1e-3)) halvings
