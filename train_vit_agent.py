"""Train a ViT jointly with an AgentViT patch-selection agent (spec §2.6), or as a baseline with all patches
or random masks, then report test accuracy (all / agent / random patches), training time, GFLOPs and images/s.

    python train_vit_agent.py                                   # offline quickstart (digits, tiny ViT)
    python train_vit_agent.py --config configs/agentvit/cifar10_faithful.yaml --device cuda
    python train_vit_agent.py --policy full --dataset npz:../shared/data/cifar10_5k.npz --epochs 5
"""
from __future__ import annotations

import argparse
import copy
import inspect
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import yaml

from agents.vit_ddqn import AllPatches, RandomPatches, ViTDDQN
from agents.vit_ddqn.evaluation import (agent_mask_fn, evaluate_patches, images_per_second, mean_gflops,
                                        random_mask_fn)
from pruning_env.checkpoint import save_checkpoint
from pruning_env.runtime import atomic_write_text, resolve_device, seed_everything, sync
from pruning_env.data import preload
from pruning_env.envs.patch_env import PatchSelectEnv
from pruning_env.models.vit import state_macs, vit_gflops

POLICIES = ("full", "random", "faithful", "double_dqn")

#: The offline default: embedded digits, a CPU-sized ViT, a few epochs; every key is documented in docs/agentvit.md.
DEFAULT_CONFIG: Dict[str, Any] = {
    "policy": "double_dqn",
    "seed": 0,
    "device": "auto",
    "out": "runs/agentvit/quickstart",
    "progress": True,
    "env": {"dataset": "digits", "width": 0.25, "depth": 2, "batch_size": 64, "epochs": 3, "reward_every": 1,
            "n_keep": 30},
    "agent": {"exploration_decay": 40, "skip_first_epoch": False},
    "eval": {"batch_size": 128, "val_each_epoch": True, "throughput": True, "throughput_batch": 128},
}
_TOP_KEYS = set(DEFAULT_CONFIG)
_EVAL_KEYS = set(DEFAULT_CONFIG["eval"])


def _signature_keys(cls) -> set:
    return {k for k in inspect.signature(cls.__init__).parameters if k not in ("self", "env")}


def validate_config(config: Dict[str, Any]) -> Dict[str, Any]:
    """Merge ``config`` over :data:`DEFAULT_CONFIG` and check every key; errors name the bad key.

    :param config: a (partial) config, e.g. loaded from ``configs/agentvit/*.yaml``.
    """
    unknown = set(config) - _TOP_KEYS
    if unknown:
        raise ValueError(f"unknown config key(s) {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}")
    cfg = copy.deepcopy(DEFAULT_CONFIG)
    for key, value in config.items():
        if isinstance(cfg.get(key), dict):
            if not isinstance(value, dict):
                raise ValueError(f"config key {key!r} must be a mapping, got {type(value).__name__}")
            # an explicit agent section replaces the quickstart's; env and eval sections are merged
            cfg[key] = dict(value) if key == "agent" else {**cfg[key], **value}
        else:
            cfg[key] = value
    if "agent" not in config and cfg["policy"] in ("full", "random"):
        cfg["agent"] = {}  # the quickstart's agent settings are for the DDQN agent
    if cfg["policy"] not in POLICIES:
        raise ValueError(f"policy={cfg['policy']!r}; expected one of {POLICIES}")
    bad = set(cfg["env"]) - _signature_keys(PatchSelectEnv)
    if bad:
        raise ValueError(f"unknown env key(s) {sorted(bad)}; allowed: {sorted(_signature_keys(PatchSelectEnv))}")
    agent_cls = {"full": AllPatches, "random": RandomPatches}.get(cfg["policy"], ViTDDQN)
    bad = set(cfg["agent"]) - _signature_keys(agent_cls) - ({"mode"} if agent_cls is ViTDDQN else set())
    if bad:
        raise ValueError(f"unknown agent key(s) {sorted(bad)} for policy {cfg['policy']!r}; "
                         f"allowed: {sorted(_signature_keys(agent_cls))}")
    bad = set(cfg["eval"]) - _EVAL_KEYS
    if bad:
        raise ValueError(f"unknown eval key(s) {sorted(bad)}; allowed: {sorted(_EVAL_KEYS)}")
    return cfg


