"""``final_rerank``: the best final-step candidates of a search re-scored on held-out validation images (disjoint
from the reward's), the best there kept; its re-scores counted apart from the search; bad settings refused; the
run layer writes the chosen candidate as the searched model."""
import numpy as np
import pytest
import torch

from pruning_env.data import preload
from pruning_env.envs.prune_env import RERANK_SEED_OFFSET
from pruning_env.pruning import Pruner
from pruning_env.pruning.pruner import PrunePlan
from rl_prune.pipeline import run
from rl_prune.run_folder import RunFolder, weights_hash
import yaml

from rl_prune.config import load_config
from tiny import random_actions, tiny_env, tiny_run

SETTINGS = dict(reward_samples=8, n_steps=1, target=0.5, budget="flops", alpha=0.0, beta=0.0,
                reward_estimator="adaptive_bn", reward_train_images=32)


def test_the_held_out_images_are_the_validation_images_the_reward_does_not_read(splits):
    env = tiny_env(splits, final_rerank=3, **SETTINGS)
    x, y = env.task.reward_data
    hx, hy = env.task.holdout_data
    assert len(y) == 8 and len(hy) == len(splits.val) - 8
    every = preload(splits.val)[0]
    assert len(every) == len(x) + len(hx)
    rows = {tuple(r.flatten().tolist()) for r in x}
    assert not any(tuple(r.flatten().tolist()) in rows for r in hx)  # disjoint
    assert tiny_env(splits, **SETTINGS).task.holdout_data is None  # off: none drawn


@pytest.mark.parametrize("settings, message", [
    (dict(reward_samples=None), "needs held-out validation images"),
    (dict(budget=None, action_mode="sparsity"), "needs a budget"),
    (dict(reward_samples=16), "none is left to re-score on"),
])
def test_bad_settings_are_refused(splits, settings, message):
    with pytest.raises(ValueError, match=message):
        tiny_env(splits, final_rerank=3, **{**SETTINGS, **settings})


def test_the_best_finalists_are_rescored_on_held_out_images_and_the_best_there_kept(splits):
    env = tiny_env(splits, final_rerank=3, **SETTINGS)
    env.reset(seed=0)
    assert env.rerank_finalists() is None  # nothing evaluated yet
    found = []
    for a in random_actions(env.n_groups, 8, seed=1):
        reward, info = env.evaluate_action(a)
        found.append((reward, tuple(info["kept_channels"])))
    spent, total = env.n_evaluations, env.total_evaluations
    out = env.rerank_finalists()
    distinct = sorted(set(found), key=lambda f: -f[0])
    assert out["evaluations"] == len(out["finalists"]) == min(3, len(distinct))
    assert [f["reward"] for f in out["finalists"]] == pytest.approx([r for r, _ in distinct[:3]])
    assert env.n_evaluations == spent and env.total_evaluations == total + out["evaluations"]
    # each held-out score is an independent re-measurement: the same estimator on the held-out images
    holdout = env.scorer.with_images(env.task.holdout_data, seed=RERANK_SEED_OFFSET)  # env seed 0
    pruner = env.pruner
    for f in out["finalists"]:
        model = pruner.apply(pruner.plan(keep=np.asarray(f["kept_channels"])))
        assert holdout.accuracy(model.eval(), env.original_model) == pytest.approx(f["holdout_accuracy"])
    best = max(range(len(out["finalists"])), key=lambda i: (out["finalists"][i]["holdout_reward"], -i))
    assert out["chosen"] == best and out["kept_channels"] == out["finalists"][best]["kept_channels"]
    # the returned model is the chosen candidate, rebuilt from its kept indices in the original numbering
    rebuilt = Pruner(env.original_model, torch.zeros(1, *env.input_size)).apply(
        PrunePlan.from_indices(out["kept_indices"]))
    assert weights_hash(rebuilt) == weights_hash(out["model"])
    assert [len(k) for k in out["kept_indices"]] == out["kept_channels"]


def test_off_it_changes_nothing(splits):
    env = tiny_env(splits, **SETTINGS)
    env.reset(seed=0)
    for a in random_actions(env.n_groups, 4, seed=1):
        env.evaluate_action(a)
    assert env.rerank_finalists() is None


def _tiny_run(tmp_path, name, agent="random_search", **env):
    cfg = tiny_run(agent=agent, budget=6, env={"n_steps": 1, "reward_samples": 16, **env}, agents={agent: {}})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**cfg, "run": {**cfg["run"], "out_dir": str(tmp_path / "runs")}}))
    return run(load_config(path), agent, tmp_path / "runs" / name)


def test_a_run_keeps_the_rescored_choice_as_its_searched_model(tmp_path):
    metrics = _tiny_run(tmp_path, "rerank", final_rerank=3)
    record = metrics["final_rerank"]
    assert record is not None and record["k"] == 3 and record["evaluations"] == len(record["finalists"]) >= 2
    assert record["holdout_images"] == 16  # the 32 validation images less the reward's 16
    assert metrics["n_evaluations"] == 6  # the search's budget, the re-scores apart
    assert metrics["kept_channels"] == record["kept_channels"]
    assert metrics["reward_accuracy"] == pytest.approx(record["accuracy"])
    searched = RunFolder(tmp_path / "runs" / "rerank").read_searched_record()
    assert [len(k) for k in searched.kept_indices] == record["kept_channels"]
    assert _tiny_run(tmp_path, "plain")["final_rerank"] is None
    # one model evaluated (uniform): nothing to choose between, the record says so and the search's choice stays
    one = _tiny_run(tmp_path, "uniform", agent="uniform", final_rerank=3)
    assert one["final_rerank"] == {"k": 3, "evaluations": 0, "finalists": [], "chosen": None, "changed": False}
    assert one["kept_channels"] == _tiny_run(tmp_path, "uniform_plain", agent="uniform")["kept_channels"]


def test_a_comparison_refuses_a_searching_unit_made_with_another_final_rerank():
    import benchmarks.compare_agents as ca

    searched = {"budget": 151, "n_evaluations": 151, "budget_schedule": None,
                "final_rerank": {"k": 5, "finalists": [{}] * 5}}
    assert ca.unit_rerank(searched) == 5 and ca.unit_rerank({"final_rerank": None}) == 1
    assert ca.unit_rerank({"final_rerank": {"finalists": [{}] * 4}}) == 4  # a record from before "k"
    assert ca.budget_problem("random_search", searched, 151, rerank=5) is None
    assert "final_rerank=5, not 1" in ca.budget_problem("random_search", searched, 151, rerank=1)
    plain = {**searched, "final_rerank": None}
    assert "final_rerank=1, not 5" in ca.budget_problem("ppo", plain, 151, rerank=5)
    assert ca.budget_problem("uniform", {**plain, "n_evaluations": 1}, 151, rerank=5) is None  # nothing to re-rank
