"""Prune a pretrained CNN with an agent on PruneEnv, fine-tune the result with knowledge distillation and write
a run folder: ``python train_agent.py --config configs/X.yaml [--agent NAME] [--resume] [key=value ...]``.

With no arguments it runs the offline quickstart (configs/quickstart.yaml): a few minutes on 2 CPU cores.
Run folder ``runs/{name}/``: pruned_model.pt (torch.save of the module), pruned_model.ts (TorchScript, needs
only torch), original_model.pt, metrics.json, steps.csv, tb/, checkpoint.pt, distribution.png, config.yaml.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import yaml
from stable_baselines3.common.callbacks import BaseCallback

from agents.common.base import BasePruningAgent
from agents.config import ConfigError, load_config
from agents.registry import AGENTS, build_agent, build_env
from pruning_env.runtime import atomic_path, atomic_save, atomic_write_text, rng_state, seed_everything, set_rng_state
from pruning_env.costs import count_costs
from pruning_env.export import export_torchscript
from pruning_env.training import evaluate, finetune

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "quickstart.yaml"
CHECKPOINT_FORMAT = "rl-prune-run/1"


class RunCheckpoint(BaseCallback):
    """Writes ``checkpoint.pt`` (atomically) every ``every`` pruning steps: agent state with its best model,
    the env's current state and RNG, and the global RNG states, so ``--resume`` continues exactly."""

    def __init__(self, path: Path, every: int, cfg: Dict[str, Any], agent_name: str) -> None:
        super().__init__()
        self.path, self.every, self.cfg, self.agent_name = Path(path), int(every), cfg, agent_name

    def _on_step(self) -> bool:
        if self.every > 0 and self.model.num_timesteps % self.every == 0:
            save_run_checkpoint(self.path, self.model, self.cfg, self.agent_name, phase="search")
        return True


def save_run_checkpoint(path: Path, agent: BasePruningAgent, cfg: Dict[str, Any], agent_name: str,
                        phase: str) -> None:
    """Everything a killed run needs to continue: see :class:`RunCheckpoint`."""
    env = agent.penv
    env_state = env.snapshot() if agent._episode_active else None
    atomic_save({"format": CHECKPOINT_FORMAT, "phase": phase, "agent_name": agent_name, "config": cfg,
                 "agent": agent.state_dict(include_models=True), "env_state": env_state,
                 "env_rng": env.np_random.bit_generator.state, "rng": rng_state()}, path)


def load_run_checkpoint(path: Path, agent: BasePruningAgent, cfg: Dict[str, Any], agent_name: str) -> str:
    """Restore agent, env and RNG from ``path``; returns the phase the run was in."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path} is not a train_agent.py checkpoint")
    if ckpt["agent_name"] != agent_name:
        raise ConfigError(f"{path} is a run of agent {ckpt['agent_name']!r}, not {agent_name!r}; pass "
                          f"--agent {ckpt['agent_name']}")
    saved, now = _comparable(ckpt["config"]), _comparable(cfg)
    if saved != now:
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        raise ConfigError(f"the config differs from the one the checkpoint was made with (sections {diff}); "
                          f"resume with the same config and overrides")
    env = agent.penv
    env.reset(seed=None if cfg["seed"] is None else int(cfg["seed"]))
    agent.load_state_dict(ckpt["agent"])
    if ckpt["env_state"] is not None:
        env.restore(ckpt["env_state"])
        agent.attach_resumed_env()
    env.np_random.bit_generator.state = ckpt["env_rng"]
    set_rng_state(ckpt["rng"])
    return ckpt["phase"]


def _comparable(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The parts of a config that change results (not the output folder or progress bars; the agent is
    checked on its own, so the run folder's config.yaml, which names it, resumes too)."""
    return {k: v for k, v in cfg.items() if k not in ("run", "name", "agent")}


def _format_cell(value: Any) -> Any:
    if isinstance(value, (list, tuple, np.ndarray)):
        return ";".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in value)
    return value


def write_steps_csv(rows: List[Dict[str, Any]], path: Path) -> None:
    """One row per pruning step (per env step for SB3 baselines); list cells are ``;``-joined."""
    keys: List[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _format_cell(row.get(k, "")) for k in keys})


