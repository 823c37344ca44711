"""Tests of train_agent.py (rl_prune.cli / rl_prune.pipeline): the run folder of a tiny config, clear config errors
with exit code 2, seeded repeatability, --resume equivalence (a run killed after step k and resumed equals an
unkilled run), a refused --resume that changes nothing, and a first run (pretraining in-process) equal to later ones.

Every run is an untrained width-0.0625 VGG-11 on generated images with a two-batch fine-tune: a few seconds.
"""
import csv

import pytest
import torch
import yaml
from stable_baselines3.common.callbacks import BaseCallback

from rl_prune.cli import train_main
from rl_prune.config import load_config
from rl_prune.pipeline import run
from rl_prune.run_folder import RunFolder
from tiny import TINY_RUN

N_STEPS = TINY_RUN["env"]["n_steps"]

#: metrics that must agree between equivalent runs (everything but names, folders and timings)
SAME = ("agent", "seed", "n_evaluations", "timesteps", "best_episode", "best_reward", "reward_accuracy",
        "flops_reduction", "params_reduction", "kept_channels", "actions", "pd", "original",
        "pruned_before_finetune", "pruned", "group_names")


def write_config(tmp_path, **changes):
    cfg = yaml.safe_load(yaml.safe_dump(TINY_RUN))
    cfg["run"]["out_dir"] = str(tmp_path / "runs")
    cfg.update(changes)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_metrics(run_dir):
    return RunFolder(run_dir).read_metrics()


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
    assert train_main(["--config", str(path)]) == 0
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
    assert train_main(["--config", str(path), "--name", "again", f"run.out_dir={tmp_path}"]) == 0
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
    cfg.name = "killed"
    with pytest.raises(KeyboardInterrupt):
        run(cfg, run_dir=tmp_path / "killed", callbacks=[KillAt(k)])
    assert not (tmp_path / "killed" / "metrics.json").exists()
    ckpt = RunFolder(tmp_path / "killed").read_checkpoint()
    assert ckpt.phase == "search" and ckpt.timesteps == k
    assert train_main(["--config", str(path), "--name", "killed", f"run.out_dir={tmp_path}",
                             "--resume"]) == 0
    assert_same_run(ref_dir, tmp_path / "killed")


def test_resume_random_search(reference, tmp_path):
    path, _ = reference
    args = ["--config", str(path), "--agent", "random_search", f"run.out_dir={tmp_path}"]
    assert train_main(args + ["--name", "whole"]) == 0
    cfg = load_config(path, [f"run.out_dir={tmp_path}"])
    cfg.name = "cut"
    with pytest.raises(KeyboardInterrupt):
        run(cfg, "random_search", run_dir=tmp_path / "cut", callbacks=[KillAt(2)])
    # the way evaluate.py suggests: the run folder's own config.yaml (which names the agent)
    saved = str(tmp_path / "cut" / "config.yaml")
    assert train_main(["--config", saved, "--name", "cut", "--resume"]) == 0
    assert_same_run(tmp_path / "whole", tmp_path / "cut")


