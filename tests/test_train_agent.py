"""Tests of train_agent.py: the run folder of a tiny config, clear config errors with exit code 2, seeded
repeatability and --resume equivalence (a run killed after step k and resumed equals an unkilled run).

Every run is an untrained width-0.0625 VGG-11 on generated images with a two-batch fine-tune: a few seconds.
"""
import csv
import json

import pytest
import torch
import yaml
from stable_baselines3.common.callbacks import BaseCallback

import train_agent
from agents.config import load_config

N_STEPS = 3

TINY = {
    "name": "tiny",
    "seed": 0,
    "device": "cpu",
    "agent": "rl_pruner",
    "env": {"model": "vgg11", "dataset": "synthetic", "width": 0.0625, "pretrained": False, "val_size": 32,
            "reward_samples": 32, "calibration_size": 16, "n_steps": N_STEPS, "target": 0.4, "budget": "flops",
            "alpha": 0.0, "beta": 0.0, "record_timings": False},
    "agents": {"rl_pruner": {"sample_num": 2, "lr_epoch": 2},
               "random_search": {"n_candidates": 2},
               "ppo": {"n_steps": 4, "batch_size": 4, "n_epochs": 1, "policy_kwargs": {"net_arch": [8]}}},
    "finetune": {"epochs": 1, "max_batches": 2, "batch_size": 16},
    "run": {"progress": False, "export_torchscript": False, "checkpoint_every": 1},
}

#: metrics that must agree between equivalent runs (everything but names, folders and timings)
SAME = ("agent", "seed", "n_evaluations", "timesteps", "best_episode", "best_reward", "reward_accuracy",
        "flops_reduction", "params_reduction", "kept_channels", "actions", "pd", "original",
        "pruned_before_finetune", "pruned", "group_names")


def write_config(tmp_path, **changes):
    cfg = yaml.safe_load(yaml.safe_dump(TINY))
    cfg["run"]["out_dir"] = str(tmp_path / "runs")
    cfg.update(changes)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_metrics(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())


def read_steps(run_dir):
    with open(run_dir / "steps.csv") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def assert_same_run(a_dir, b_dir):
    a, b = read_metrics(a_dir), read_metrics(b_dir)
    for key in SAME:
        assert a[key] == b[key], key
    assert read_steps(a_dir) == read_steps(b_dir)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One unkilled run through main(): (config path, run folder)."""
    tmp = tmp_path_factory.mktemp("reference")
    path = write_config(tmp)
    assert train_agent.main(["--config", str(path)]) == 0
    return path, tmp / "runs" / "tiny"


def test_run_folder_contents(reference):
    path, run_dir = reference
    for name in ("pruned_model.pt", "original_model.pt", "metrics.json", "steps.csv", "distribution.png",
                 "checkpoint.pt", "config.yaml"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tb").rglob("events.out.tfevents*"))
    model = torch.load(run_dir / "pruned_model.pt", weights_only=False)
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    metrics = read_metrics(run_dir)
    assert metrics["agent"] == "rl_pruner" and metrics["timesteps"] == N_STEPS
    assert metrics["flops_reduction"] == pytest.approx(0.4, abs=0.03)
    assert metrics["pruned"]["macs"] < metrics["original"]["macs"]
    assert len(metrics["kept_channels"]) == len(metrics["group_names"]) == len(metrics["pd"])
    rows = read_steps(run_dir)
    assert [int(r["step"]) for r in rows] == list(range(1, N_STEPS + 1))
    assert int(rows[-1]["n_evaluations"]) == metrics["n_evaluations"]
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["agents"]["rl_pruner"] == {"sample_num": 2, "lr_epoch": 2}


def test_same_seed_gives_same_metrics(reference, tmp_path):
    path, run_dir = reference
    assert train_agent.main(["--config", str(path), "--name", "again", f"run.out_dir={tmp_path}"]) == 0
    assert_same_run(run_dir, tmp_path / "again")


class KillAt(BaseCallback):
    """Simulates a kill (Ctrl-C) right after pruning step ``k`` (after that step's checkpoint)."""

    def __init__(self, k):
        super().__init__()
        self.k = k

    def _on_step(self):
        if self.model.num_timesteps == self.k:
            raise KeyboardInterrupt
        return True


@pytest.mark.parametrize("k", [1, N_STEPS])
def test_resume_after_kill_equals_unkilled_run(reference, tmp_path, k):
    path, ref_dir = reference
    cfg = load_config(path, [f"run.out_dir={tmp_path}"])
    cfg["name"] = "killed"
    with pytest.raises(KeyboardInterrupt):
        train_agent.run(cfg, run_dir=tmp_path / "killed", callbacks=[KillAt(k)])
    assert not (tmp_path / "killed" / "metrics.json").exists()
    ckpt = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=False)
    assert ckpt["phase"] == "search" and ckpt["agent"]["num_timesteps"] == k
    assert train_agent.main(["--config", str(path), "--name", "killed", f"run.out_dir={tmp_path}",
                             "--resume"]) == 0
    assert_same_run(ref_dir, tmp_path / "killed")


