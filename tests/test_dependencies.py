"""The default paths need only the declared dependencies (issue 21 item 2): SB3 agents show the project's tqdm bar,
so ``train_agent.py --agent ppo`` (progress on) runs without ``rich``, which setup.cfg does not declare.
"""
import configparser
import sys
from pathlib import Path

import pytest

from agents.sb3_baselines import SB3Agent
from tiny import tiny_env

ROOT = Path(__file__).resolve().parents[1]


def declared() -> set:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    lines = parser["options"]["install_requires"].split("\n")
    return {line.split(">")[0].split("=")[0].split("<")[0].strip().lower() for line in lines if line.strip()}


@pytest.mark.parametrize("algo,hp", [("ppo", {"n_steps": 4, "batch_size": 4, "n_epochs": 1}),
                                     ("sac", {"learning_starts": 2, "batch_size": 4})])
def test_sb3_progress_bar_needs_no_rich(splits, monkeypatch, capsys, algo, hp):
    assert "rich" not in declared() and "tqdm" in declared()
    monkeypatch.setitem(sys.modules, "rich", None)  # as on a fresh install: import rich fails
    env = tiny_env(splits, action_mode="sparsity", budget="flops", target=0.3, n_steps=1)
    agent = SB3Agent(env, algo=algo, seed=0, **hp).learn(total_timesteps=5, progress_bar=True)
    assert agent.num_timesteps == 5
    assert f"SB3Agent({algo})" in capsys.readouterr().err  # the tqdm bar was shown
