"""benchmarks/compare_agents.py: units on the run layer (search + fine-tune), resumable, equal budgets enforced, the
leaderboard and verdict per target. The end-to-end run is the untrained width-0.0625 VGG-11 on generated images with
two-batch fine-tunes."""
import json

import pytest
import yaml

import benchmarks.compare_agents as ca
from benchmarks.common import UNDECIDED
from tiny import SB3_SMALL, tiny_run

TINY = tiny_run(agent="uniform", env={"n_steps": 2},
                agents={"ppo": {**SB3_SMALL["ppo"], "policy_kwargs": {"net_arch": [8]}}})


def metrics(agent, used, budget=151, schedule=None):
    return {"budget": budget, "n_evaluations": used, "budget_schedule": schedule}


@pytest.mark.parametrize("agent, m, problem", [
    ("random_search", metrics("random_search", 151), None),
    ("ppo", metrics("ppo", 151), None),
    ("uniform", metrics("uniform", 1), None),  # no search: one evaluation per step whatever the budget
    ("random_search", metrics("random_search", 150), "used 150 of its 151 evaluations"),
    ("ppo", metrics("ppo", 149), "used 149 of its 151 evaluations"),
    ("rl_pruner_improved", metrics("rl_pruner_improved", 141, schedule="1 steps x 14 RL epochs"),
     "used 141 of its 151 evaluations"),
    ("uniform", metrics("uniform", 1, budget=90), "made with budget 90, not 151"),
    # a grid sized from the budget may end under it (cached duplicate probes are free), never over
    ("sensitivity", metrics("sensitivity", 143, schedule="9 ratios x 16 groups"), None),
    ("sensitivity", metrics("sensitivity", 152, schedule="9 ratios x 16 groups"), "used 152 of its 151"),
])
def test_unequal_budgets_are_refused(agent, m, problem):
    found = ca.budget_problem(agent, m, 151)
    assert (found is None) if problem is None else (problem in found)


def test_a_report_for_one_target_keeps_the_other_targets_of_the_same_comparison(tmp_path):
    meta = {"model": "m", "schedule": "oneshot", "budget": 151, "finetune_epochs": 15, "reward_estimator": "x"}
    path = tmp_path / "r.json"
    one = {"searches": {"uniform_s0": {}}, "finetunes": []}
    empty = {"searches": {}, "finetunes": [], "finetunes_other_lengths": {}}  # a target queued, nothing finished
    path.write_text(json.dumps({"meta": meta, "targets": {"0.875": {"carry": one}, "0.5": {"carry": one},
                                                          "0.75": {"carry": empty}}}))
    payload = {"meta": dict(meta), "targets": {"0.5": {"carry": 3}}}
    assert ca.keep_other_targets(payload, path) == ["0.875"]
    assert payload["targets"] == {"0.5": {"carry": 3}, "0.875": {"carry": one}}
    report = tmp_path / "report.json"  # a report's block: kept when it summarizes a finished unit
    report.write_text(json.dumps({"meta": meta, "targets": {"0.875": {"summary": {"uniform": {}}, "units": []},
                                                            "0.75": {"summary": {}, "units": []}}}))
    payload = {"meta": dict(meta), "targets": {}}
    assert ca.keep_other_targets(payload, report) == ["0.875"]
    other = {"meta": {**meta, "budget": 161}, "targets": {}}  # another comparison's file is not merged
    assert ca.keep_other_targets(other, path) == [] and other["targets"] == {}


def test_a_unit_searched_with_another_reward_estimator_is_refused():
    m = {**metrics("ppo", 151), "reward_estimator": "adaptive_bn"}
    assert "reward estimator 'adaptive_bn', not 'kd_refined'" in ca.budget_problem("ppo", m, 151, "kd_refined")
    assert ca.budget_problem("ppo", m, 151, "adaptive_bn") is None


def test_rl_agents_and_allocations():
    assert ca.is_rl("rl_pruner_improved") and ca.is_rl("ppo") and ca.is_rl("rl_pruner")
    assert not any(ca.is_rl(a) for a in ("uniform", "global_taylor", "random_search"))


def test_fine_tune_seeds_are_distinct_and_the_first_is_the_runs_own():
    seeds = [ca.ft_seed_value(s, f, 3) for s in range(3) for f in range(2)]
    assert sorted(seeds) == list(range(6))
    assert [ca.ft_seed_value(s, 0, 3) for s in range(3)] == [0, 1, 2]
    assert ca.target_name(0.875) == "t0875" and ca.target_name(0.5) == "t0500"


