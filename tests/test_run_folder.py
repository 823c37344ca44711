"""No run destroys another (issue 21 item 3): a rerun writes the next free name, a finished or resumable folder is
reused only with --resume / --overwrite, a lock refuses a second run (and evaluate.py) while a live process writes
a folder, a lock left by a SIGKILLed process is taken over; and the end-of-run summary names each accuracy.

Runs are the untrained width-0.0625 VGG-11 on generated images with a two-batch fine-tune (a few seconds each).
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rl_prune.cli import evaluate_main, train_main
from rl_prune.config import load_config
from rl_prune.pipeline import run
from rl_prune.run_folder import (RunFolder, RunFolderError, RunFolderLocked, RunLock, claim_new_run_folder,
                                 latest_run_folder, numbered_run_dirs)
from tiny import KillAt, tiny_run

ROOT = Path(__file__).resolve().parents[1]

TINY = tiny_run(agent="uniform", env={"n_steps": 2}, agents={})


def write_config(tmp_path, **env):
    cfg = json.loads(json.dumps(TINY))
    cfg["run"]["out_dir"] = str(tmp_path / "runs")
    cfg["env"].update(env)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}


def python_env():
    return {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.fixture
def lock_holder():
    """Start a process that holds a folder's run.lock until killed: ``start(folder) -> Popen``."""
    procs = []

    def start(folder):
        code = ("import sys, time; from rl_prune.run_folder import RunLock; RunLock(sys.argv[1]).acquire(); "
                "print('locked', flush=True); time.sleep(600)")
        proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True,
                                env=python_env())
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_a_rerun_keeps_the_finished_run(tmp_path, capsys):
    path = write_config(tmp_path)
    runs = tmp_path / "runs"
    assert train_main(["--config", str(path)]) == 0
    first = snapshot(runs / "tiny")
    assert train_main(["--config", str(path)]) == 0
    err = capsys.readouterr().err
    assert "runs/tiny holds an earlier run (finished); this run writes" in err and str(runs / "tiny_2") in err
    assert snapshot(runs / "tiny") == first
    assert RunFolder(runs / "tiny_2").read_metrics()["name"] == "tiny_2"
    assert RunFolder(runs / "tiny").read_metrics()["name"] == "tiny"
    # --resume continues the latest run of the name: finished, so it is refused, naming both ways out
    assert train_main(["--config", str(path), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "tiny_2 holds a finished run" in err and "--overwrite" in err and "nothing to resume" in err
    # --overwrite replaces runs/tiny and nothing of the old run is left in it
    (runs / "tiny" / "evaluation.md").write_text("of the old run")
    assert train_main(["--config", str(path), "--overwrite", "finetune.epochs=0"]) == 0
    assert not (runs / "tiny" / "evaluation.md").exists()
    assert RunFolder(runs / "tiny").read_metrics()["finetune"]["config"]["epochs"] == 0
    assert [n for n, _ in numbered_run_dirs(runs, "tiny")] == [1, 2]
    with pytest.raises(SystemExit):  # one or the other
        train_main(["--config", str(path), "--overwrite", "--resume"])


def test_resume_continues_the_named_or_the_latest_folder(tmp_path, capsys):
    path = write_config(tmp_path)
    runs = tmp_path / "runs"
    with pytest.raises(KeyboardInterrupt):
        run(load_config(path), run_dir=runs / "tiny", callbacks=[KillAt(1)])
    assert train_main(["--config", str(path)]) == 0  # the killed run stays resumable
    assert "runs/tiny holds an earlier run (resumable); this run writes" in capsys.readouterr().err
    assert RunFolder(runs / "tiny").status == "resumable" and RunFolder(runs / "tiny_2").is_finished
    assert train_main(["--config", str(path), "--resume"]) == 2  # the latest of the name, tiny_2, is finished
    assert "tiny_2 holds a finished run" in capsys.readouterr().err
    assert train_main(["--config", str(path), "--name", "tiny", "--resume"]) == 0
    assert "resumed" in capsys.readouterr().err and RunFolder(runs / "tiny").is_finished


def test_the_python_api_refuses_a_used_folder(tmp_path):
    cfg = load_config(write_config(tmp_path))
    run(cfg, run_dir=tmp_path / "a")
    before = snapshot(tmp_path / "a")
    with pytest.raises(RunFolderError, match=r"holds a finished run; pass --resume .* or --overwrite"):
        run(cfg, run_dir=tmp_path / "a")
    with pytest.raises(RunFolderError, match="nothing to resume"):
        run(cfg, run_dir=tmp_path / "a", resume=True)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a run")
    for kwargs in ({}, {"overwrite": True}):
        with pytest.raises(RunFolderError, match="holds files that are not a run's"):
            run(cfg, run_dir=tmp_path / "mine", **kwargs)
    assert snapshot(tmp_path / "a") == before and (tmp_path / "mine" / "notes.txt").is_file()


def test_two_runs_started_at_once_on_one_name(tmp_path):
    """Two train_agent.py processes started together with the same name: both finish, in two folders."""
    path = write_config(tmp_path)
    cmd = [sys.executable, str(ROOT / "train_agent.py"), "--config", str(path)]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    runs = tmp_path / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["tiny", "tiny_2"]
    names = sorted(RunFolder(runs / n).read_metrics()["name"] for n in ("tiny", "tiny_2"))
    assert names == ["tiny", "tiny_2"] and not list(runs.rglob(RunFolder.LOCK))


def test_a_live_lock_refuses_and_a_stale_one_is_taken_over(tmp_path, lock_holder, capsys):
    path = write_config(tmp_path)
    runs = tmp_path / "runs"
    assert train_main(["--config", str(path)]) == 0
    finished = snapshot(runs / "tiny")
    holder = lock_holder(runs / "tiny")
    owner = RunFolder(runs / "tiny").lock_owner()
    assert owner["pid"] == holder.pid and RunFolder(runs / "tiny").status == "running"
    cfg = load_config(path)
    with pytest.raises(RunFolderLocked, match=rf"being written by another run \(pid {holder.pid}"):
        run(cfg, run_dir=runs / "tiny", overwrite=True)
    for flag in ("--overwrite", "--resume"):
        assert train_main(["--config", str(path), flag]) == 2
        assert f"being written by another run (pid {holder.pid}" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=rf"being written by a run \(pid {holder.pid}"):
        evaluate_main([str(runs / "tiny")])
    # a new run goes elsewhere
    assert train_main(["--config", str(path)]) == 0
    assert RunFolder(runs / "tiny_2").is_finished
    # SIGKILL leaves the lock file; nobody holds it any more
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (runs / "tiny" / RunFolder.LOCK).is_file() and RunFolder(runs / "tiny").lock_owner() is None
    assert RunFolder(runs / "tiny").status == "finished"
    capsys.readouterr()
    assert train_main(["--config", str(path), "--overwrite", "--name", "tiny"]) == 0
    assert f"took over the stale lock of {runs / 'tiny'} (pid {holder.pid}" in capsys.readouterr().err
    top = {p.parts[0] for p in finished}
    assert not (runs / "tiny" / RunFolder.LOCK).exists() and {p.name for p in (runs / "tiny").iterdir()} == top


def test_evaluate_refuses_an_unfinished_folder(tmp_path):
    cfg = load_config(write_config(tmp_path))
    run(cfg, run_dir=tmp_path / "a")
    (tmp_path / "a" / "metrics.json").unlink()
    with pytest.raises(SystemExit, match=r"holds no metrics.json: the run did not finish.*--resume"):
        evaluate_main([str(tmp_path / "a")])


def test_lock_is_reentrant_and_names_are_numbered(tmp_path):
    runs = tmp_path / "runs"
    folder, lock = claim_new_run_folder(runs, "x")
    assert folder.path == runs / "x" and lock.held and (runs / "x" / RunFolder.LOCK).is_file()
    with RunLock(runs / "x"):  # the same process: re-entrant
        assert RunFolder(runs / "x").status == "empty"  # its own lock does not make it "running"
    assert lock.held
    second, lock2 = claim_new_run_folder(runs, "x")  # x is claimed: the next number
    assert second.path == runs / "x_2"
    lock2.release()
    assert not (runs / "x_2").exists()  # a claimed folder left empty is removed on release
    (runs / "x" / "config.yaml").write_text("{}")
    lock.release()
    assert not (runs / "x" / RunFolder.LOCK).exists() and RunFolder(runs / "x").status == "unfinished"
    (runs / "u").mkdir()
    (runs / "u" / "unit.lock").write_text("12345")  # a benchmark worker's lock of the earlier layout
    assert RunFolder(runs / "u").status == "empty"
    (runs / "x_7").mkdir()
    (runs / "x_7" / "metrics.json").write_text("{}")
    third, lock3 = claim_new_run_folder(runs, "x")  # after the highest number, as SB3 numbers its logs
    assert third.path == runs / "x_8"
    lock3.release()
    assert latest_run_folder(runs, "x").path == runs / "x_7" and latest_run_folder(runs, "y") is None


@pytest.mark.parametrize("estimator", ["adaptive_bn", "vanilla"])
def test_the_summary_names_each_accuracy(tmp_path, capsys, estimator):
    """Every accuracy of the story is labelled; with adaptive_bn the re-estimated model's validation top-1 is what the
    search scored (the reward images are the whole validation split here)."""
    path = write_config(tmp_path, reward_estimator=estimator)
    assert train_main(["--config", str(path)]) == 0
    out = capsys.readouterr().out
    metrics = RunFolder(tmp_path / "runs" / "tiny").read_metrics()
    assert metrics["reward_estimator"] == estimator
    assert "pruned, as cut" in out and "(BatchNorm statistics still the unpruned model's, no training" in out
    assert "pruned, after the KD fine-tune (1 epoch)" in out
    assert f"the search scored {metrics['reward_accuracy']:.4f} on its validation reward images" in out
    bn = metrics["pruned_bn_reestimated"]
    if estimator == "vanilla":
        assert bn is None and "re-estimated" not in out and "(vanilla reward)" in out
        assert metrics["pruned_before_finetune"]["val_top1"] == pytest.approx(metrics["reward_accuracy"])
    else:
        assert "pruned, BatchNorm re-estimated" in out and "what the adaptive_bn reward measures" in out
        assert bn["val_top1"] == pytest.approx(metrics["reward_accuracy"])
        assert bn["macs"] == metrics["pruned_before_finetune"]["macs"]