def load_config(path: str) -> Dict[str, Any]:
    """Read a YAML config (validated by :func:`validate_config`)."""
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config must be a YAML mapping, got {type(data).__name__}")
    return validate_config(data)


def build_agent(policy: str, env: PatchSelectEnv, agent_kwargs: Dict[str, Any], seed: int):
    """The agent (or baseline policy) named by ``policy`` on ``env``."""
    kwargs = dict(agent_kwargs)
    kwargs.setdefault("seed", seed)
    if policy == "full":
        return AllPatches(env, **kwargs)
    if policy == "random":
        return RandomPatches(env, **kwargs)
    kwargs["mode"] = policy
    return ViTDDQN(env, **kwargs)



def run_training(config: Dict[str, Any]) -> Dict[str, Any]:
    """Train the ViT through the patch env with the configured policy and evaluate it on the test split.

    Training time is the synchronised wall time of ``agent.learn`` (ViT steps, state passes, agent updates,
    data loading) minus the per-epoch validation, which is reported separately.

    :param config: a config accepted by :func:`validate_config`.
    :return: the results dict (also written to ``out/results.json`` when ``out`` is set).
    """
    cfg = validate_config(config)
    policy, seed = cfg["policy"], int(cfg["seed"])
    device = resolve_device(cfg["device"])
    seed_everything(seed)
    env_kwargs = dict(cfg["env"])
    env_kwargs.setdefault("observe", policy in ("faithful", "double_dqn"))
    if policy in ("full", "random"):
        env_kwargs.setdefault("same_batch_next_state", False)
    env = PatchSelectEnv(device=str(device), seed=seed, **env_kwargs)
    agent = build_agent(policy, env, cfg["agent"], seed)
    model = env.model
    ev = cfg["eval"]
    val = preload(env.splits.val, device=device)
    test = preload(env.splits.test, device=device)

    history: List[Dict[str, float]] = []
    eval_time = [0.0]

    def on_step(locals_: Dict[str, Any], _globals: Dict[str, Any]) -> bool:
        info = locals_["info"]
        if info.get("epoch_end") and ev["val_each_epoch"]:
            sync(device)
            t0 = time.perf_counter()
            res = evaluate_patches(model, val, None, device, ev["batch_size"])
            sync(device)
            eval_time[0] += time.perf_counter() - t0
            history.append({"epoch": info["epoch"] + 1, "val_top1": res["top1"], "val_loss": res["loss"],
                            "train_loss_last": info["loss"]})
        return True

    sync(device)
    t0 = time.perf_counter()
    agent.learn(total_timesteps=env.total_steps, callback=on_step, progress_bar=bool(cfg["progress"]))
    sync(device)
    train_time = time.perf_counter() - t0 - eval_time[0]

    kept = np.asarray(agent.kept_history)
    results: Dict[str, Any] = {
        "policy": policy, "seed": seed, "device": str(device), "dataset": env.splits.name,
        "model": dict(getattr(model, "zoo_config", {})), "epochs": env.epochs, "batch_size": env.batch_size,
        "n_patches": env.n_patches, "n_keep": env.n_keep, "reward_every": env.reward_every,
        "total_steps": env.total_steps, "train_time_s": train_time, "val_eval_time_s": eval_time[0],
        "vit_step_time_s": env.train_time, "state_time_s": env.state_time,
        "train_mean_kept": float(kept.mean()), "train_kept_std": float(kept.std()),
        "train_gflops_per_image": mean_gflops(model, kept), "gflops_full": vit_gflops(model),
        "state_gflops_per_image": 2 * state_macs(model) / 1e9 if env.observe else 0.0,
        "history": history,
    }
    if isinstance(agent, ViTDDQN):
        results.update(agent_updates=agent.n_updates, final_epsilon=agent.exploration_rate,
                       mean_reward=float(np.mean(agent.rewards)) if agent.rewards else None)

    bs = ev["batch_size"]
    test_res = {"all": evaluate_patches(model, test, None, device, bs)}
    if isinstance(agent, ViTDDQN):
        test_res["agent"] = evaluate_patches(model, test, agent_mask_fn(agent), device, bs)
        k_eval = int(round(test_res["agent"]["mean_kept"]))
    elif policy == "random":
        k_eval = agent.n_keep
    else:
        k_eval = env.n_keep
    test_res["random"] = evaluate_patches(model, test, random_mask_fn(k_eval, seed=seed), device, bs)
    results["test"] = test_res
    results["eval_kept"] = k_eval
    results["gflops_at_eval_kept"] = vit_gflops(model, k_eval)
    if ev["throughput"]:
        tb = ev["throughput_batch"]
        results["images_per_s_all"] = images_per_second(model, None, tb, device)
        results["images_per_s_kept"] = images_per_second(model, k_eval, tb, device)

    if cfg["out"]:
        out = Path(cfg["out"])
        out.mkdir(parents=True, exist_ok=True)
        save_checkpoint(model, out / "vit.pt", policy=policy, seed=seed)
        agent.save(out / "agent.pt")
        results["config"] = cfg
        atomic_write_text(json.dumps(results, indent=2, default=str), out / "results.json")
        atomic_write_text(summary_markdown(results), out / "summary.md")
    return results


