"""Unit tests of the pure budget arithmetic (spec §2.1 / §2.4), on hand-computed numbers.

No torch and no model: these run in milliseconds.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pruning_env.envs.budget import (bisect_increasing, channel_floor, channel_sparsity, charged, cumulative_goal,
                                     distribution_to_counts, exact_keep, filter_num, keep_for_action,
                                     normalize_distribution, refuse_unreachable_target, step_channel_budget)


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


# ---- keep_for_action: the env's action -> kept channels mapping, on a hand-made 3-group "model" whose cost is
# linear in the kept channels (group g costs WEIGHT[g] per kept channel)
CURRENT = np.array([12, 16, 20])
LAYERS = np.array([1, 2, 1])
WEIGHT = np.array([3.0, 1.0, 0.5])


def keep_counts(sparsity, min_channels=1):
    """The Pruner's rule: removed = round(s * width), kept at least ``min_channels``."""
    s = np.asarray(sparsity, dtype=np.float64)
    return np.maximum(CURRENT - np.floor(s * CURRENT + 0.5).astype(np.int64), min_channels)


def linear_reduction(keep):
    return 1.0 - float((WEIGHT * keep).sum() / (WEIGHT * CURRENT).sum())


def channel_reduction(keep):
    return channel_sparsity(keep, CURRENT, LAYERS)


def test_keep_for_action_without_budget_is_the_clipped_sparsity():
    step = keep_for_action([0.5, 2.0, -1.0], "sparsity", CURRENT, LAYERS, keep_counts, max_step_sparsity=0.9)
    assert step.keep.tolist() == [6, 2, 20] and step.budget == 1.0 and step.goal is None and step.reachable


