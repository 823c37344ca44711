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


def test_multi_fidelity_scores_refine_the_best_of_each_batch_and_keep_the_better_score():
    cheap = np.array([0.1, 0.5, 0.3, 0.5, 0.2, 0.9, 0.4, 0.0])
    refined = np.array([0.9, 0.4, 0.8, 0.7, 0.0, 0.95, 0.5, 1.0])
    scores, mask = rf.multi_fidelity_scores(cheap, refined, batch=4, top=2)
    # batch [0..3]: best cheap are 1 and 3 (0.5 tie: both); batch [4..7]: 5 and 6
    assert mask.tolist() == [False, True, False, True, False, True, True, False]
    assert scores.tolist() == [0.1, 0.5, 0.3, 0.7, 0.2, 0.95, 0.5, 0.0]  # a lower refined score keeps the cheap one
    ties = rf.multi_fidelity_scores(np.array([0.3, 0.3, 0.3]), np.zeros(3), batch=3, top=1)[1]
    assert ties.tolist() == [True, False, False]  # ties: the earlier, as CandidateScorer.candidates


def test_pick_regret_is_zero_for_the_truth_and_positive_for_its_reverse():
    truth = np.linspace(0.1, 0.6, 30)
    assert rf.pick_regret(truth, truth, batch=10, n=200, seed=0)["regret"] == 0.0
    worst = rf.pick_regret(-truth, truth, batch=10, n=200, seed=0)
    assert worst["regret"] > 10  # points: the worst of 10 out of a 50-point range
    # a refinement that knows the truth rescues a cheap score that is blind (constant): it picks among the top 2
    # of the cheap order, which for a constant cheap score are the batch's first two
    blind = rf.pick_regret(np.zeros(30), truth, batch=10, n=200, seed=0, refine=(truth, 2))
    assert 0 < blind["regret"] < worst["regret"]


def test_estimate_counts_come_from_the_registry_entry():
    assert rf.estimate_counts("vanilla", {}, 250) == {"val_images": 250, "bn_images": 0, "sgd_batches": 0}
    assert rf.estimate_counts("adaptive_bn", {"n_images": 1024}, 1000) == {"val_images": 1000, "bn_images": 1024,
                                                                          "sgd_batches": 0}
    assert rf.estimate_counts("short_kd", {"n_batches": 7}, 250)["sgd_batches"] == 7
    assert rf.estimate_counts("multi_fidelity", {"base": "adaptive_bn", "n_batches": 50}, 250) == {
        "val_images": 250, "bn_images": 256, "sgd_batches": 50}
    assert rf.estimate_counts("multi_fidelity", {}, 250)["sgd_batches"] == 10  # kd_refined's default
    for label, (name, options, _) in rf.ESTIMATORS.items():  # every benchmark label is a registry entry
        assert name in rf.REWARD_ESTIMATORS
        rf.make_estimator(name, **options)


def test_unit_cache_resumes_refuses_other_settings_and_recomputes_a_changed_estimator(tmp_path):
    settings = {"checkpoint": "x.pt", "finetune_epochs": 15}
    units = rf.Units(tmp_path / "c", settings)
    spec = rf._spec("adaptive_bn")
    assert units.read(0.875, 3, "est_adaptive_bn", spec) is None
    units.write(0.875, 3, "est_adaptive_bn", {"spec": spec, "value": 0.4})
    units.write(0.875, 3, "ft1", {"test_top1": 0.5})
    again = rf.Units(tmp_path / "c", dict(settings))  # a resumed run reads what the first one wrote
    assert again.read(0.875, 3, "est_adaptive_bn", spec)["value"] == 0.4
    assert again.read(0.875, 3, "ft1")["test_top1"] == 0.5
    assert (tmp_path / "c" / "t0.875" / "c003" / "ft1.json").is_file()
    assert again.read(0.875, 3, "est_adaptive_bn", rf._spec("adaptive_bn_all")) is None  # other options: redo
    with pytest.raises(SystemExit, match="other settings"):
        rf.Units(tmp_path / "c", {**settings, "finetune_epochs": 5})


def test_summary_reads_the_units_and_reports_share_of_ceiling_and_cost(tmp_path):
    rng = np.random.default_rng(0)
    units = rf.Units(tmp_path / "c", {"s": 1})
    labels = ["vanilla", "adaptive_bn", "kd_refined10"]
    latent = rng.normal(size=12)
    for i in range(12):
        for s in range(2):
            units.write(0.5, i, f"ft{s}", {"test_top1": 0.5 + 0.05 * latent[i] + 0.01 * rng.normal(),
                                           "seconds": 10.0})
        for label, value, seconds in (("vanilla", rng.normal(), 1.0), ("adaptive_bn", latent[i], 2.0),
                                      ("kd_refined10", latent[i] + 0.1 * rng.normal(), 20.0)):
            name, options, n = rf.ESTIMATORS[label]
            units.write(0.5, i, f"est_{label}", {"spec": rf._spec(label), "value": value, "seconds": seconds,
                                                 **rf.estimate_counts(name, options, n)})
    units.write(0.5, 12, "ft0", {"test_top1": 0.5, "seconds": 10.0})  # one seed only: not a finished candidate
    s = rf.summarize(units, [0.5], 13, 2, labels, n_boot=100, seed=0)["0.5"]
    assert s["n"] == 12 and s["n_complete"] == 12
    assert s["ceiling"] > 0.8
    est = s["estimators"]
    assert est["adaptive_bn"]["share"] > 0.9 > abs(est["vanilla"]["share"])
    assert est["adaptive_bn"]["cost_ratio"] == pytest.approx(2.0)
    mf = est["multi_fidelity10"]  # cheap adaptive_bn for all, 2 of 10 refined: 2 + 0.2 * 20 vanilla evaluations
    assert mf["cost_ratio"] == pytest.approx(6.0) and mf["sgd_batches"] == pytest.approx(2.0)


def test_restore_fills_a_lost_cache_and_refuses_another_checkpoint(tmp_path):
    import json
    settings = {"checkpoint": "c.pt", "seed": 0, "checkpoint_weights": "abc"}
    est = {"spec": rf._spec("vanilla"), "value": 0.5, "seconds": 0.1, "val_images": 250, "bn_images": 0,
           "sgd_batches": 0}
    rows = [{"i": 3, "ft": [{"seed": 1, "test_top1": 0.4}, {"seed": 2, "test_top1": 0.45}], "est": {"vanilla": est}}]
    saved = tmp_path / "reward_fidelity_x.json"
    saved.write_text(json.dumps({"settings": {**settings, "bootstrap": 10}, "candidates": {"0.5": rows}}))

    units = rf.Units(tmp_path / "cache", settings)
    assert rf.restore_units(units, saved, settings) == 3
    assert units.read(0.5, 3, "ft1")["test_top1"] == 0.45
    assert units.read(0.5, 3, "est_vanilla", rf._spec("vanilla"))["value"] == 0.5
    assert [r["i"] for r in rf._collect(units, 0.5, 5, 2, ["vanilla"])] == [3]
    assert rf.restore_units(units, saved, settings) == 0  # existing units are kept, nothing rewritten

    other = {**settings, "checkpoint_weights": "def"}
    with pytest.raises(SystemExit, match="checkpoint_weights"):
        rf.restore_units(rf.Units(tmp_path / "other", other), saved, other)
    with pytest.raises(SystemExit, match="no such file"):
        rf.restore_units(units, tmp_path / "missing.json", settings)