def summary_markdown(r: Dict[str, Any]) -> str:
    """A short human-readable summary of one run."""
    t = r["test"]
    lines = [f"# AgentViT run: {r['policy']} on {r['dataset']} (seed {r['seed']})", "",
             "| metric | value |", "|---|---|",
             f"| test top-1, all patches | {t['all']['top1']:.4f} |"]
    if "agent" in t:
        agent = t["agent"]
        lines.append(f"| test top-1, agent masks (mean kept {agent['mean_kept']:.1f}) | {agent['top1']:.4f} |")
    lines += [f"| test top-1, random masks ({r['eval_kept']} kept) | {t['random']['top1']:.4f} |",
              f"| training time (s, excl. validation) | {r['train_time_s']:.1f} |",
              f"| mean kept tokens in training | {r['train_mean_kept']:.1f} of {r['n_patches']} |",
              f"| forward GFLOPs/image in training (all: {r['gflops_full']:.4f}) | {r['train_gflops_per_image']:.4f} |",
              f"| state pass GFLOPs/image | {r['state_gflops_per_image']:.4f} |"]
    if "images_per_s_all" in r:
        lines.append(f"| images/s all / {r['eval_kept']} kept | {r['images_per_s_all']:.0f} / "
                     f"{r['images_per_s_kept']:.0f} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (configs/agentvit/*.yaml); flags below override it")
    p.add_argument("--policy", choices=POLICIES, help="patch policy: agent mode or baseline")
    p.add_argument("--dataset", help="cifar10, npz:PATH, digits (offline), synthetic")
    p.add_argument("--data-root", help="folder with torchvision's CIFAR files")
    p.add_argument("--download", action="store_true", help="let torchvision download CIFAR-10")
    p.add_argument("--epochs", type=int, help="training epochs")
    p.add_argument("--batch-size", type=int, help="ViT training batch")
    p.add_argument("--width", type=float, help="ViT width multiplier")
    p.add_argument("--depth", type=int, help="ViT depth")
    p.add_argument("--n-keep", type=int, help="target kept patches k*")
    p.add_argument("--reward-every", type=int, help="reward / agent-update period in batches")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto, cpu or cuda")
    p.add_argument("--out", help="output folder (results.json, summary.md, vit.pt, agent.pt)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    config: Dict[str, Any] = {}
    if args.config:
        with open(args.config) as f:
            config = yaml.safe_load(f) or {}
        validate_config(config)
    config.setdefault("env", {})
    env_flags = {"dataset": args.dataset, "data_root": args.data_root, "epochs": args.epochs,
                 "batch_size": args.batch_size, "width": args.width, "depth": args.depth, "n_keep": args.n_keep,
                 "reward_every": args.reward_every, "download": args.download or None}
    config["env"].update({k: v for k, v in env_flags.items() if v is not None})
    for key in ("policy", "seed", "device", "out"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    if args.no_progress:
        config["progress"] = False
    results = run_training(config)
    sys.stdout.write(summary_markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