def test_resume_refuses_a_different_config(reference, tmp_path, capsys):
    path, _ = reference
    cfg = load_config(path, [f"run.out_dir={tmp_path}"])
    with pytest.raises(KeyboardInterrupt):
        run(cfg, run_dir=tmp_path / "tiny", callbacks=[KillAt(1)])
    rc = train_main(["--config", str(path), f"run.out_dir={tmp_path}", "--resume", "env.target=0.3"])
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
    (["finetune.epochs=-1"], "finetune.epochs must be an integer >= 0, got -1"),
    (["finetune.lr=.nan"], "finetune.lr must be a finite number"),
    (["seed=x"], "seed must be an integer, got 'x'"),
    (["budget=2.5"], "budget must be None or an integer >= 1, got 2.5"),
    (["run.progress=maybe"], "run.progress must be true or false"),
    (["env.n_steps=2.7"], "env.n_steps must be an integer >= 1"),
    (["env.alpha=.inf"], "env.alpha must be a finite number"),
    (["env.reward_samples=-5"], "env.reward_samples must be None or an integer >= 1"),
    (["agents.ppo.env.target=7"], "env of agent 'ppo' (env with agents.ppo.env): target must be a fraction"),
    (["env.id=Nope-v0"], "env.id 'Nope-v0' is not registered"),
])
def test_config_errors_exit_2_with_a_clear_message(tmp_path, capsys, args, message):
    """One line naming the dotted key, before any work (no run folder is written)."""
    path = write_config(tmp_path)
    assert train_main(["--config", str(path), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def test_bad_zoo_file_exits_2(tmp_path, capsys):
    zoo = tmp_path / "ppo_zoo.yaml"
    zoo.write_text("default:\n  n_timesteps: 8\n  n_step: 4\n")
    path = write_config(tmp_path)
    assert train_main(["--config", str(path), "--agent", "ppo", f"agents.ppo.config={zoo}"]) == 2
    assert "unknown ppo hyperparameters ['n_step']" in capsys.readouterr().err


def test_unknown_agent_and_missing_config_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        train_main(["--config", str(write_config(tmp_path)), "--agent", "nope"])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err
    assert train_main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_sb3_and_search_agents_through_the_cli(tmp_path, capsys):
    path = write_config(tmp_path)
    assert train_main(["--config", str(path), "--agent", "ppo", "budget=6"]) == 0
    metrics = read_metrics(tmp_path / "runs" / "tiny_ppo")
    # exactly the budget: 5 training steps and the final deterministic episode's one
    assert metrics["n_evaluations"] == 6 and metrics["action_mode"] == "sparsity" and metrics["n_steps"] == 1
    assert metrics["flops_reduction"] == pytest.approx(0.4, abs=0.03)
    assert len(read_steps(tmp_path / "runs" / "tiny_ppo")) == 6
    assert train_main(["--config", str(path), "--agent", "random_search", "budget=6"]) == 0
    assert read_metrics(tmp_path / "runs" / "tiny_random_search")["n_evaluations"] == 6  # 2 per step
    assert train_main(["--config", str(path), "--agent", "uniform", "budget=6"]) == 0
    assert "does not apply to 'uniform'" in capsys.readouterr().err
    assert read_metrics(tmp_path / "runs" / "tiny_uniform")["n_evaluations"] == N_STEPS


def test_refused_resume_changes_nothing(reference, tmp_path, capsys):
    """A --resume refused for another config or another agent leaves every file of the run folder as it was
    (it used to overwrite config.yaml, which then named the wrong agent)."""
    path, _ = reference
    cfg = load_config(path, [f"run.out_dir={tmp_path}"])
    with pytest.raises(KeyboardInterrupt):
        run(cfg, run_dir=tmp_path / "tiny", callbacks=[KillAt(1)])
    folder = tmp_path / "tiny"
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    refusals = ((["env.target=0.3"], "differs from the one the checkpoint was made with"),
                (["--agent", "uniform", "--name", "tiny"], "is a run of agent 'rl_pruner', not 'uniform'"))
    for extra, message in refusals:
        assert train_main(["--config", str(path), f"run.out_dir={tmp_path}", "--resume", *extra]) == 2
        assert message in capsys.readouterr().err
        after = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        assert after == before, extra
    assert yaml.safe_load((folder / "config.yaml").read_text())["agent"] == "rl_pruner"


def test_first_run_pretraining_in_process_equals_later_runs(tmp_path):
    """The run that pretrains its missing checkpoint in-process ends exactly like every later run that loads it:
    each phase starts from the run's seed, whatever ran before it in the process."""
    env = {**TINY_RUN["env"], "pretrained": True, "checkpoint": str(tmp_path / "vgg11_synthetic.pt"),
           "auto_pretrain_epochs": 1}
    path = write_config(tmp_path, env=env)
    assert train_main(["--config", str(path), "--name", "first"]) == 0
    assert (tmp_path / "vgg11_synthetic.pt").is_file()
    assert train_main(["--config", str(path), "--name", "later"]) == 0
    first, later = tmp_path / "runs" / "first", tmp_path / "runs" / "later"
    assert_same_run(first, later)
    # the fine-tune too (its dropout draws from torch's global RNG): the same losses and the same weights
    assert read_metrics(first)["finetune"] == read_metrics(later)["finetune"]
    a, b = (torch.load(d / "pruned_model.pt", weights_only=False).state_dict() for d in (first, later))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_run_folder_reads_what_it_writes(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.write_steps([{"step": 1, "kept": [3, 4]}, {"step": 2, "reward": 0.5}])
    assert folder.read_steps() == [{"step": "1", "kept": "3;4", "reward": ""}, {"step": "2", "kept": "", "reward": "0.5"}]
    with pytest.raises(ValueError, match=r"missing \[.*'seconds'.*unexpected \['bogus'\]"):
        folder.write_metrics({"name": "run", "bogus": 1})
    assert not folder.is_finished
    folder.write_config({"seed": 3, "env": {"dataset": "synthetic", "val_size": 32, "model": "vgg11"}})
    assert folder.data_settings() == {"dataset": "synthetic", "val_size": 32, "seed": 3}
    folder.file(RunFolder.CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="checkpoint.pt"):
        folder.read_checkpoint()


def test_resume_from_a_broken_checkpoint_exits_2(tmp_path, capsys):
    path = write_config(tmp_path)
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    (tmp_path / "runs" / "tiny" / "checkpoint.pt").write_bytes(b"")
    assert train_main(["--config", str(path), "--resume"]) == 2
    assert "cannot resume from" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "runs" / "tiny").iterdir()) == ["checkpoint.pt"]


def test_config_is_typed_and_round_trips(tmp_path):
    """Values get their field's type (YAML reads 1e-4 as a string), and config.yaml loads back to the same config."""
    cfg = load_config(write_config(tmp_path), ["finetune.lr=1e-4", "finetune.epochs=2.0", "name=123"])
    assert cfg.finetune.lr == 1e-4 and isinstance(cfg.finetune.epochs, int) and cfg.name == "123"
    assert load_config(data=yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg
