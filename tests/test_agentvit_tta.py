"""The ViT training recipe of the patch env (AdamW without decay on norms and biases, warm-up + cosine, label
smoothing, checked settings) and the time-to-accuracy benchmark run as a user would, tiny and offline.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pruning_env.envs.patch_env import PatchSelectEnv

ROOT = Path(__file__).resolve().parents[1]


def recipe_env(splits, **kw) -> PatchSelectEnv:
    args = dict(dataset=splits, width=0.125, depth=1, batch_size=32, epochs=2, n_keep=20, action_mode="mask",
                seed=0, time_info=False)
    args.update(kw)
    return PatchSelectEnv(**args)


def test_cosine_schedule_warms_up_per_batch_then_decays_to_min_lr(synthetic_splits):
    env = recipe_env(synthetic_splits, lr=1e-3, lr_schedule="cosine", warmup_epochs=1, min_lr=1e-5)
    env.reset(seed=0)
    warmup = env.batches_per_epoch
    lrs = [env.optimizer.param_groups[0]["lr"]]
    terminated = False
    while not terminated:
        _, _, terminated, _, _ = env.step(np.ones(64, dtype=np.int8))
        lrs.append(env.optimizer.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(1e-3 / warmup)  # first batch of the warm-up
    assert np.all(np.diff(lrs[:warmup]) > 0) and lrs[warmup] == pytest.approx(1e-3)
    assert np.all(np.diff(lrs[warmup:]) < 0) and lrs[-1] == pytest.approx(1e-5)
    env.reset(seed=0)  # a new run starts a new schedule
    assert env.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 / warmup)


def test_adamw_decays_matrices_only_and_the_notebook_default_is_plain_adam(synthetic_splits):
    env = recipe_env(synthetic_splits, optimizer="adamw", weight_decay=0.05)
    env.reset(seed=0)
    decayed, plain = env.optimizer.param_groups
    assert decayed["weight_decay"] == 0.05 and all(p.dim() > 1 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.dim() == 1 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(env.model.parameters()))
    notebook = recipe_env(synthetic_splits)
    notebook.reset(seed=0)
    assert type(notebook.optimizer).__name__ == "Adam" and notebook.scheduler is None
    assert notebook.optimizer.param_groups[0]["weight_decay"] == 0.0


@pytest.mark.parametrize("bad, match", [({"optimizer": "sgd"}, r"optimizer must be one of \('adam', 'adamw'\), got 'sgd'"),
                                        ({"lr_schedule": "step"}, "lr_schedule must be one of .*, got 'step'"),
                                        ({"label_smoothing": 1.0}, "label_smoothing"),
                                        ({"weight_decay": -0.1}, "weight_decay")])
def test_recipe_settings_are_checked(synthetic_splits, bad, match):
    with pytest.raises(ValueError, match=match):
        recipe_env(synthetic_splits, **bad)


def test_label_smoothing_raises_the_loss_of_a_confident_step(synthetic_splits):
    losses = {}
    for smoothing in (0.0, 0.3):
        env = recipe_env(synthetic_splits, label_smoothing=smoothing)
        env.reset(seed=0)
        losses[smoothing] = env.step(np.ones(64, dtype=np.int8))[4]["loss"]
    # same weights and batch: CE with smoothing differs from plain CE on the same logits
    assert losses[0.3] != pytest.approx(losses[0.0])


def test_time_to_accuracy_benchmark_runs_tiny_and_resumes(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "agentvit_tta.py"), "--data", "synthetic", "--device", "cpu",
           "--threads", "1", "--epochs", "2", "--seeds", "0", "--width", "0.125", "--depth", "1", "--batch-size", "32",
           "--recipe", str(ROOT / "configs" / "agentvit" / "recipe_small_data.yaml"), "--sizes", "0.125x1",
           "--size-batches", "8", "--out", str(tmp_path), "--print-every", "0"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    payload = json.loads((tmp_path / "agentvit_tta.json").read_text())
    assert sorted(r["policy"] for r in payload["runs"]) == ["double_dqn", "faithful", "full", "random"]
    full = next(r for r in payload["runs"] if r["policy"] == "full")
    assert [c["epoch"] for c in full["curve"]] == [1, 2] and full["curve"][1]["time_s"] > full["curve"][0]["time_s"]
    assert {"agent", "random", "all"} <= set(next(r for r in payload["runs"] if r["policy"] == "double_dqn")["test"])
    assert payload["step_times"][0]["batch"] == 8 and payload["machine"]["cpu_count"] >= 1
    md = (tmp_path / "agentvit_tta.md").read_text()
    assert "s to 90 %" in md and "Paired test-time comparison" in md and "Verdict" in md
    assert (tmp_path / "agentvit_tta.png").stat().st_size > 0
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)  # same settings: nothing to train
    assert again.returncode == 0 and "resuming: 4 finished run(s)" in again.stdout
    assert "seed 0 all patches" not in again.stdout


# ----------------------------------------------------------------------------------------- the report's logic
def _run(policy, seed, points, test_all=0.5, agent=None):
    """A finished run: ``points`` = [(time_s, val_top1), ...] per epoch."""
    test = {"all": {"top1": test_all}, "random": {"top1": 0.4}}
    if agent is not None:
        test["agent"] = {"top1": agent}
    return {"policy": policy, "seed": seed, "steps": 10, "train_time_s": points[-1][0], "eval_kept": 30,
            "mean_kept": 30.0, "test": test,
            "curve": [{"epoch": i + 1, "time_s": t, "val_top1": v} for i, (t, v) in enumerate(points)]}


def test_time_to_accuracy_summary_and_verdict_on_hand_made_runs():
    from benchmarks.agentvit_tta import summarise, time_to, verdict

    runs = [_run("full", 0, [(1, 0.5), (2, 0.8), (3, 1.0)], test_all=0.60),
            _run("full", 1, [(1, 0.6), (2, 0.9), (3, 1.0)], test_all=0.70),
            # reaches 90 % (0.9) in one seed only
            _run("faithful", 0, [(1.5, 0.92), (3, 0.97)], agent=0.55),
            _run("faithful", 1, [(1, 0.5), (2, 0.7), (3, 0.85)], agent=0.35),
            # 90 % at 1 and 3 s (mean 2.0 against all patches' 2.5; sooner in seed 0 only); 95 % at 3 and 3 s
            _run("double_dqn", 0, [(1, 0.94), (3, 0.96)], test_all=0.62, agent=0.5),
            _run("double_dqn", 1, [(1, 0.5), (3, 0.96)], test_all=0.66, agent=0.5),
            _run("random", 0, [(1, 0.91), (2, 0.99)]),
            _run("random", 1, [(1, 0.5), (2, 0.6)])]
    assert time_to(runs[0]["curve"], 0.9) == 3 and time_to(runs[3]["curve"], 0.9) is None
    summary = summarise({"runs": runs, "policies": ["full", "faithful", "double_dqn", "random"]})
    assert summary["target_val_top1"] == 1.0  # the all-patch runs' mean final validation top-1
    pol = summary["policies"]
    assert pol["full"]["time_to_90"] == [3, 2] and pol["full"]["time_to_95"] == [3, 3]
    assert pol["faithful"]["time_to_90"] == [1.5, None]
    assert pol["double_dqn"]["time_to_90"] == [1, 3]
    assert pol["faithful"]["agent_minus_random"] == pytest.approx([0.15, -0.05])
    assert pol["random"]["time_vs_full"] == pytest.approx(2 / 3 - 1)  # train time 2 s against 3 s
    lines = verdict(summary)
    assert lines[:2] == ["Verdict (from the numbers above):", ""]
    faithful, ddqn = lines[2:]
    assert faithful == ("- faithful agent: reaches 90 % in 1 of 2 seeds; reaches 95 % in 1 of 2 seeds; final test "
                        "top-1 -15.0 points vs all patches.")
    assert ddqn == ("- double-DQN agent: reaches 90 % in 2.0 s, sooner than all patches (2.5 s; sooner in 1 of 2 "
                    "paired seeds), random masks (k*) reach it in 1 of 2 seeds; reaches 95 % in 3.0 s, as soon as "
                    "all patches (3.0 s; sooner in 0 of 2 paired seeds), random masks (k*) reach it in 1 of 2 seeds; "
                    "final test top-1 -1.0 points vs all patches.")
    assert verdict(summarise({"runs": runs[2:], "policies": ["faithful"]})) == [
        "Verdict: no all-patch run finished, so there is no target accuracy."]