def test_the_queue_gives_every_search_seed_a_fine_tune_before_any_second_one():
    args = ca.build_parser().parse_args(["--agents", "uniform", "ppo", "--targets", "0.875", "0.5"])
    queue = ca.unit_queue(args)
    assert len(queue) == 2 * 3 * 2 * 2
    first_target = [q for q in queue if q[0] == 0.875]
    assert queue[:len(first_target)] == first_target  # the first target is finished first
    assert [q[2] for q in first_target] == [0] * 6 + [1] * 6


@pytest.mark.parametrize("argv, message", [
    (["--budget", "90"], "below the protocol's 150"),
    (["--targets", "1.2"], "FLOPs reductions in (0, 1)"),
    (["--search-seeds", "0"], "must be >= 1"),
    (["--set", "novalue"], "--set"),
    (["--tag", "Big Run"], "--tag must be lower-case"),
])
def test_bad_command_lines_exit_2(argv, message, capsys):
    assert ca.main(argv + ["--report-only"]) == 2
    assert message in capsys.readouterr().err


def test_a_tiny_comparison_runs_resumes_and_reports(tmp_path, forbid, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    argv = ["--config", str(cfg), "--agents", "uniform", "random_search", "--targets", "0.5", "--search-seeds", "2",
            "--ft-seeds", "2", "--finetune-epochs", "1", "--out-dir", str(tmp_path / "runs"), "--results",
            str(tmp_path / "results")]
    assert ca.main(argv) == 0
    STEM = "compare_curves_vgg11w006_e1"  # 1 training epoch, not the default 15: its own report files
    root = tmp_path / "runs" / "vgg11w006" / "oneshot" / "t0500"
    units = sorted(p.name for p in (root / "finetune_e1").glob("*.json"))
    assert units == ["random_search_s0_f0.json", "random_search_s0_f2.json", "random_search_s1_f1.json",
                     "random_search_s1_f3.json", "uniform_s0_f0.json", "uniform_s0_f2.json", "uniform_s1_f1.json",
                     "uniform_s1_f3.json"]
    record = json.loads((root / "finetune_e1" / "random_search_s1_f3.json").read_text())
    assert record["search"]["n_evaluations"] == 151 and record["finetune"]["seed"] == 3
    assert record["command"].startswith("python benchmarks/compare_agents.py") and record["machine"]["cpu_count"]
    report = json.loads((tmp_path / "results" / f"{STEM}.json").read_text())
    block = report["targets"]["0.5"]
    assert block["summary"]["random_search"]["ft_per_model"] == [2, 2]
    assert block["summary"]["uniform"]["n_evaluations"]["mean"] == 1
    assert block["verdict"] is None  # no RL agent in this comparison
    # the base model of every unit, by its bytes (here seeded untrained models: one per search seed)
    assert sorted(report["meta"]["base_weights"]) == ["untrained model of search seed 0",
                                                      "untrained model of search seed 1"]
    assert (tmp_path / "results" / f"{STEM}.png").is_file()
    md = (tmp_path / "results" / f"{STEM}.md").read_text()
    assert "| `random_search` | 2 | 2/2 |" in md and "Command: `python benchmarks/compare_agents.py" in md
    # the length check: the same search units fine-tuned for another length, in their own folder, reported beside
    two = list(argv)
    two[two.index("--finetune-epochs") + 1] = "2"
    two[two.index("--ft-seeds") + 1] = "1"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("benchmarks.compare_agents.run_unit", lambda *a, **k: pytest.fail("searched again"))
        assert ca.main(two) == 0
    assert (tmp_path / "results" / "compare_curves_vgg11w006_e2.md").is_file()  # the check's own report
    assert sorted(p.name for p in (root / "finetune_e2").glob("*.json")) == [
        "random_search_s0_f0.json", "random_search_s1_f1.json", "uniform_s0_f0.json", "uniform_s1_f1.json"]
    assert ca.main(argv + ["--report-only"]) == 0
    report = json.loads((tmp_path / "results" / f"{STEM}.json").read_text())
    assert sorted(report["targets"]["0.5"]["lengths"]["2"]["summary"]) == ["random_search", "uniform"]
    md = (tmp_path / "results" / f"{STEM}.md").read_text()
    assert "### Fine-tune length at 0.5" in md and "| 1 epochs (verdict) | 2 epochs |" in md
    # a rerun finds every unit finished: nothing is searched or fine-tuned again
    forbid("benchmarks.compare_agents.run_unit", "benchmarks.compare_agents.finetune_searched")
    assert ca.main(argv) == 0
    # the committed JSON carries the units to another machine: the run folders lost, --restore rebuilds every unit
    # (searched models from kept-channel masks, hash-checked) and the report is the same, nothing run again
    import shutil

    # a Scratch-E run of a unit (rl_prune.scratch writes scratch_e_seed{N}.json into its folder) enters the report
    (root / "uniform_s0" / "scratch_e_seed0.json").write_text(json.dumps(
        {"seed": 0, "epochs": 3, "test_top1": 0.25, "best_val_top1": 0.3, "log": []}))
    assert ca.main(argv + ["--report-only"]) == 0
    md = (tmp_path / "results" / f"{STEM}.md").read_text()
    assert "### Scratch-E at 0.5" in md and "| 0.2500 | 1 | 3 |" in md
    block = json.loads((tmp_path / "results" / f"{STEM}.json").read_text())["targets"]["0.5"]
    assert block["summary"]["uniform"]["scratch"]["n"] == 1
    saved = tmp_path / "committed.json"
    shutil.copy(tmp_path / "results" / f"{STEM}_units.json", saved)
    shutil.rmtree(tmp_path / "runs")
    capsys.readouterr()
    assert ca.main(argv + ["--restore", str(saved), "--report-only"]) == 0
    assert "restored 16 unit(s)" in capsys.readouterr().out  # 4 searches, 8 + 4 fine-tunes
    assert sorted(p.name for p in (root / "finetune_e1").glob("*.json")) == units
    assert len(list((root / "finetune_e2").glob("*.json"))) == 4
    assert json.loads((root / "uniform_s0" / "scratch_e_seed0.json").read_text())["test_top1"] == 0.25
    again = json.loads((tmp_path / "results" / f"{STEM}.json").read_text())
    assert again["targets"]["0.5"]["summary"] == block["summary"]
    from rl_prune.run_folder import RunFolder

    searched = RunFolder(root / "random_search_s1")
    assert searched.has_searched_model and searched.read_metrics()["n_evaluations"] == 151
    # another comparison's JSON is refused by name
    with pytest.raises(SystemExit, match="is of another comparison: budget 151"):
        ca.main(argv + ["--restore", str(saved), "--budget", "161", "--report-only"])


def test_units_from_two_versions_of_one_checkpoint_are_refused_in_one_report():
    def block(**hashes):
        return {"units": {"agents": {a: {"searches": {seed: {"source_hash": h, "source": src}}}
                                     for a, (seed, src, h) in hashes.items()}}}
    ck = "checkpoints/base.pt"
    assert ca.base_weights({"0.5": block(uniform=(0, ck, "a"), ppo=(1, ck, "a"))}) == {ck: "a"}
    # seeded untrained models (no checkpoint) differ by search seed, legitimately
    assert ca.base_weights({"0.5": block(uniform=(0, None, "a"), ppo=(1, None, "b"))}) == {
        "untrained model of search seed 0": "a", "untrained model of search seed 1": "b"}
    assert ca.base_weights({"0.5": block(uniform=(0, ck, None))}) == {}  # units made before models were kept
    with pytest.raises(SystemExit, match="2 different versions of checkpoints/base.pt"):
        ca.base_weights({"0.5": block(uniform=(0, ck, "a")), "0.875": block(ppo=(0, ck, "b"))})


def test_a_report_of_another_base_is_never_written_over(tmp_path):
    ck = "checkpoints/base.pt"
    path = tmp_path / "compare_curves_m.json"
    ca.refuse_other_base(path, {ck: "a" * 64})  # no report yet: nothing to keep
    path.write_text(json.dumps({"meta": {"base_weights": {ck: "a" * 64}}, "targets": {}}))
    ca.refuse_other_base(path, {ck: "a" * 64})  # the same base: the report is updated
    ca.refuse_other_base(path, {"other.pt": "b" * 64})  # another checkpoint's units: not this base's question
    with pytest.raises(SystemExit, match=r"another version of the base \(checkpoints/base.pt: aaaaaaaaaaaa in the "
                                         r"report, bbbbbbbbbbbb in these units\).*--tag"):
        ca.refuse_other_base(path, {ck: "b" * 64})


def test_a_verdict_is_undecided_and_provisional_with_one_search_seed():
    summary = {"ppo": {"rl": True, "test": {"mean": 0.6, "std": float("nan"), "n": 1}, "search_seeds": [0],
                       "ft_per_model": [2]},
               "uniform": {"rl": False, "test": {"mean": 0.5, "std": 0.01, "n": 3}, "search_seeds": [0, 1, 2],
                           "ft_per_model": [2, 2, 1]}}
    args = ca.build_parser().parse_args(["--agents", "ppo", "uniform"])
    v = ca.target_verdict(summary, args)
    assert (v["first"], v["second"], v["verdict"]) == ("ppo", "uniform", UNDECIDED)
    assert v["provisional"] == ["ppo: 1 search seed(s) of 3", "uniform: 1 fine-tune seed(s) per model of 2"]
    assert "Provisional: ppo: 1 search seed(s) of 3" in ca.verdict_sentence("0.875", v)


def test_default_budgets_are_spent_exactly_by_every_searching_agent():
    assert ca.default_budget(1) == 151 and ca.default_budget(3) == 153
    for steps in (1, 2, 3, 4):
        b = ca.default_budget(steps)
        assert b >= 150 and b % steps == 0 and (b // steps - 1) % 10 == 0


def test_exact_budget_is_the_smallest_spendable_budget_above_the_minimum():
    from rl_prune.sweep import exact_budget

    assert exact_budget(3, 90) == 93 and exact_budget(1, 90) == 91 and exact_budget(1, 91) == 91
    assert exact_budget(2, 150) == 162  # 81 per step: 8 RL epochs x 10 samples + the reset point
    # another RL-Pruner: 4 samples, no reset point -> a multiple of 4 per step; 2-step look-ahead -> 5 per Q value
    assert exact_budget(1, 5, {"sample_num": 4}) == 8 and exact_budget(1, 1, {"sample_num": 2, "sample_step": 2}) == 6
    with pytest.raises(ValueError, match="n_steps >= 1"):
        exact_budget(0, 90)


def parsed(argv):
    args = ca.build_parser().parse_args(argv)
    ca.resolve_args(args)
    return args


@pytest.mark.parametrize("argv, message", [
    (["--schedule", "iterative", "--agents", "uniform", "ppo"], "ppo always prune(s) in one step"),
    (["--schedule", "iterative", "--agents", "uniform", "--recovery-epochs", "8"],
     "2 recoveries x 8 epochs leave -1 of the 15 training epochs"),
    (["--schedule", "iterative", "--agents", "uniform", "--n-steps", "1"], "needs --n-steps >= 2"),
])
def test_the_iterative_schedule_refuses_what_it_cannot_compare(argv, message):
    assert message in ca.check_args(parsed(argv))


def test_the_iterative_schedule_trains_as_long_as_the_one_shot_one(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    one = parsed(["--config", str(cfg), "--agents", "uniform"])
    it = parsed(["--config", str(cfg), "--agents", "uniform", "--schedule", "iterative"])
    assert (one.n_steps, one.budget, ca.final_epochs(one), ca.schedule_name(one)) == (1, 151, 15, "oneshot")
    assert (it.n_steps, it.budget, ca.final_epochs(it), ca.schedule_name(it)) == (3, 153, 11, "iterative3_r2")
    search = ca.search_config(it, "uniform", 0, 0.5)
    assert (search.env["recovery"], search.env["recovery_epochs"], search.finetune.epochs) == ("kd", 2, 0)
    assert ca.finetune_config(it, "uniform", 0, 0.5).finetune.epochs == 11
    assert ca.search_config(one, "uniform", 0, 0.5).env.get("recovery") is None


def test_the_authors_search_cost_is_scaled_from_the_measured_one():
    assert [ca.authors_steps(t) for t in (0.5, 0.75, 0.875)] == [30, 50, 65]
    search = {"n_evaluations": 151, "search_s": 302.0}
    block = {"units": {"agents": {
        "ppo": {"searches": {0: search}, "finetunes": [{"finetune": {"seconds": 150.0}}]},
        "uniform": {"searches": {0: {"n_evaluations": 1, "search_s": 4.0}}, "finetunes": []}}}}
    meta = {"budget": 151, "val_size": 1000, "reward_samples": 250, "reward_train_images": 256,
            "reward_estimator": "adaptive_bn", "finetune_epochs": 15, "final_epochs": 15}
    cost = ca.search_cost({"0.75": block}, meta)["0.75"]
    assert cost["per_evaluation_s"] == 2.0  # uniform's one evaluation is no search: left out
    assert cost["authors_evaluations"] == 5000 and cost["authors_images_scale"] == 1000 / 506
    assert cost["authors_search_s"] == pytest.approx(5000 * 2.0 * 1000 / 506)
    assert cost["authors_recovery_s"] == pytest.approx(49 * 20 * 10.0)
    assert cost["wall_ratio"] == pytest.approx(151 * 2.0 / cost["authors_search_s"])
    text = "\n".join(ca.search_cost_lines({"0.75": cost}, meta))
    assert f"0.75 **{'yes' if cost['wall_ratio'] <= 0.1 else 'no'}**" in text
    # iterative: the final fine-tune is 11 of the 15 epochs, and the searches' 2 x 2 recovery epochs are no search
    meta_it = {**meta, "schedule_kind": "iterative", "n_steps": 3, "recovery_epochs": 2, "final_epochs": 11}
    block["units"]["agents"]["ppo"]["finetunes"] = [{"finetune": {"seconds": 110.0}}]
    block["units"]["agents"]["ppo"]["searches"][0] = {"n_evaluations": 151, "search_s": 302.0 + 4 * 10.0}
    it = ca.search_cost({"0.75": block}, meta_it)["0.75"]
    assert it["finetune_epoch_s"] == pytest.approx(10.0) and it["per_evaluation_s"] == pytest.approx(2.0)


def test_the_authors_cost_under_a_training_estimator_comes_from_its_measured_cost_ratio(tmp_path, monkeypatch):
    fidelity = tmp_path / "fidelity.json"
    fidelity.write_text(json.dumps({"summary": {"0.875": {"estimators": {"kd_refined10": {"cost_ratio": 16.0}}},
                                                "0.5": {"estimators": {"kd_refined10": {"cost_ratio": 8.0}}}}}))
    monkeypatch.setattr(ca, "FIDELITY_RESULTS", fidelity)
    meta = {"val_size": 1000, "reward_samples": 250, "reward_estimator": "kd_refined", "reward_kd_batches": 10}
    assert ca.vanilla_share(meta, "0.875")[0] == 1 / 16 and ca.vanilla_share(meta, "0.5")[0] == 1 / 8
    assert ca.vanilla_share(meta, "0.75")[0] == pytest.approx(1 / 12)  # not measured there: the mean ratio
    assert ca.vanilla_share({**meta, "reward_kd_batches": 3}, "0.875")[0] is None  # never measured: no estimate
    assert "16.0 vanilla evaluations" in ca.vanilla_share(meta, "0.875")[1]


def test_reward_vs_outcome_ranks_the_searched_models():
    summary = {"ppo": {"per_model": {"0": [0.40, 0.42], "1": [0.45]}, "per_model_reward": {"0": 0.30, "1": 0.25}},
               "uniform": {"per_model": {"0": [0.50, 0.52]}, "per_model_reward": {"0": 0.20}}}
    r = ca.reward_vs_outcome(summary)
    assert r["n"] == 3 and r["rho"] == pytest.approx(-1.0)  # the higher the reward, the worse it ended
    assert r["best_rewarded"] == {"model": "ppo_s0", "reward": 0.30, "test": pytest.approx(0.41)}
    assert r["best_tested"]["model"] == "uniform_s0"
    assert "rho(reward accuracy, test top-1 after FT) = -1.00 over 3" in ca.reward_vs_outcome_line("0.875", r)
    assert ca.reward_vs_outcome({"ppo": {"per_model": {"0": [0.4]}, "per_model_reward": {"0": 0.3}}}) is None


def test_another_schedule_or_fine_tune_length_writes_its_own_report():
    assert ca.report_stem("vgg19w025", "oneshot", ca.DEFAULT_FT_EPOCHS) == "compare_curves_vgg19w025"
    assert ca.report_stem("vgg19w025", "oneshot", 30) == "compare_curves_vgg19w025_e30"
    assert ca.report_stem("vgg19w025", "iterative3_r2", 15) == "compare_curves_vgg19w025_iterative3_r2"
    assert len({ca.report_stem("m", s, e) for s in ("oneshot", "3step") for e in (15, 30)}) == 4


def test_a_tagged_variant_has_its_own_folder_and_report():
    args = ca.build_parser().parse_args(["--tag", "r1000", "--set", "env.reward_samples=null"])
    ca.resolve_args(args)
    assert ca.check_args(args) is None
    assert ca.schedule_name(args) == "oneshot_r1000"
    assert ca.report_stem("vgg19w025", ca.schedule_name(args), 15) == "compare_curves_vgg19w025_oneshot_r1000"
    plain = ca.build_parser().parse_args([])
    ca.resolve_args(plain)
    assert ca.schedule_name(plain) == "oneshot"
