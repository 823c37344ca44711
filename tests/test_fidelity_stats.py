"""The pure statistics of benchmarks/reward_fidelity.py: test-retest, Spearman-Brown, share of the ceiling."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

_spec = importlib.util.spec_from_file_location(
    "reward_fidelity", Path(__file__).resolve().parents[1] / "benchmarks" / "reward_fidelity.py")
rf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rf)


def test_spearman_brown_known_values():
    assert rf.spearman_brown(1.0) == 1.0
    assert rf.spearman_brown(0.0) == 0.0
    assert rf.spearman_brown(0.5) == pytest.approx(2 / 3)
    assert rf.spearman_brown(0.5, k=4) == pytest.approx(0.8)
    assert rf.spearman_brown(0.3, k=1) == pytest.approx(0.3)
    assert np.isnan(rf.spearman_brown(-1.0))
    with pytest.raises(ValueError, match="reliability"):
        rf.spearman_brown(1.5)
    with pytest.raises(ValueError, match="positive"):
        rf.spearman_brown(0.5, k=0)


def test_perfectly_reliable_truth_has_ceiling_one():
    truth = np.arange(20, dtype=float)
    est = truth ** 3  # monotone: a perfect ranker
    f = rf.fidelity_vs_ceiling(est, truth, truth + 0.5)
    assert f["retest"] == pytest.approx(1.0)
    assert f["reliability"] == pytest.approx(1.0)
    assert f["ceiling"] == pytest.approx(1.0)
    assert f["rho"] == pytest.approx(1.0) and f["share"] == pytest.approx(1.0)
    assert f["distinct"] == 20


def test_noisy_truth_lowers_the_ceiling_and_a_true_ranker_reaches_it():
    rng = np.random.default_rng(0)
    latent = rng.normal(size=4000)
    a, b = latent + rng.normal(size=4000), latent + rng.normal(size=4000)  # reliability 0.5 per seed
    f = rf.fidelity_vs_ceiling(latent, a, b)
    assert 0.4 < f["retest"] < 0.55
    assert f["reliability"] == pytest.approx(2 * f["retest"] / (1 + f["retest"]))
    assert f["ceiling"] < 0.9
    assert f["share"] == pytest.approx(1.0, abs=0.05)  # the latent truth is as good as any estimator can be


def test_independent_noise_has_share_near_zero_and_bootstrap_spread():
    rng = np.random.default_rng(1)
    latent = rng.normal(size=300)
    a, b = latent + 0.3 * rng.normal(size=300), latent + 0.3 * rng.normal(size=300)
    noise = rng.normal(size=300)
    out = rf.bootstrap_fidelity(noise, a, b, n=300, seed=0)
    assert abs(out["share"]) < 0.15
    assert 0 < out["share_std"] < 0.2
    lo, hi = out["share_ci95"]
    assert lo < out["share"] < hi
    again = rf.bootstrap_fidelity(noise, a, b, n=300, seed=0)
    assert again == out  # fixed seed: repeatable


def test_ties_are_counted_and_lengths_checked():
    f = rf.fidelity_vs_ceiling([0.1, 0.1, 0.2, 0.2, 0.3], [1, 2, 3, 4, 5], [1, 3, 2, 4, 5])
    assert f["distinct"] == 3
    with pytest.raises(ValueError, match="one value per candidate"):
        rf.fidelity_vs_ceiling([1, 2], [1, 2, 3], [1, 2, 3])
