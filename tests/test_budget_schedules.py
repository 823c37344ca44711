"""Budget-derived schedules (issue 24 item 5): RL-Pruner derives its RL epochs from ``budget`` and spends it (within
one RL epoch's samples), refuses a budget too small for one RL epoch with the numbers, and the run summary states
the evaluations used of the budget and the derived schedule. Tiny untrained VGG-11 on generated images."""
import pytest
import yaml

from rl_prune.cli import train_main
from rl_prune.config import ConfigError
from rl_prune.pipeline import rl_pruner_schedule
from rl_prune.run_folder import RunFolder
from tiny import TINY_RUN

SAMPLE_NUM = 2


def tiny_config(tmp_path, agent, budget, n_steps=1):
    cfg = yaml.safe_load(yaml.safe_dump(TINY_RUN))
    cfg["run"]["out_dir"] = str(tmp_path / "runs")
    cfg["agent"], cfg["budget"] = agent, budget
    cfg["env"]["n_steps"] = n_steps
    if agent.startswith("rl_pruner"):
        cfg["agents"][agent] = {"sample_num": SAMPLE_NUM, "lr_epoch": 1}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


#: budget 11 over 1 step: 5 RL epochs x 2 samples = 10; budget 15 over 2 steps: 7 per step, 1 for the improved
#: guard's reset point, 3 RL epochs x 2 samples, so 2 x (6 + 1) = 14
@pytest.mark.parametrize("agent,budget,n_steps,spent", [("rl_pruner", 11, 1, 10), ("rl_pruner_improved", 15, 2, 14)])
def test_rl_pruner_spends_the_budget(tmp_path, capsys, agent, budget, n_steps, spent):
    path = tiny_config(tmp_path, agent, budget, n_steps)
    assert train_main(["--config", str(path), "--name", "b"]) == 0
    m = RunFolder(tmp_path / "runs" / "b").read_metrics()
    # lr_epoch 1 in the config would score 2 (+1) per step; the budget's schedule leaves less than one RL epoch
    # per step unused (budget // n_steps per step), and the run scores exactly the schedule it states
    assert budget - n_steps * SAMPLE_NUM < m["n_evaluations"] <= budget
    assert m["n_evaluations"] == spent
    assert m["budget_schedule"].endswith(f"= {m['n_evaluations']} evaluations, derived from budget {budget} "
                                         "(config lr_epoch 1 replaced)")
    assert m["budget"] == budget and "derived from budget" in m["budget_schedule"]
    out = capsys.readouterr().out
    assert f"evaluations used {m['n_evaluations']} of budget {budget}" in out
    assert "config lr_epoch 1 replaced" in out


def test_schedule_numbers():
    assert rl_pruner_schedule("rl_pruner_improved", 90, 1, {"sample_num": 10, "lr_epoch": 3,
                                                           "collapse_reference": "reset_candidate"})[0] == 8
    assert rl_pruner_schedule("rl_pruner", 90, 3, {"sample_num": 10})[0] == 3
    assert rl_pruner_schedule("rl_pruner", 100, 1, {"sample_num": 3, "sample_step": 2})[0] == 8  # 12 per epoch


def test_too_small_budget_is_refused(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"budget: 5 evaluations over 3 pruning steps give 1 per step.*sample_num 2"):
        rl_pruner_schedule("rl_pruner", 5, 3, {"sample_num": 2})
    path = tiny_config(tmp_path, "rl_pruner", 3, n_steps=3)
    assert train_main(["--config", str(path), "--name", "c"]) == 2
    assert "raise the budget to >= 6" in capsys.readouterr().err


def test_summary_line_for_every_agent(tmp_path, capsys):
    path = tiny_config(tmp_path, "uniform", 7)
    assert train_main(["--config", str(path), "--name", "u"]) == 0
    m = RunFolder(tmp_path / "runs" / "u").read_metrics()
    assert f"evaluations used {m['n_evaluations']} of budget 7" in capsys.readouterr().out