def test_resume_random_search(reference, tmp_path):
    path, _ = reference
    args = ["--config", str(path), "--agent", "random_search", f"run.out_dir={tmp_path}"]
    assert train_agent.main(args + ["--name", "whole"]) == 0
    cfg = load_config(path, [f"run.out_dir={tmp_path}"])
    cfg["name"] = "cut"
    with pytest.raises(KeyboardInterrupt):
        train_agent.run(cfg, "random_search", run_dir=tmp_path / "cut", callbacks=[KillAt(2)])
    # the way evaluate.py suggests: the run folder's own config.yaml (which names the agent)
    saved = str(tmp_path / "cut" / "config.yaml")
    assert train_agent.main(["--config", saved, "--name", "cut", "--resume"]) == 0
    assert_same_run(tmp_path / "whole", tmp_path / "cut")


def test_resume_refuses_a_different_config(reference, tmp_path, capsys):
    path, _ = reference
    cfg = load_config(path, [f"run.out_dir={tmp_path}"])
    with pytest.raises(KeyboardInterrupt):
        train_agent.run(cfg, run_dir=tmp_path / "tiny", callbacks=[KillAt(1)])
    rc = train_agent.main(["--config", str(path), f"run.out_dir={tmp_path}", "--resume", "env.target=0.3"])
    assert rc == 2 and "differs from the one the checkpoint was made with" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["env.bogus=1"], "unknown key"),
    (["bogus=1"], "unknown key"),
    (["agent=nope"], "agent 'nope' is unknown"),
    (["not-an-override"], "must look like key=value"),
    (["agents.rl_pruner.lr_epochs=2"], "unknown key"),
    (["agents.rl_pruner.seed=2"], "unknown key"),
    (["agents.ppo.n_stepz=2"], "unknown key"),
    (["finetune.teacher=student"], "finetune.teacher"),
    (["env.target=2"], "target must be a fraction"),
    (["agents.rl_pruner.sample_num=0"], "sample_num must be >= 1"),
])
def test_config_errors_exit_2_with_a_clear_message(tmp_path, capsys, args, message):
    path = write_config(tmp_path)
    assert train_agent.main(["--config", str(path), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err


def test_bad_zoo_file_exits_2(tmp_path, capsys):
    zoo = tmp_path / "ppo_zoo.yaml"
    zoo.write_text("default:\n  n_timesteps: 8\n  n_step: 4\n")
    path = write_config(tmp_path)
    assert train_agent.main(["--config", str(path), "--agent", "ppo", f"agents.ppo.config={zoo}"]) == 2
    assert "unknown ppo hyperparameters ['n_step']" in capsys.readouterr().err


def test_unknown_agent_and_missing_config_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        train_agent.main(["--config", str(write_config(tmp_path)), "--agent", "nope"])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err
    assert train_agent.main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_sb3_and_search_agents_through_the_cli(tmp_path, capsys):
    path = write_config(tmp_path)
    assert train_agent.main(["--config", str(path), "--agent", "ppo", "budget=6"]) == 0
    metrics = read_metrics(tmp_path / "runs" / "tiny_ppo")
    assert metrics["n_evaluations"] == 6 + 1 and metrics["action_mode"] == "sparsity" and metrics["n_steps"] == 1
    assert metrics["flops_reduction"] == pytest.approx(0.4, abs=0.03)
    assert len(read_steps(tmp_path / "runs" / "tiny_ppo")) == 7
    assert train_agent.main(["--config", str(path), "--agent", "random_search", "budget=6"]) == 0
    assert read_metrics(tmp_path / "runs" / "tiny_random_search")["n_evaluations"] == 6  # 2 per step
    assert train_agent.main(["--config", str(path), "--agent", "uniform", "budget=6"]) == 0
    assert "does not apply to 'uniform'" in capsys.readouterr().err
    assert read_metrics(tmp_path / "runs" / "tiny_uniform")["n_evaluations"] == N_STEPS
