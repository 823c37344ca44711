"""The documented commands are tests (issue 21 item 1): every ``python train_agent.py``, ``python evaluate.py``,
``python train_vit_agent.py``, ``python -m pruning_env.pretrain`` and ``rl-prune-*`` command in the code blocks of
README.md and docs/*.md runs in a fresh subprocess, on this checkout, in a smoke setting; so does every registered
agent through ``train_agent.py --agent NAME`` on the quickstart.

Smoke setting: a scratch folder holding the repo's scripts and configs and one pretrained quickstart checkpoint
(shared by all commands); tiny budgets appended as overrides or flags (the last value wins); generated images where a
command names data this machine does not have (CIFAR, ``../shared`` npz files: tests never read them); progress bars on,
as a user has them. A ``--resume`` command continues a run SIGKILLed after its first checkpoint. What the machine
cannot run (CUDA, downloads, the ONNX extra when missing) is skipped with the reason in the summary (``-rs``).
"""
from __future__ import annotations

import configparser
import importlib.util
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pytest
import torch

from agents.registry import AGENTS
from pruning_env.pretrain import build_parser as pretrain_parser
from rl_prune.cli import VIT_FLAGS, evaluate_parser, train_parser, vit_parser
from rl_prune.config import ViTRunConfig, load_config, parse_overrides

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPTS = {"train_agent.py": "train", "evaluate.py": "evaluate", "train_vit_agent.py": "vit"}
SHELL_BLOCKS = ("", "bash", "sh", "shell", "console")
#: seconds one smoke command may take
TIMEOUT = 600
#: the quickstart's pretrained model, made once for the session (its env looks for exactly this file)
QUICKSTART_CHECKPOINT = Path("checkpoints/vgg11_w0.25_digits.pt")

#: appended to every train_agent.py command: a few evaluations, a one-batch fine-tune, small reward sets
SMOKE_TRAIN = ["env.n_steps=2", "env.reward_samples=64", "env.reward_train_images=32", "env.calibration_size=16",
               "env.recovery_batches=1", "finetune.epochs=1", "finetune.max_batches=1", "finetune.batch_size=32"]
_ON_POLICY = {"n_steps": 4}
_OFF_POLICY = {"learning_starts": 2, "batch_size": 4}
#: the tiny budget of each registered agent (a new agent needs an entry: test_every_agent_has_a_smoke_budget)
SMOKE_AGENT: Dict[str, Dict[str, object]] = {
    "rl_pruner": {"sample_num": 2, "lr_epoch": 1},
    "rl_pruner_improved": {"sample_num": 2, "lr_epoch": 1},
    "rl_pruner_bounded": {"sample_num": 2, "lr_epoch": 1},
    "uniform": {},
    "global_taylor": {},
    "latency_knapsack": {},
    "random_search": {"n_candidates": 2},
    "sensitivity": {"n_ratios": 1},
    "ppo": {**_ON_POLICY, "batch_size": 4, "n_epochs": 1},
    "a2c": dict(_ON_POLICY),
    "trpo": {**_ON_POLICY, "batch_size": 4},
    "sac": dict(_OFF_POLICY),
    "td3": dict(_OFF_POLICY),
    "ddpg": dict(_OFF_POLICY),
    "amc": {"batch_size": 8, "warmup": 2},
}
#: evaluations of an SB3 smoke run (its final deterministic episode included)
SMOKE_SB3_BUDGET = 7
SMOKE_EVALUATE = ["--repeats", "3", "--warmup", "1", "--max-test", "128"]
SMOKE_VIT = ["--epochs", "1", "--reward-every", "1", "eval.throughput_batch=16"]
SMOKE_PRETRAIN = ["--epochs", "1", "--batch-size", "64"]


# ------------------------------------------------------------------------------------------------ collecting

