"""benchmarks/reward_fidelity_searched.py: the searched models of a comparison's units file, rebuilt and
hash-checked, their truths from the carried fine-tunes, and the pick regret per search seed."""
import numpy as np
import pytest
import torch

import benchmarks.reward_fidelity_searched as rfs
from rl_prune.run_folder import indices_to_mask, rebuild_pruned, weights_hash
from tiny import mixed_net


def carried_model(source, seed=0):
    """A carried searched model in export_search's form: a random half of each group's channels kept."""
    from pruning_env.pruning import Pruner

    pruner = Pruner(source, torch.zeros(1, 3, 16, 16))
    rng = np.random.default_rng(seed)
    kept = [sorted(rng.choice(int(n), max(1, int(n) // 2), replace=False).tolist()) for n in pruner.num_channels]
    model, names = rebuild_pruned(source, kept, [3, 16, 16], {})
    return {"group_names": names, "kept_masks": [indices_to_mask(k) for k in kept], "input_size": [3, 16, 16],
            "pruner": {}, "structure_hash": None, "weights_hash": weights_hash(model),
            "source_hash": weights_hash(source), "source": "test"}, model


def test_a_carried_model_is_rebuilt_exactly_and_a_wrong_base_or_engine_is_refused():
    source = mixed_net(seed=0).eval()
    carried, model = carried_model(source)
    rebuilt = rfs.rebuild(carried, source, "t/unit")
    assert weights_hash(rebuilt) == weights_hash(model)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(rebuilt(x), model.eval()(x))
    with pytest.raises(SystemExit, match="another base model"):
        rfs.rebuild(carried, mixed_net(seed=1).eval(), "t/unit")
    with pytest.raises(SystemExit, match="not the searched model"):
        rfs.rebuild({**carried, "weights_hash": "0" * 64}, source, "t/unit")


def _ft(agent, seed, ft_seed, top1):
    return {"agent": agent, "search_seed": seed, "ft_seed": ft_seed, "finetune": {"report": {"test_top1": top1}}}


def _search(agent, seed, reward, carried=True):
    return {"metrics": {"agent": agent, "seed": seed, "reward_accuracy": reward, "n_evaluations": 151},
            "searched_model": {"kept_masks": []} if carried else None}


def test_only_carried_models_with_two_fine_tunes_are_candidates_and_truths_follow_the_fine_tune_seed():
    units = {"targets": {"0.875": {"carry": {
        "searches": {"ppo_s0": _search("ppo", 0, 0.3), "ppo_s1": _search("ppo", 1, 0.2),
                     "amc_s0": _search("amc", 0, 0.25, carried=False), "uniform_s0": _search("uniform", 0, 0.1)},
        "finetunes": [_ft("ppo", 0, 3, 0.40), _ft("ppo", 0, 0, 0.50), _ft("ppo", 1, 1, 0.45),
                      _ft("amc", 0, 0, 0.5), _ft("amc", 0, 3, 0.5), _ft("uniform", 0, 0, 0.6),
                      _ft("uniform", 0, 3, 0.62), _ft("uniform", 0, 6, 0.9)]}}}}
    rows = rfs.searched_models(units, "0.875")
    assert [r["name"] for r in rows] == ["ppo_s0", "uniform_s0"]  # ppo_s1: one fine-tune; amc_s0: no model
    ppo, uni = rows
    assert ppo["truth"] == [0.50, 0.40] and ppo["ft_seeds"] == [0, 3] and ppo["search_reward"] == 0.3
    assert uni["truth"] == [0.6, 0.62]  # the first two fine-tune seeds only


def test_pick_regret_per_search_seed():
    seeds = np.array([0, 0, 0, 1, 1, 1])
    truth = np.array([0.5, 0.6, 0.4, 0.3, 0.2, 0.7])
    perfect = rfs.pick_regret_by_seed(truth * 10, truth, seeds)
    assert perfect["regret"] == pytest.approx(0.0)
    worst = rfs.pick_regret_by_seed(-truth, truth, seeds)
    assert worst["regret"] == pytest.approx(100 * ((0.6 - 0.4) + (0.7 - 0.2)) / 2)
    assert perfect["random_regret"] == pytest.approx(100 * ((0.6 - 0.5) + (0.7 - 0.4)) / 2)


def test_an_unknown_target_and_a_missing_units_file_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="no such file"):
        rfs.main(["--units", str(tmp_path / "nope.json")])
    path = tmp_path / "units.json"
    path.write_text('{"meta": {}, "targets": {"0.875": {"carry": {"searches": {}}}}}')
    with pytest.raises(SystemExit, match=r"no units at targets \['0.5'\]"):
        rfs.main(["--units", str(path), "--targets", "0.5"])


def test_optimism_is_the_recorded_reward_less_the_remeasured_one_per_agent():
    def row(agent, rec, fresh, truth, evals):
        return {"agent": agent, "search_reward": rec, "est": {"kd_refined10": {"value": fresh}}, "truth": truth,
                "n_evaluations": evals}
    rows = [row("ppo", 0.30, 0.20, [0.4, 0.5], 151), row("ppo", 0.26, 0.22, [0.5, 0.5], 151),
            row("uniform", 0.18, 0.20, [0.52, 0.50], 1)]
    res = rfs.optimism_by_agent(rows, "kd_refined10")
    out = res["agents"]
    assert list(out) == ["ppo", "uniform"] and out["ppo"]["n"] == 2
    assert out["ppo"]["optimism"] == pytest.approx(0.07) and out["uniform"]["optimism"] == pytest.approx(-0.02)
    assert out["ppo"]["truth"] == pytest.approx(0.475)
    # the offset of the two measurements is uniform's (one model evaluated): ppo's optimism beyond it is 0.09
    assert res["offset"] == pytest.approx(-0.02) and res["offset_models"] == 1
    assert out["ppo"]["beyond_offset"] == pytest.approx(0.09) and out["uniform"]["beyond_offset"] == pytest.approx(0)
