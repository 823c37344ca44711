"""The greedy knapsack allocation: the budget is met in the given cost (predicted latency, MACs), tighter budgets
keep fewer channels, the channels with the least importance per unit of cost go first, round_to is respected.
"""
import dataclasses

import numpy as np
import pytest
import torch

from agents.knapsack import knapsack_keep, macs_cost
from pruning_env.costs.latency import LatencyModel, LatencySetting
from pruning_env.pruning import Pruner
from tiny import TinyNet


def _pruner(round_to: int = 1, seed: int = 0) -> Pruner:
    torch.manual_seed(seed)
    pruner = Pruner(TinyNet().eval(), torch.randn(1, 3, 16, 16), round_to=round_to)
    pruner.compute_importance(criterion="random", seed=seed)
    return pruner


def _linear_cost(per_channel: np.ndarray):
    """A cost whose saving per removed channel of group g is exactly per_channel[g]."""
    return lambda keep: np.atleast_2d(keep) @ per_channel + 1.0


@pytest.fixture(scope="module")
def latency_model():
    """TinyNet's latency model with its measured structure (ops, axes, grids) and deterministic table values that
    grow with the widths (a measured table of so small a net is mostly overhead and noise)."""
    pruner = _pruner()
    measured = LatencyModel.build(pruner, LatencySetting(), cache=False, grid=(0.25, 0.5, 0.75, 1.0), rounds=1,
                                  calibration=(1.0, 0.5), calibration_random=1, calibration_rounds=1, progress=False)
    tables = [dataclasses.replace(t, table=1e-6 * (1.0 + np.add.outer(t.grid_a, 0.5 * t.grid_b)
                                                   + np.multiply.outer(t.grid_a, t.grid_b) / 16))
              for t in measured.tables]
    return LatencyModel(measured.setting, measured.full_widths, tables, 1.0, 1e-5, measured.meta)


def test_budget_is_met_in_predicted_latency(latency_model):
    pruner = _pruner()
    full = latency_model.original
    for fraction in (0.9, 0.7, 0.5):
        result = knapsack_keep(pruner, latency_model.predict, fraction * full)
        assert result.met and result.cost <= fraction * full
        assert result.cost == pytest.approx(latency_model.predict(result.keep))
        assert np.all(result.keep >= 1) and np.all(result.keep <= pruner.num_channels)
        pruner.plan(keep=result.keep)  # a valid plan


def test_tighter_budgets_never_keep_more():
    pruner = _pruner()
    for cost in (macs_cost(pruner), _linear_cost(np.array([3.0, 1.0, 0.5]))):
        full = float(cost(pruner.num_channels[None])[0])
        previous = pruner.num_channels
        for fraction in (0.95, 0.8, 0.6, 0.4, 0.25):
            keep = knapsack_keep(pruner, cost, fraction * full).keep
            assert np.all(keep <= previous), (fraction, keep, previous)
            previous = keep


def test_least_importance_per_unit_of_cost_goes_first():
    pruner = _pruner()
    widths = pruner.num_channels
    scores = [np.full(int(w), 10.0) for w in widths]
    scores[1] = np.linspace(0.01, 0.2, int(widths[1]))  # group 1 is cheap to lose ...
    per_channel = np.array([1.0, 1.0, 1.0])
    result = knapsack_keep(pruner, _linear_cost(per_channel), 1.0 + per_channel @ widths - 5, importance=scores,
                           normalize="none")
    assert result.steps == [1] * 5 and result.keep[1] == widths[1] - 5
    # ... unless removing its channels saves little: importance per unit of cost decides
    per_channel = np.array([1.0, 1e-4, 1.0])
    result = knapsack_keep(pruner, _linear_cost(per_channel), 1.0 + per_channel @ widths - 3, importance=scores,
                           normalize="none")
    assert 1 not in result.steps[:3]
    # the channels a plan then removes are the least important ones of each group
    plan = pruner.plan(keep=knapsack_keep(pruner, macs_cost(pruner), 0.5 * pruner.plan_cost(
        keep=widths).macs).keep)
    for imp, kept in zip(pruner.importance, plan.kept):
        dropped = np.setdiff1d(np.arange(len(imp)), kept)
        if len(dropped):
            assert imp[dropped].max() <= imp[kept].min()


def test_round_to_is_respected():
    pruner = _pruner(round_to=4)
    full = pruner.plan_cost(keep=pruner.num_channels).macs
    result = knapsack_keep(pruner, macs_cost(pruner), 0.4 * full)
    assert result.met and np.all(result.keep % 4 == 0)
    assert pruner.plan_cost(keep=result.keep).macs <= 0.4 * full
    # an explicit step overrides the pruner's; min_channels is a floor in whole steps
    result = knapsack_keep(pruner, macs_cost(pruner), 0.0, round_to=2, min_channels=3)
    assert not result.met and np.all(result.keep == 4)


def test_unreachable_budget_stops_at_the_floor_and_says_so():
    pruner = _pruner()
    result = knapsack_keep(pruner, macs_cost(pruner), 1.0)
    assert not result.met and np.all(result.keep == 1)
    assert result.cost == pytest.approx(pruner.plan_cost(keep=result.keep).macs)


def test_bad_inputs_are_refused():
    pruner = Pruner(TinyNet().eval(), torch.randn(1, 3, 16, 16))
    with pytest.raises(RuntimeError, match="no importance"):
        knapsack_keep(pruner, macs_cost(pruner), 1e6)
    pruner.compute_importance(criterion="l1")
    with pytest.raises(ValueError, match="one score array per group"):
        knapsack_keep(pruner, macs_cost(pruner), 1e6, importance=pruner.importance[:-1])
    with pytest.raises(ValueError, match="normalize"):
        knapsack_keep(pruner, macs_cost(pruner), 1e6, normalize="max")
    with pytest.raises(ValueError, match="keep must give"):
        knapsack_keep(pruner, macs_cost(pruner), 1e6, keep=pruner.num_channels + 1)


def test_batched_predictions_agree_exactly_with_per_row_ones(latency_model):
    """The knapsack costs a move's candidates in one call: a matrix of kept vectors predicts, row for row, exactly
    (not approximately) what each row predicts alone, so batching changes no decision."""
    widths = latency_model.full_widths
    rng = np.random.default_rng(0)
    rows = np.vstack([widths, np.ones_like(widths), rng.integers(1, widths + 1, size=(40, len(widths)))])
    batched = latency_model.predict(rows)
    assert batched.shape == (len(rows),)
    np.testing.assert_array_equal(batched, [latency_model.predict(r) for r in rows])
    # and the knapsack's choices are the same with a per-row cost as with the batched one
    pruner = _pruner()
    per_row = knapsack_keep(pruner, lambda k: np.array([latency_model.predict(r) for r in np.atleast_2d(k)]),
                            0.6 * latency_model.original)
    batch = knapsack_keep(pruner, latency_model.predict, 0.6 * latency_model.original)
    assert per_row.steps == batch.steps and per_row.cost == batch.cost
    np.testing.assert_array_equal(per_row.keep, batch.keep)