@dataclass(frozen=True)
class DocCommand:
    """One documented command: where it is, its text, which CLI, and its arguments."""

    where: str
    text: str
    kind: str
    args: Tuple[str, ...]

    @property
    def resume(self) -> bool:
        return self.kind == "train" and "--resume" in self.args


def console_scripts() -> Dict[str, str]:
    """Console script name -> ``module:function`` as setup.cfg declares them."""
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    scripts = {}
    for line in parser["options.entry_points"]["console_scripts"].strip().splitlines():
        name, _, target = line.partition("=")
        scripts[name.strip()] = target.strip()
    return scripts


CONSOLE_KINDS = {"train_main": "train", "evaluate_main": "evaluate", "vit_main": "vit"}


def _shell_lines(text: str) -> List[Tuple[int, str]]:
    """(line number, logical line) of the shell code blocks: continuations joined, heredoc bodies dropped."""
    lines, in_fence, in_block, heredoc, pending, start = [], False, False, None, "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("```"):
            in_fence = not in_fence
            in_block = in_fence and stripped[3:].strip().lower() in SHELL_BLOCKS
            continue
        if not in_block:
            continue
        if heredoc is not None:
            if stripped == heredoc:
                heredoc = None
            continue
        match = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", raw)
        if match:
            heredoc = match.group(1)
        if not pending:
            start = number
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        lines.append((start, pending + raw))
        pending = ""
    return lines


def doc_commands() -> List[DocCommand]:
    """Every command of the five CLIs in the docs' shell blocks, in order, each text once."""
    consoles = console_scripts()
    found: Dict[str, DocCommand] = {}
    for path in DOC_FILES:
        for number, line in _shell_lines(path.read_text()):
            try:
                tokens = shlex.split(line, comments=True)
            except ValueError:
                continue
            segments, current = [], []
            for token in tokens:
                if token in ("&&", "||", ";", "|"):
                    segments.append(current)
                    current = []
                else:
                    current.append(token)
            segments.append(current)
            for seg in segments:
                kind, args = None, ()
                if len(seg) >= 2 and seg[0] == "python" and seg[1] in SCRIPTS:
                    kind, args = SCRIPTS[seg[1]], tuple(seg[2:])
                elif seg[:3] == ["python", "-m", "pruning_env.pretrain"]:
                    kind, args = "pretrain", tuple(seg[3:])
                elif seg and seg[0] in consoles:
                    kind, args = "console:" + seg[0], tuple(seg[1:])
                if kind is None:
                    continue
                text = " ".join(seg)
                if text not in found:
                    found[text] = DocCommand(f"{path.relative_to(ROOT)}:{number}", text, kind, args)
    return list(found.values())


COMMANDS = doc_commands()


# ----------------------------------------------------------------------------------------------- workspace

@dataclass
class Workspace:
    """The scratch folder commands run in, with generated data and the shared quickstart checkpoint; commands run
    in a pool of worker threads, one subprocess each (identical commands once)."""

    path: Path
    data: Dict[int, Path] = field(default_factory=dict)
    pool: Optional[ThreadPoolExecutor] = None
    futures: Dict[Tuple[str, ...], Future] = field(default_factory=dict)

    def env(self) -> Dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TQDM_DISABLE")}
        env["PYTHONPATH"] = str(ROOT)  # this checkout, not an installed copy
        # commands run side by side: one torch thread each (results do not depend on it)
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        return env

    def run(self, argv: List[str], cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
        """Run ``argv`` now, in this thread."""
        return subprocess.run(argv, cwd=cwd or self.path, env=self.env(), capture_output=True, text=True,
                              timeout=TIMEOUT)

    def submit(self, argv: List[str], after: Sequence[Future] = ()) -> Future:
        """Run ``argv`` in the pool once ``after`` are done (identical commands share one run)."""
        key = tuple(argv)
        if key not in self.futures:
            def task() -> subprocess.CompletedProcess:
                for future in after:
                    future.exception()  # wait; its own test reports a failure
                return self.run(argv)

            self.futures[key] = self.pool.submit(task)
        return self.futures[key]


def _generated_npz(path: Path, num_classes: int) -> Path:
    rng = np.random.default_rng(num_classes)
    n_train, n_test = 256, 64
    np.savez(path, x=rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
             y=np.arange(n_train) % num_classes, x_test=rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8),
             y_test=np.arange(n_test) % num_classes)
    return path


def make_workspace(path: Path, checkpoint: Optional[Path] = None) -> Workspace:
    """A folder as a fresh clone looks to a user: the scripts, the configs, and an empty runs/."""
    path.mkdir(parents=True, exist_ok=True)
    for name in [*SCRIPTS, "configs"]:
        (path / name).symlink_to(ROOT / name)
    (path / "checkpoints").mkdir()
    if checkpoint is not None:
        (path / QUICKSTART_CHECKPOINT).symlink_to(checkpoint)
        json_file = checkpoint.with_suffix(".json")
        if json_file.is_file():
            (path / QUICKSTART_CHECKPOINT).with_suffix(".json").symlink_to(json_file)
    ws = Workspace(path)
    ws.data = {n: _generated_npz(path / f"generated_{n}.npz", n) for n in (10, 100)}
    return ws


# --------------------------------------------------------------------------------------------- smoke plans

@dataclass
class Plan:
    """How one command runs here (its arguments after the program, in the workspace), or why it cannot."""

    argv: List[str] = field(default_factory=list)
    skip: Optional[str] = None
    notes: List[str] = field(default_factory=list)
    outputs: List[str] = field(default_factory=list)
    run_name: Optional[str] = None
    """the run name of a train_agent.py command (its folder: runs/NAME or the next free number)"""
    agent: Optional[str] = None
    """the agent of a train_agent.py command on the quickstart config (None for other configs)"""


def _program(kind: str) -> Tuple[str, List[str]]:
    """(CLI kind, argv prefix): scripts run as ``python SCRIPT``, console scripts as their setup.cfg entry point."""
    if kind.startswith("console:"):
        module, _, function = console_scripts()[kind.split(":", 1)[1]].partition(":")
        code = f"import sys; from {module} import {function}; sys.exit({function}())"
        return CONSOLE_KINDS[function], [sys.executable, "-c", code]
    if kind == "pretrain":
        return kind, [sys.executable, "-m", "pruning_env.pretrain"]
    script = {v: k for k, v in SCRIPTS.items()}[kind]
    return kind, [sys.executable, script]


def _available(dataset: object, ws: Path, data_root: str = "data") -> bool:
    """Whether the data a command names is on this machine, seen from the workspace (tests never read ../shared)."""
    if not isinstance(dataset, str) or dataset in ("digits", "synthetic"):
        return True
    if ":" in dataset:
        kind, _, rest = dataset.partition(":")
        return kind in ("npz", "imagefolder") and (ws / rest).exists()
    folder = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}.get(dataset)
    return folder is not None and (ws / data_root / folder).is_dir()


def _classes(dataset: str) -> int:
    return 100 if "100" in dataset else 10


def agent_overrides(agent: str) -> List[str]:
    """The tiny budget of one agent as overrides."""
    items = [f"agents.{agent}.{k}={v}" for k, v in SMOKE_AGENT[agent].items()]
    return items + ([f"budget={SMOKE_SB3_BUDGET}"] if AGENTS[agent].sb3_algo is not None else [])


def plan_train(args: Tuple[str, ...], ws: Workspace) -> Plan:
    parsed = train_parser().parse_intermixed_args(list(args))
    overrides = parse_overrides(parsed.overrides)
    if parsed.agent is not None:
        overrides["agent"] = parsed.agent
    config = Path(parsed.config) if Path(parsed.config).is_absolute() else ws.path / parsed.config
    cfg = load_config(config, overrides)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        return Plan(skip="needs CUDA (the config sets device: cuda)")
    plan = Plan()
    extra = SMOKE_TRAIN + agent_overrides(cfg.agent)
    env = cfg.env_kwargs(cfg.agent)
    if not _available(env.get("dataset"), ws.path, env.get("data_root", "data")):
        n = _classes(str(env.get("dataset")))
        extra += [f"env.dataset=npz:{ws.data[n]}", "env.pretrained=false", "env.val_size=32", "env.reward_samples=16"]
        plan.notes.append(f"{env.get('dataset')} is not on this machine: generated {n}-class images, untrained model")
    plan.argv = list(args) + extra
    plan.run_name = parsed.name or (cfg.name if parsed.agent is None else f"{cfg.name}_{parsed.agent}")
    if config.resolve() == (ROOT / "configs" / "quickstart.yaml").resolve():
        plan.agent = cfg.agent
    return plan


def plan_evaluate(args: Tuple[str, ...], ws: Workspace) -> Plan:
    args = tuple(a.replace("NAME", "quickstart") for a in args)
    parsed = evaluate_parser().parse_args(list(args))
    if "onnx" in parsed.export and any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxruntime")):
        return Plan(skip="needs the export extra (pip install -e \".[export]\"): onnx / onnxruntime not installed")
    if parsed.device == "cuda" and not torch.cuda.is_available():
        return Plan(skip="needs CUDA (--device cuda)")
    plan = Plan(argv=list(args) + SMOKE_EVALUATE)
    if parsed.original and not (ws.path / parsed.original).is_file():
        plan.argv += ["--original", str(QUICKSTART_CHECKPOINT), "--dataset", "digits"]
        plan.notes.append(f"{parsed.original} is not on this machine: the quickstart's model and data instead")
    out = Path(parsed.out) if parsed.out else Path(parsed.run_dir or Path(parsed.pruned).parent)
    plan.outputs.append(str(out / "evaluation.json"))
    return plan


def plan_vit(args: Tuple[str, ...], ws: Workspace) -> Plan:
    parsed = vit_parser().parse_intermixed_args(list(args))
    if parsed.download:
        return Plan(skip="downloads CIFAR-10 (--download needs the network)")
    overrides = parse_overrides(parsed.overrides)
    overrides.update({key: getattr(parsed, flag) for flag, key in VIT_FLAGS.items()
                      if getattr(parsed, flag) is not None})
    config = (ws.path / parsed.config) if parsed.config else None
    cfg = load_config(config, overrides, schema=ViTRunConfig, data=None if config else {})
    if cfg.device == "cuda" and not torch.cuda.is_available():
        return Plan(skip="needs CUDA (device cuda)")
    plan = Plan(argv=list(args) + SMOKE_VIT)
    dataset = cfg.env.get("dataset")
    if not _available(dataset, ws.path, cfg.env.get("data_root", "data")):
        plan.argv += ["--dataset", f"npz:{ws.data[10]}"]  # a flag: flags win over the config and key=value
        plan.notes.append(f"{dataset} is not on this machine: generated 10-class images")
    if cfg.out:
        plan.outputs.append(str(Path(cfg.out) / "results.json"))
    return plan


def plan_pretrain(args: Tuple[str, ...], ws: Workspace) -> Plan:
    parsed = pretrain_parser().parse_args(list(args))
    if parsed.download:
        return Plan(skip="downloads CIFAR (--download needs the network)")
    plan = Plan(argv=list(args) + SMOKE_PRETRAIN)
    dataset, width = parsed.dataset, parsed.width
    if not _available(dataset, ws.path, parsed.data_root):
        n = _classes(dataset)
        dataset = f"npz:{ws.data[n]}"
        plan.argv += ["--dataset", dataset, "--val-size", "32"]
        plan.notes.append(f"{parsed.dataset} is not on this machine: generated {n}-class images")
    if width == 1.0 and parsed.model.startswith("vgg"):
        width = 0.25  # one epoch of a full VGG-19 costs a minute of CPU; the code path is the same
        plan.argv += ["--width", str(width)]
        plan.notes.append("width 0.25 instead of 1 (CPU time)")
    if parsed.out:
        plan.outputs.append(parsed.out)
    else:
        from pruning_env.checkpoint import default_checkpoint_path

        plan.outputs.append(str(default_checkpoint_path(parsed.model, dataset, width)))
    return plan


PLANNERS = {"train": plan_train, "evaluate": plan_evaluate, "vit": plan_vit, "pretrain": plan_pretrain}


def run_resume(prefix: List[str], plan: Plan, ws: Workspace, where: str) -> subprocess.CompletedProcess:
    """A ``--resume`` command as its docs mean it: the same command without ``--resume`` is SIGKILLed right after
    its first checkpoint (in a fresh workspace), then the documented command continues it."""
    fresh = make_workspace(ws.path.parent / f"resume_{re.sub(r'[^A-Za-z0-9]', '_', where)}",
                           (ws.path / QUICKSTART_CHECKPOINT).resolve())
    first = [a for a in plan.argv if a != "--resume"]
    proc = subprocess.Popen(prefix + first, cwd=fresh.path, env=fresh.env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + TIMEOUT
    try:
        while proc.poll() is None and not list((fresh.path / "runs").glob("*/checkpoint.pt")):
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    folders = [p.parent for p in (fresh.path / "runs").glob("*/checkpoint.pt")]
    assert len(folders) == 1, folders
    (folders[0] / "metrics.json").unlink(missing_ok=True)  # it finished before the kill: killed at its last file
    done = fresh.run(prefix + plan.argv)
    assert "resumed" in done.stderr and (folders[0] / "metrics.json").is_file(), done.stdout + done.stderr
    return done


def _report(cmd: str, plan: Plan, done: subprocess.CompletedProcess) -> str:
    tail = (done.stdout + done.stderr)[-4000:]
    notes = "".join(f"\n  smoke: {n}" for n in plan.notes)
    return f"`{cmd}` exited {done.returncode}{notes}\n  ran: {' '.join(plan.argv)}\n{tail}"


# ------------------------------------------------------------------------------------------------- launching

#: commands run side by side, one torch thread each
WORKERS = max(1, min(4, os.cpu_count() or 1))


@dataclass
class Job:
    """One command of the session: its plan and its run (or the error of planning it)."""

    plan: Optional[Plan] = None
    future: Optional[Future] = None
    error: Optional[BaseException] = None

    def result(self, what: str) -> Tuple[Plan, subprocess.CompletedProcess]:
        if self.error is not None:
            pytest.fail(f"{what} does not parse: {type(self.error).__name__}: {self.error}")
        if self.plan.skip:
            pytest.skip(f"{what}: {self.plan.skip}")
        return self.plan, self.future.result()


def _plan(planner: Callable[[Tuple[str, ...], Workspace], Plan], args: Tuple[str, ...], ws: Workspace) -> Job:
    try:
        return Job(plan=planner(args, ws))
    except (Exception, SystemExit) as err:  # a command that does not even parse (argparse exits): its test says so
        return Job(error=err)


@dataclass
class Session:
    """The workspace and the job of every command (by its doc location) and agent (``agent:NAME``)."""

    ws: Workspace
    jobs: Dict[str, Job]


@pytest.fixture(scope="session")
def smoke(tmp_path_factory) -> Session:
    """Every documented command and every registered agent, started in the pool at once: the quickstart's model is
    pretrained first (one epoch: the commands need a model of its shape and split, not its accuracy); the evaluate
    commands start once the runs that write runs/quickstart have finished."""
    from pruning_env.pretrain import pretrain

    root = tmp_path_factory.mktemp("docs")
    checkpoint = root / "pretrained" / QUICKSTART_CHECKPOINT.name
    with torch.random.fork_rng(devices=[]):
        pretrain("vgg11", "digits", width=0.25, epochs=1, out=checkpoint, val_size=300, seed=0, device="cpu",
                 progress=False)
    ws = make_workspace(root / "ws", checkpoint)
    ws.pool = ThreadPoolExecutor(WORKERS)
    out: Dict[str, Job] = {}
    quickstart_runs: List[Future] = []
    evaluations = []
    for cmd in COMMANDS:
        kind, prefix = _program(cmd.kind)
        job = _plan(PLANNERS[kind], cmd.args, ws)
        out[cmd.where] = job
        if job.plan is None or job.plan.skip:
            continue
        if kind == "evaluate":
            evaluations.append((job, prefix))
        elif cmd.resume:
            job.future = ws.pool.submit(run_resume, prefix, job.plan, ws, cmd.where)
        else:
            job.future = ws.submit(prefix + job.plan.argv)
            if job.plan.run_name == "quickstart":
                quickstart_runs.append(job.future)
    _, prefix = _program("train")
    documented: Dict[str, Job] = {}
    for job in out.values():
        if job.future is not None and job.plan.agent is not None and "--resume" not in job.plan.argv:
            documented.setdefault(job.plan.agent, job)
    for agent in AGENTS:
        if agent in documented:  # the docs already run this agent on the quickstart: that run counts
            out[f"agent:{agent}"] = documented[agent]
            continue
        job = out[f"agent:{agent}"] = _plan(plan_train, ("--agent", agent), ws)
        if job.plan is not None:
            job.future = ws.submit(prefix + job.plan.argv)
    for job, prefix in evaluations:
        job.future = ws.submit(prefix + job.plan.argv, after=quickstart_runs)
    yield Session(ws, out)
    ws.pool.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------------------------------------------ tests

def test_the_docs_show_every_cli():
    """The collector sees the commands (a renamed fence or prefix would silently test nothing)."""
    kinds = {c.kind for c in COMMANDS}
    assert {"train", "evaluate", "vit", "pretrain"} <= kinds and any(k.startswith("console:") for k in kinds)
    assert len(COMMANDS) >= 20, [c.text for c in COMMANDS]
    assert set(CONSOLE_KINDS) == {t.partition(":")[2] for t in console_scripts().values()}


@pytest.mark.slow
@pytest.mark.parametrize("cmd", COMMANDS, ids=[f"{c.where} {c.text[:70]}" for c in COMMANDS])
def test_documented_command_runs(cmd: DocCommand, smoke: Session):
    plan, done = smoke.jobs[cmd.where].result(f"{cmd.where} `{cmd.text}`")
    assert done.returncode == 0, _report(cmd.text, plan, done)
    if cmd.resume:  # run_resume checked the continued run folder
        return
    ws = smoke.ws.path
    if _program(cmd.kind)[0] == "train":
        match = re.search(r"^run folder: (\S+)  \(evaluate with", done.stdout, re.M)
        assert match and (ws / match.group(1) / "metrics.json").is_file(), _report(cmd.text, plan, done)
    for path in plan.outputs:
        assert (ws / path).is_file(), _report(cmd.text, plan, done)


def test_every_agent_has_a_smoke_budget():
    assert set(SMOKE_AGENT) == set(AGENTS), "give each registered agent a tiny budget in SMOKE_AGENT"


@pytest.mark.slow
@pytest.mark.parametrize("agent", list(AGENTS))
def test_every_agent_runs_from_the_cli(agent: str, smoke: Session):
    """``python train_agent.py --agent NAME`` on the quickstart, progress bars on, for every registered agent."""
    what = f"python train_agent.py --agent {agent}"
    plan, done = smoke.jobs[f"agent:{agent}"].result(what)
    assert done.returncode == 0, _report(what, plan, done)
    match = re.search(r"^run folder: (\S+)  \(evaluate with", done.stdout, re.M)
    metrics = (smoke.ws.path / match.group(1) / "metrics.json").read_text()
    assert f'"agent": "{agent}"' in metrics
