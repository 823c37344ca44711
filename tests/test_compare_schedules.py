"""benchmarks/compare_schedules.py: two compare_agents reports (one per schedule) made by hand, compared per agent in
pooled seed std; reports that differ in more than the schedule are refused by name."""
import json

import pytest

import benchmarks.compare_schedules as cs
from benchmarks.common import mean_std

BASE = {"checkpoints/base.pt": "ab" * 32}


def _summary(per_seed, rl=False):
    means = [sum(v) / len(v) for v in per_seed]
    return {"rl": rl, "test": mean_std(means), "per_model": {str(i): v for i, v in enumerate(per_seed)},
            "macs_kept": mean_std([0.125] * len(per_seed)), "n_evaluations": mean_std([151.0] * len(per_seed))}


def _report(tmp_path, schedule, agents, name=None, **meta):
    it = schedule != "oneshot"
    m = {"model": "tiny", "schedule": name or f"{schedule}_t", "schedule_kind": "iterative" if it else "oneshot",
         "n_steps": 3 if it else 1, "recovery_epochs": 2 if it else 0, "final_epochs": 11 if it else 15,
         "finetune_epochs": 15, "base_weights": BASE, "reward_estimator": "kd_refined", "search_seeds": 3,
         "ft_seeds": 2, "set": [], "budget": 153 if it else 151, **meta}
    data = {"meta": m, "targets": {"0.875": {"summary": agents}}}
    path = tmp_path / f"compare_curves_tiny_{schedule}_t.json"
    path.write_text(json.dumps(data))
    return path


ONESHOT = {"uniform": _summary([[0.50, 0.52], [0.48, 0.50], [0.55, 0.57]]),
           "ppo": _summary([[0.45, 0.47], [0.40, 0.42], [0.50, 0.48]], rl=True)}
ITERATIVE = {"uniform": _summary([[0.60, 0.62], [0.61, 0.59], [0.63, 0.61]]),
             "ppo": _summary([[0.46, 0.46], [0.41, 0.43], [0.49, 0.49]], rl=True),
             "random_search": _summary([[0.3, 0.3], [0.3, 0.32], [0.31, 0.33]])}


def test_schedules_are_compared_per_agent_in_pooled_std(tmp_path):
    a = _report(tmp_path, "oneshot", ONESHOT)
    b = _report(tmp_path, "iterative3_r2", ITERATIVE)
    out = tmp_path / "out"
    assert cs.main([str(a), str(b), "--results", str(out)]) == 0
    data = json.loads((out / "compare_schedules_tiny_t.json").read_text())
    block = data["targets"]["0.875"]
    uni = block["agents"]["uniform"]
    v = uni["vs_first"]["iterative3_r2_t"]
    assert v["diff"] == pytest.approx(0.61 - 0.52, abs=1e-9)
    assert v["verdict"].startswith("higher")
    assert uni["schedules"]["oneshot_t"]["seed_means"] == pytest.approx([0.51, 0.49, 0.56])
    # ppo moves less than its spread: level
    assert block["agents"]["ppo"]["vs_first"]["iterative3_r2_t"]["verdict"].startswith("level")
    # an agent run under one schedule only has no row, and is named
    assert "random_search" not in block["agents"] and block["only_in"] == {"iterative3_r2_t": ["random_search"]}
    assert block["best"] == {"oneshot_t": "uniform", "iterative3_r2_t": "uniform"}
    md = (out / "compare_schedules_tiny_t.md").read_text()
    assert "Best agent: `uniform` under iterative3_r2_t" in md and "3 pruning steps with 2 KD recovery" in md
    assert "budgets oneshot_t 151, iterative3_r2_t 153" in md
    assert (out / "compare_schedules_tiny_t.png").stat().st_size > 0


@pytest.mark.parametrize("key, value, words", [
    ("base_weights", {"checkpoints/base.pt": "cd" * 32}, "base checkpoint"),
    ("finetune_epochs", 30, "training epochs"),
    ("reward_estimator", "adaptive_bn", "reward estimator"),
])
def test_reports_that_differ_in_more_than_the_schedule_are_refused(tmp_path, key, value, words):
    a = _report(tmp_path, "oneshot", ONESHOT)
    b = _report(tmp_path, "iterative3_r2", ITERATIVE, **{key: value})
    with pytest.raises(SystemExit, match=words):
        cs.main([str(a), str(b), "--results", str(tmp_path / "out")])


def test_two_reports_of_one_schedule_or_a_missing_one_are_refused(tmp_path):
    a = _report(tmp_path, "oneshot", ONESHOT)
    with pytest.raises(SystemExit, match="one schedule"):
        cs.main([str(a), str(a), "--results", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="no report at"):
        cs.main([str(a), str(tmp_path / "missing.json"), "--results", str(tmp_path / "out")])


def test_config_variants_of_one_schedule_are_compared_with_vary_set(tmp_path):
    # --vary set: one schedule, two --set variants (a per-group bound against none), compared as schedules are
    a = _report(tmp_path, "oneshot", ONESHOT)
    (tmp_path / "b").mkdir()
    b = _report(tmp_path / "b", "oneshot", ITERATIVE, name="oneshot_t-bound",
                set=["env.distribution_max_sparsity=0.8"])
    out = tmp_path / "out"
    assert cs.main(["--vary", "set", str(a), str(b), "--results", str(out)]) == 0
    data = json.loads((out / "compare_variants_tiny_oneshot_t-bound.json").read_text())
    v = data["targets"]["0.875"]["agents"]["uniform"]["vs_first"]["oneshot_t-bound"]
    assert v["diff"] == pytest.approx(0.61 - 0.52, abs=1e-9) and v["verdict"].startswith("higher")
    assert data["meta"]["sets"] == {"oneshot_t": [], "oneshot_t-bound": ["env.distribution_max_sparsity=0.8"]}
    md = (out / "compare_variants_tiny_oneshot_t-bound.md").read_text()
    assert md.startswith("# Config variants at equal training: tiny")
    assert "`oneshot_t-bound`: 1 pruning step" in md and "`env.distribution_max_sparsity=0.8`" in md
    # without --vary set the differing overrides are refused, as before
    with pytest.raises(SystemExit, match="--set overrides"):
        cs.main([str(a), str(b), "--results", str(out)])
    # variants must share the schedule, and differ in their overrides
    c = _report(tmp_path / "b", "iterative3_r2", ITERATIVE, set=["env.distribution_max_sparsity=0.8"])
    with pytest.raises(SystemExit, match="only the set may differ"):
        cs.main(["--vary", "set", str(a), str(c), "--results", str(out)])
    d = _report(tmp_path / "b", "oneshot", ITERATIVE, name="oneshot_t-same")
    with pytest.raises(SystemExit, match="two reports of one set"):
        cs.main(["--vary", "set", str(a), str(d), "--results", str(out)])
