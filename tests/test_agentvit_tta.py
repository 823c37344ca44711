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
