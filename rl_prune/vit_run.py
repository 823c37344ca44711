"""A ViT run (``train_vit_agent.py``'s logic): train a ViT jointly with an AgentViT patch-selection agent (spec
§2.6), or as a baseline with all patches or random masks, then report test accuracy, training time, GFLOPs, images/s.

:func:`run_training` takes a :class:`~rl_prune.config.ViTRunConfig`; results go to ``out/`` (results.json,
summary.md, vit.pt, agent.pt).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

import numpy as np

from agents.vit_ddqn import AllPatches, RandomPatches, ViTDDQN
from agents.vit_ddqn.evaluation import (agent_mask_fn, evaluate_patches, images_per_second, mean_gflops,
                                        random_mask_fn)
from pruning_env.checkpoint import save_checkpoint
from pruning_env.costs import state_macs, vit_gflops
from pruning_env.data import preload
from pruning_env.envs.patch_env import PatchSelectEnv
from pruning_env.runtime import atomic_write_text, resolve_device, seed_everything, sync
from rl_prune.config import ConfigError, ViTRunConfig, load_config


def build_vit_agent(policy: str, env: PatchSelectEnv, agent_kwargs: Mapping[str, Any],
                    seed: int) -> Union[AllPatches, RandomPatches, ViTDDQN]:
    """The agent (or baseline policy) named by ``policy`` on ``env``.

    :param policy: one of :data:`rl_prune.config.VIT_POLICIES`.
    :param env: the patch env.
    :param agent_kwargs: constructor arguments (the config's ``agent`` section).
    :param seed: the run's seed (unless the section sets one).
    """
    kwargs = dict(agent_kwargs)
    kwargs.setdefault("seed", seed)
    if policy == "full":
        return AllPatches(env, **kwargs)
    if policy == "random":
        return RandomPatches(env, **kwargs)
    return ViTDDQN(env, mode=policy, **kwargs)


def needs_same_batch_state(policy: str, agent_kwargs: Mapping[str, Any]) -> bool:
    """Whether the env must compute the same batch's state after each reward step (``same_batch_next_state``, a
    state pass per reward step): only for a DDQN agent that learns from it (``ViTDDQN.next_state_for``: the
    faithful mode's default s'). The run's default for the env key; a config may still set it.

    :param policy: one of :data:`rl_prune.config.VIT_POLICIES`.
    :param agent_kwargs: the agent's constructor arguments (its ``next_state``, if any).
    """
    if policy not in ("faithful", "double_dqn"):
        return False
    return ViTDDQN.next_state_for(policy, agent_kwargs.get("next_state")) == "same_batch"


def run_training(config: Union[ViTRunConfig, Mapping[str, Any]],
                 on_epoch: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """Train the ViT through the patch env with the configured policy and evaluate it on the test split.

    Training time is the synchronised wall time of ``agent.learn`` (ViT steps, state passes, agent updates,
    data loading) minus the per-epoch validation, which is reported separately. With ``eval.val_each_epoch`` the
    results' ``history`` has one record per epoch: ``epoch``, ``time_s`` (training time so far, validation
    excluded), ``val_top1``, ``val_loss`` (all patches), ``train_loss`` (the epoch's mean batch loss),
    ``train_loss_last``, ``kept`` (the epoch's mean kept patches) and ``lr`` (the ViT's learning rate at its end).

    :param config: a checked :class:`ViTRunConfig`, or a (partial) mapping that the loader checks into one.
    :param on_epoch: called with each history record as it is made (outside the clock), e.g. to print progress.
    :return: the results dict (also written to ``out/results.json`` when ``out`` is set).
    :raises ConfigError: a bad setting, naming the dotted key.
    """
    cfg = config if isinstance(config, ViTRunConfig) else load_config(data=config, schema=ViTRunConfig)
    policy, seed = cfg.policy, cfg.seed
    try:
        device = resolve_device(cfg.device)
    except RuntimeError as err:  # CUDA requested but absent
        raise ConfigError(f"device: {err}") from err
    seed_everything(seed)
    env_kwargs = dict(cfg.env)
    env_kwargs.setdefault("observe", policy in ("faithful", "double_dqn"))
    env_kwargs.setdefault("same_batch_next_state", needs_same_batch_state(policy, cfg.agent))
    try:
        env = PatchSelectEnv(device=str(device), seed=seed, **env_kwargs)
    except (TypeError, ValueError, FileNotFoundError) as err:  # a bad env setting the key check cannot see
        raise ConfigError(f"env: {err}") from err
    try:
        agent = build_vit_agent(policy, env, cfg.agent, seed)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"agent (policy {policy}): {err}") from err
    model = env.model
    ev = cfg.eval
    val = preload(env.splits.val, device=device)
    test = preload(env.splits.test, device=device)

    history: List[Dict[str, float]] = []
    eval_time = [0.0]
    epoch_loss: List[float] = []
    epoch_kept: List[int] = []

    def on_step(locals_: Dict[str, Any], _globals: Dict[str, Any]) -> bool:
        info = locals_["info"]
        epoch_loss.append(info["loss"])
        epoch_kept.append(info["kept"])
        if info.get("epoch_end") and ev.val_each_epoch:
            sync(device)
            now = time.perf_counter()
            res = evaluate_patches(model, val, None, device, ev.batch_size)
            record = {"epoch": info["epoch"] + 1, "time_s": now - t0 - eval_time[0], "val_top1": res["top1"],
                      "val_loss": res["loss"], "train_loss": float(np.mean(epoch_loss)),
                      "train_loss_last": info["loss"], "kept": float(np.mean(epoch_kept)),
                      "lr": float(env.optimizer.param_groups[0]["lr"])}
            history.append(record)
            if on_epoch is not None:
                on_epoch(record)
            sync(device)
            eval_time[0] += time.perf_counter() - now
        if info.get("epoch_end"):
            epoch_loss.clear()
            epoch_kept.clear()
        return True

    sync(device)
    t0 = time.perf_counter()
    agent.learn(total_timesteps=env.total_steps, callback=on_step, progress_bar=cfg.progress)
    sync(device)
    train_time = time.perf_counter() - t0 - eval_time[0]

    kept = np.asarray(agent.kept_history)
    results: Dict[str, Any] = {
        "policy": policy, "seed": seed, "device": str(device), "dataset": env.splits.name,
        "model": dict(getattr(model, "zoo_config", {})), "epochs": env.epochs, "batch_size": env.batch_size,
        "batches_per_epoch": env.batches_per_epoch,
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

    bs = ev.batch_size
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
    if ev.throughput:
        tb = ev.throughput_batch
        results["images_per_s_all"] = images_per_second(model, None, tb, device)
        results["images_per_s_kept"] = images_per_second(model, k_eval, tb, device)

    env.close()  # the training loader's worker processes; the trained model stays usable
    if cfg.out:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        save_checkpoint(model, out / "vit.pt", policy=policy, seed=seed)
        agent.save(out / "agent.pt")
        results["config"] = cfg.to_dict()
        atomic_write_text(json.dumps(results, indent=2, default=str), out / "results.json")
        atomic_write_text(summary_markdown(results), out / "summary.md")
    return results


def summary_markdown(r: Dict[str, Any]) -> str:
    """A short human-readable summary of one run.

    :param r: the results of :func:`run_training`.
    """
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


__all__ = ["run_training", "build_vit_agent", "needs_same_batch_state", "summary_markdown"]