@pytest.mark.parametrize("mode", ["sparsity", "distribution"])
@pytest.mark.parametrize("reduction", [linear_reduction, channel_reduction])
@pytest.mark.parametrize("action", [[0.2, 0.5, 0.9], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
def test_keep_for_action_meets_the_goal_within_one_channel(mode, reduction, action):
    goal = 0.4
    step = keep_for_action(action, mode, CURRENT, LAYERS, keep_counts, reduction=reduction, goal=goal,
                           max_step_sparsity=0.9)
    assert step.reachable and step.goal == goal and step.reached == pytest.approx(reduction(step.keep))
    assert np.all(step.keep >= 1) and np.all(step.keep <= CURRENT)
    # within the granularity of the metric: one channel of the costliest group (both sides of the goal)
    one_channel = max(np.max(WEIGHT) / (WEIGHT * CURRENT).sum(), LAYERS.max() / (LAYERS * CURRENT).sum())
    assert abs(step.reached - goal) <= 2 * one_channel


def test_keep_for_action_distribution_prunes_where_the_distribution_says():
    step = keep_for_action([0.0, 0.0, 1.0], "distribution", CURRENT, LAYERS, keep_counts, reduction=channel_reduction,
                           goal=0.1, max_step_sparsity=0.9)
    assert step.keep[:2].tolist() == CURRENT[:2].tolist() and step.keep[2] < CURRENT[2]


def test_keep_for_action_channel_budget_is_met_when_the_named_group_saturates():
    # the authors' fixed M puts 90% of the budget on group 2 (20 channels, floor 1): capped at 19 removed, a fixed
    # M misses a 50% channel goal; the mapping spreads the rest over the other groups instead
    step = keep_for_action([0.05, 0.05, 0.9], "distribution", CURRENT, LAYERS, keep_counts, reduction=channel_reduction,
                           goal=0.5, max_step_sparsity=0.9)
    assert step.reachable and step.keep[2] == 1
    assert abs(step.reached - 0.5) <= 2 * LAYERS.max() / (LAYERS * CURRENT).sum()


@pytest.mark.parametrize("mode", ["sparsity", "distribution"])
def test_keep_for_action_reports_an_unreachable_goal(mode):
    # with a floor of 10 channels per group at most 1 - 30/48 of the channels can go
    def floored(s):
        return keep_counts(s, min_channels=10)

    step = keep_for_action([0.3, 0.3, 0.3], mode, CURRENT, LAYERS, floored, reduction=channel_reduction, goal=0.6,
                           max_step_sparsity=0.95)
    assert not step.reachable and step.reached < 0.6
    assert step.keep.tolist() == [10, 10, 10]  # as far as it goes


@pytest.mark.parametrize("action", [[0.05, 0.05, 0.9], [0.0, 0.0, 1.0], [1 / 3] * 3])
def test_keep_for_action_distribution_bound_caps_every_group(action):
    # AMC's per-layer bound in distribution mode: no group loses more than 60 % of its channels in the step,
    # wherever the distribution puts the budget, and the goal is still met by the other groups
    step = keep_for_action(action, "distribution", CURRENT, LAYERS, keep_counts, reduction=channel_reduction,
                           goal=0.5, distribution_max_sparsity=0.6)
    assert step.reachable and np.all(step.keep >= keep_counts(np.full(3, 0.6)))
    assert abs(step.reached - 0.5) <= 2 * LAYERS.max() / (LAYERS * CURRENT).sum()
    # without the bound (the authors') the concentrated distributions cut the named group to its floor
    free = keep_for_action(action, "distribution", CURRENT, LAYERS, keep_counts, reduction=channel_reduction,
                           goal=0.5)
    if action[2] >= 0.9:
        assert free.keep[2] == 1 and step.keep[2] == 8


def test_keep_for_action_distribution_bound_reports_an_unreachable_goal():
    # removing at most 30 % of each group removes at most 30 % of the channels: a 50 % goal is out of reach
    step = keep_for_action([0.2, 0.3, 0.5], "distribution", CURRENT, LAYERS, keep_counts, reduction=channel_reduction,
                           goal=0.5, distribution_max_sparsity=0.3)
    assert not step.reachable and step.keep.tolist() == keep_counts(np.full(3, 0.3)).tolist()
    with pytest.raises(ValueError, match="distribution_max_sparsity must be in"):
        keep_for_action([0.2, 0.3, 0.5], "distribution", CURRENT, LAYERS, keep_counts, reduction=channel_reduction,
                        goal=0.5, distribution_max_sparsity=1.0)


def test_keep_for_action_rejects_inconsistent_arguments():
    with pytest.raises(ValueError, match="one per group"):
        keep_for_action([0.1, 0.2], "sparsity", CURRENT, LAYERS, keep_counts)
    with pytest.raises(ValueError, match="reduction"):
        keep_for_action([0.1, 0.2, 0.3], "sparsity", CURRENT, LAYERS, keep_counts, goal=0.3)
    with pytest.raises(ValueError, match="distribution mode always has a budget"):
        keep_for_action([0.1, 0.2, 0.3], "distribution", CURRENT, LAYERS, keep_counts)
    with pytest.raises(ValueError, match="action_mode"):
        keep_for_action([0.1, 0.2, 0.3], "scores", CURRENT, LAYERS, keep_counts)


@pytest.mark.parametrize("action", [[0.2, 0.5, 0.9], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
def test_keep_for_action_distribution_removes_whole_blocks_of_a_grouped_group(action):
    # group 1 is a grouped conv with 4 channels per conv group: it keeps a multiple of 4, and the goal is still
    # met within one block of the costliest group
    gran = np.array([1, 4, 1])
    step = keep_for_action(action, "distribution", CURRENT, LAYERS, keep_counts, reduction=linear_reduction,
                           goal=0.4, max_step_sparsity=0.9, granularity=gran)
    assert step.reachable and step.keep[1] % 4 == 0 and step.reached == pytest.approx(linear_reduction(step.keep))
    one_block = np.max(WEIGHT * gran) / (WEIGHT * CURRENT).sum()
    assert abs(step.reached - 0.4) <= 2 * one_block
    with pytest.raises(ValueError, match="granularity must have one entry per group"):
        keep_for_action(action, "distribution", CURRENT, LAYERS, keep_counts, reduction=linear_reduction, goal=0.4,
                        granularity=[1, 4])


# ---- the env's floor, reachability and exact-keep checks, on hand-made cost functions
def _floor_of(minimum):
    """A pruner-like ``keep_counts``: sparsity s keeps ``max(minimum, round((1 - s) * width))`` of widths 8, 4."""
    widths = np.array([8, 4])
    return lambda s: np.maximum(minimum, np.round((1.0 - np.asarray(s)) * widths)).astype(np.int64)


def test_channel_floor_is_the_full_sparsity_keep_capped_at_the_current_widths():
    assert channel_floor(_floor_of(np.array([2, 3])), [8, 4]).tolist() == [2, 3]
    assert channel_floor(_floor_of(np.array([2, 3])), [8, 2]).tolist() == [2, 2]  # already below its floor
    # a per-step bound: at most half of each group goes (never below the sparsity-1 floor)
    assert channel_floor(_floor_of(np.array([2, 3])), [8, 4], max_sparsity=0.5).tolist() == [4, 3]


def test_refuse_unreachable_target_names_the_most_the_floor_removes():
    removed = lambda keep: 1.0 - float(np.sum(keep)) / 12.0  # noqa: E731  (fraction of 12 channels removed)
    floor = np.array([2, 3])  # removes 7/12 = 0.5833
    refuse_unreachable_target(removed, floor, 0.58, 0.0, "channels", "min_channels=2")  # reachable: no error
    refuse_unreachable_target(removed, floor, 0.59, 0.01, "channels", "min_channels=2")  # within the tolerance
    with pytest.raises(ValueError, match=r"target=0.6 \(channels reduction\) is unreachable: with min_channels=2 "
                                         r"every group .* only 0.5833; lower target to at most 0.5833"):
        refuse_unreachable_target(removed, floor, 0.6, 0.01, "channels", "min_channels=2")


def test_exact_keep_returns_buildable_whole_counts_and_refuses_the_others():
    even = lambda k: 2 * np.ceil(np.asarray(k) / 2)  # noqa: E731  (a plan keeps whole blocks of 2)
    out = exact_keep([4.0, 2], [8, 4], even, "blocks of 2")
    assert out.dtype == np.int64 and out.tolist() == [4, 2]
    with pytest.raises(ValueError, match=r"probe: .*shape \(2,\)"):
        exact_keep([4, 2, 1], [8, 4], even, "blocks of 2", caller="probe")
    with pytest.raises(ValueError, match="whole channel counts in \\[1, current width\\]"):
        exact_keep([4, 5], [8, 4], even, "blocks of 2")
    with pytest.raises(ValueError, match="whole channel counts"):
        exact_keep([0, 2], [8, 4], even, "blocks of 2")
    with pytest.raises(ValueError, match=r"keep \[3, 2\] cannot be built as it is \(blocks of 2\): the plan keeps "
                                         r"\[4, 2\]"):
        exact_keep([3, 2], [8, 4], even, "blocks of 2")