def plot_distribution(env: Any, agent: Any, kept: np.ndarray, path: Path) -> None:
    """PNG: the learned per-group pruning distribution (or the realised share of removed channels) and the
    kept vs original channels per group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(env.group_names)
    orig = np.asarray(env.original_channels)
    k = np.asarray(env.layer_counts)
    removed = k * (orig - kept)
    share = removed / removed.sum() if removed.sum() > 0 else np.zeros_like(removed, dtype=float)
    x = np.arange(len(names))
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.45 * len(names) + 2), 7), sharex=True)
    ax = axes[0]
    pd = getattr(agent, "pd", None)
    if pd is not None:
        from agents.rl_pruner.policies import initial_distribution

        init = initial_distribution(orig, k)
        ax.bar(x - 0.2, init, 0.4, label="initial PD (width-proportional)", color="#bbbbbb")
        ax.bar(x + 0.2, pd, 0.4, label="learned PD", color="#1f77b4")
        ax.plot(x, share, "k.", label="realised share of removed channels")
        ax.set_ylabel("pruning distribution")
    else:
        ax.bar(x, share, 0.6, color="#1f77b4", label="share of removed channels")
        ax.set_ylabel("share of removed channels")
    ax.legend(fontsize=8)
    ax.set_title(f"{type(agent).__name__}: per-group pruning")
    ax = axes[1]
    ax.bar(x, orig, 0.7, color="#dddddd", label="original")
    ax.bar(x, kept, 0.45, color="#2ca02c", label="kept")
    ax.set_ylabel("channels")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=70, ha="right", fontsize=7)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _model_report(model: torch.nn.Module, splits: Any, input_size, device, batch_size: int) -> Dict[str, Any]:
    cost = count_costs(model, input_size, device=device)
    val = evaluate(model, splits.val, device, batch_size=batch_size)
    test = evaluate(model, splits.test, device, batch_size=batch_size)
    return {"val_top1": val["top1"], "test_top1": test["top1"], "test_top5": test["top5"],
            "macs": int(cost.macs), "params": int(cost.params)}


def run(cfg: Dict[str, Any], agent_name: Optional[str] = None, run_dir: Optional[Path] = None,
        resume: bool = False, callbacks: Sequence[BaseCallback] = ()) -> Dict[str, Any]:
    """Prune with one agent, fine-tune, evaluate and write the run folder; returns the metrics.

    :param cfg: a validated config (:func:`agents.config.load_config`).
    :param agent_name: agent to run (default ``cfg["agent"]``).
    :param run_dir: output folder (default ``{run.out_dir}/{name}``).
    :param resume: continue from ``run_dir/checkpoint.pt`` when it exists.
    :param callbacks: extra SB3 callbacks for ``learn`` (after the checkpoint callback).
    """
    name = agent_name or cfg["agent"]
    if name not in AGENTS:
        raise ConfigError(f"unknown agent {name!r}; choose from {', '.join(AGENTS)}")
    run_dir = Path(run_dir) if run_dir is not None else Path(cfg["run"]["out_dir"]) / cfg["name"]
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / "checkpoint.pt"
    progress = bool(cfg["run"]["progress"])
    atomic_write_text(yaml.safe_dump({**cfg, "agent": name}, sort_keys=False), run_dir / "config.yaml")

    seed_everything(int(cfg["seed"]))
    t_start = time.perf_counter()
    try:
        env = build_env(cfg, name)
    except (TypeError, ValueError, FileNotFoundError) as err:  # bad env settings in the config
        raise ConfigError(f"env of agent {name!r}: {err}") from err
    try:
        agent, learn_kwargs = build_agent(cfg, name, env, tensorboard_log=str(run_dir / "tb"))
    except (TypeError, ValueError) as err:  # bad agent arguments in the config
        raise ConfigError(f"agents.{name}: {err}") from err
    if cfg.get("budget") is not None and AGENTS[name].sb3_algo is None and AGENTS[name].budget_arg is None:
        print(f"note: budget={cfg['budget']} does not apply to {name!r} (its evaluations are set by its own "
              f"arguments, see docs/agents.md)", file=sys.stderr)
    phase = "new"
    resumable = isinstance(agent, BasePruningAgent) and type(agent).learn is BasePruningAgent.learn
    if resume and not ckpt_path.is_file():
        print(f"no checkpoint in {run_dir}: starting a new run", file=sys.stderr)
    if resume and ckpt_path.is_file():
        if not resumable:
            raise ConfigError(f"--resume is supported for the agents driven by BasePruningAgent.learn "
                              f"(rl_pruner, uniform, global_taylor, random_search), not {name!r}; rerun without it")
        phase = load_run_checkpoint(ckpt_path, agent, cfg, name)
        if phase == "search" and not agent._episode_active and agent.episodes > 0 \
                and learn_kwargs.get("total_timesteps") is None:
            phase = "search_done"  # killed after the last step's checkpoint: the episode is complete
        print(f"resumed {run_dir} from its checkpoint ({phase}, step {agent.num_timesteps})", file=sys.stderr)
    cbs: List[BaseCallback] = []
    if resumable:
        cbs.append(RunCheckpoint(ckpt_path, int(cfg["run"]["checkpoint_every"]), cfg, name))
    cbs.extend(callbacks)
    t_search = time.perf_counter()
    if phase != "search_done":
        agent.learn(callback=cbs, progress_bar=progress, tb_log_name=name, reset_num_timesteps=phase == "new",
                    **learn_kwargs)
        if resumable:
            save_run_checkpoint(ckpt_path, agent, cfg, name, phase="search_done")
    search_seconds = time.perf_counter() - t_search
    if agent.best is None:
        raise RuntimeError(f"agent {name!r} finished no episode; give it more steps (budget / n_timesteps)")

    best = agent.best
    device = env.device
    bs = int(cfg["run"]["eval_batch_size"])
    pruned = copy.deepcopy(best["model"]).to(device)
    original = env.original_model
    report = {"original": _model_report(original, env.splits, env.input_size, device, bs),
              "pruned_before_finetune": _model_report(pruned, env.splits, env.input_size, device, bs)}
    ft = cfg["finetune"]
    t_ft = time.perf_counter()
    ft_stats = None
    if int(ft["epochs"]) > 0:
        ft_stats = finetune(pruned, env.splits.train, val_data=env.splits.val, epochs=int(ft["epochs"]),
                            max_batches=ft["max_batches"], lr=float(ft["lr"]), min_lr=float(ft["min_lr"]),
                            warmup_ratio=float(ft["warmup_ratio"]),
                            teacher=original if ft["teacher"] == "original" else None, T=float(ft["T"]),
                            soft_weight=float(ft["soft_weight"]), batch_size=int(ft["batch_size"]), device=device,
                            seed=int(cfg["seed"]), progress=progress)
    finetune_seconds = time.perf_counter() - t_ft
    pruned.eval()
    report["pruned"] = _model_report(pruned, env.splits, env.input_size, device, bs)

    pruned_cpu = copy.deepcopy(pruned).cpu().eval()
    atomic_save(pruned_cpu, run_dir / "pruned_model.pt")
    atomic_save(copy.deepcopy(original).cpu().eval(), run_dir / "original_model.pt")
    ts_method = None
    if cfg["run"]["export_torchscript"]:
        ts_method = export_torchscript(pruned_cpu, torch.randn(2, *env.input_size), run_dir / "pruned_model.ts")
    kept = np.asarray(best["info"]["kept_channels"], dtype=np.int64)
    plot_distribution(env, agent, kept, run_dir / "distribution.png")
    write_steps_csv(agent.history, run_dir / "steps.csv")

    orig, prn = report["original"], report["pruned"]
    metrics = {
        "name": cfg["name"], "agent": name, "seed": cfg["seed"], "device": str(device),
        "dataset": env.splits.name,
        "data": {"dataset": cfg["env"].get("dataset", env.splits.name), "data_root": cfg["env"].get("data_root", "data"),
                 "val_size": env.val_size, "split_seed": env.split_seed},
        "input_size": list(env.input_size),
        "target": env.target, "target_metric": env.episode_metric, "n_steps": env.n_steps,
        "action_mode": env.action_mode, "alpha": env.alpha, "beta": env.beta,
        "n_evaluations": agent.n_evaluations, "timesteps": agent.num_timesteps,
        "best_episode": best["episode"], "best_reward": best["reward"],
        "reward_accuracy": best["info"]["accuracy"],
        "flops_reduction": 1.0 - prn["macs"] / orig["macs"], "params_reduction": 1.0 - prn["params"] / orig["params"],
        "speedup_macs": orig["macs"] / max(prn["macs"], 1),
        "group_names": list(env.group_names), "original_channels": env.original_channels.tolist(),
        "kept_channels": kept.tolist(), "actions": best["actions"],
        "pd": None if getattr(agent, "pd", None) is None else [float(p) for p in agent.pd],
        **report,
        "finetune": {k: v for k, v in (ft_stats or {}).items() if k != "history"} | {"config": ft},
        "torchscript": ts_method,
        "seconds": {"search": search_seconds, "finetune": finetune_seconds,
                    "total": time.perf_counter() - t_start},
    }
    atomic_write_text(json.dumps(metrics, indent=2, default=float), run_dir / "metrics.json")
    env.close()
    return metrics


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python train_agent.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: the offline quickstart)")
    p.add_argument("--agent", default=None, choices=sorted(AGENTS), help="agent to run (default: the config's)")
    p.add_argument("--name", default=None, help="run folder name under run.out_dir (default: config name[_agent])")
    p.add_argument("--resume", action="store_true", help="continue a killed run from its checkpoint.pt")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, dotted for nested keys: env.target=0.3 agents.rl_pruner.lr_epoch=2")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    # intermixed: overrides may come before and after the options (``a=1 --resume b=2``)
    args = build_parser().parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    agent = args.agent or cfg["agent"]
    name = args.name or (cfg["name"] if args.agent is None else f"{cfg['name']}_{agent}")
    cfg["name"] = name
    run_dir = Path(cfg["run"]["out_dir"]) / name
    try:
        metrics = run(cfg, agent, run_dir, resume=args.resume)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    o, p = metrics["original"], metrics["pruned"]
    print(f"\n{agent} on {metrics['dataset']}: FLOPs -{metrics['flops_reduction']:.1%}, params "
          f"-{metrics['params_reduction']:.1%}, {metrics['n_evaluations']} evaluations, "
          f"{metrics['seconds']['total']:.0f} s")
    print(f"test top-1: original {o['test_top1']:.4f} | pruned {metrics['pruned_before_finetune']['test_top1']:.4f}"
          f" | after fine-tune {p['test_top1']:.4f}")
    print(f"run folder: {run_dir}  (evaluate with: python evaluate.py {run_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
