"""The prune run as a function: build the env and the agent from a config, search, fine-tune the best pruned
model with knowledge distillation, report and export into a run folder; resumable from its checkpoint.

``run(cfg)`` is what ``train_agent.py`` and the benchmarks call; ``build_env`` / ``build_agent`` turn a config into
the env and the agent of one registered agent kind (``agents.registry.AGENTS``).
"""
from __future__ import annotations

import copy
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from stable_baselines3.common.callbacks import BaseCallback

from agents.common.monitor import PruneMonitor
from agents.registry import AGENTS, SB3_CONFIG_DIR, agent_class, env_class
from pruning_env.costs import Cost, count_costs, reductions
from pruning_env.runtime import rng_state, seed_everything, set_rng_state
from pruning_env.training import evaluate, finetune
from rl_prune.config import ConfigError, PruneRunConfig, sb3_keys
from rl_prune.run_folder import RunCheckpoint, RunFolder, RunFolderError

#: config sections that do not change results (the output folder and progress bars, the run's name; the agent is
#: checked on its own, so the run folder's config.yaml, which names it, resumes too)
NOT_COMPARED = ("run", "name", "agent")


class ResumeMismatch(ConfigError):
    """``--resume`` found a checkpoint of another agent or another config; nothing was changed."""


# ------------------------------------------------------------------------------------------- env and agent

def build_env(cfg: PruneRunConfig, name: str) -> Any:
    """The env for agent ``name`` under ``cfg`` (:meth:`PruneRunConfig.env_kwargs`): a PruneEnv, or the registry's
    ``env_class`` (AMC's LayerwisePruneEnv, which wraps a PruneEnv of the same arguments).

    :param cfg: the run's config.
    :param name: agent name (``agents.registry.AGENTS``).
    """
    return env_class(name)(**cfg.env_kwargs(name))


def sb3_hyperparams(algo: str, cfg_agent: Dict[str, Any], env_id: Optional[str],
                    config: Optional[str] = None, agent: Optional[type] = None) -> Dict[str, Any]:
    """Zoo hyperparameters of ``algo`` (``configs/sb3/{config or algo}.yaml`` or ``cfg_agent["config"]``) with the
    config's per-agent overrides applied.

    :param algo: SB3 algorithm name.
    :param cfg_agent: the config's ``agents.{algo}`` section.
    :param env_id: registered env id of the task, to pick an env-specific zoo entry.
    :param config: stem of the zoo file when it is not ``algo`` (the registry's ``sb3_config``).
    :param agent: the agent class, whose own constructor arguments are valid keys too (e.g. AMC's ``warmup``).
    """
    from agents.sb3_baselines import load_zoo_hyperparams

    path = cfg_agent.get("config") or SB3_CONFIG_DIR / f"{config or algo}.yaml"
    hp = load_zoo_hyperparams(algo, path, env_id)
    allowed = sb3_keys(algo, agent) - {"config", "env"}
    bad = sorted(set(hp) - allowed)
    if bad:
        raise ConfigError(f"{path}: unknown {algo} hyperparameters {bad}; valid keys: {', '.join(sorted(allowed))}")
    hp.update({k: v for k, v in cfg_agent.items() if k not in ("config", "env")})
    return hp


def build_agent(cfg: PruneRunConfig, name: str, env: Any,
                tensorboard_log: Optional[str] = None) -> Tuple[Any, Dict[str, Any]]:
    """The agent and the keyword arguments of its ``learn`` call.

    The config's ``budget`` (evaluations) becomes ``total_timesteps`` of an SB3 baseline (less the final
    deterministic episode's evaluations, so that it uses exactly the budget) and
    ``budget // n_steps`` look-aheads per step of a search agent.

    :param cfg: the run's config.
    :param name: agent name.
    :param env: the env from :func:`build_env`.
    :param tensorboard_log: TensorBoard folder (None: no TensorBoard).
    """
    spec = AGENTS[name]
    cls = agent_class(name)
    cfg_agent = dict(cfg.agents.get(name) or {})
    learn: Dict[str, Any] = {}
    if spec.sb3_algo is not None:
        hp = sb3_hyperparams(spec.sb3_algo, cfg_agent, cfg.env.get("id"), spec.sb3_config, cls)
        n_timesteps = int(hp.pop("n_timesteps", 1000))
        agent = cls(env, algo=spec.sb3_algo, seed=cfg.seed, tensorboard_log=tensorboard_log, **hp)
        if cfg.budget is not None:
            # the final deterministic episode's evaluations count towards the budget too (agent.budget_timesteps)
            try:
                learn["total_timesteps"], agent.budget_schedule = agent.budget_timesteps(int(cfg.budget))
            except ValueError as err:
                raise ConfigError(f"budget: {name}: {err}") from err
        else:
            learn["total_timesteps"] = n_timesteps
        return agent, learn
    kwargs = {**spec.kwargs, **cfg.agent_kwargs(name)}
    if spec.budget_arg is not None and cfg.budget is not None:
        kwargs[spec.budget_arg] = max(1, int(cfg.budget) // int(env.n_steps))
    schedule = None
    if cfg.budget is not None and spec.target == "agents.rl_pruner:RLPrunerAgent":
        kwargs["lr_epoch"], schedule = rl_pruner_schedule(name, int(cfg.budget), int(env.n_steps), kwargs)
    # equal budgets: every agent's monitor stops look-aheads at the budget, counted by the env for all alike
    monitored = PruneMonitor(env, max_evaluations=int(cfg.budget)) if cfg.budget is not None else env
    agent = cls(monitored, seed=cfg.seed, tensorboard_log=tensorboard_log, **kwargs)
    agent.budget_schedule = schedule or getattr(agent, "budget_schedule", None)  # or the agent's own account
    return agent, learn


def rl_pruner_costs(kwargs: Mapping[str, Any]) -> Tuple[int, int, int]:
    """RL-Pruner's evaluation costs from its constructor arguments: ``(sample_num, evaluations per Q value
    (1 + K + ... + K^(sample_step-1)), evaluations reserved per step for the improved guard's reset point)``; an RL
    epoch costs ``sample_num`` Q values.

    :param kwargs: ``sample_num`` (default 10), ``sample_step`` (1), ``collapse_reference`` ("previous").
    """
    sample_num = int(kwargs.get("sample_num", 10))
    sample_step = int(kwargs.get("sample_step", 1))
    q_cost = sum(sample_num ** d for d in range(sample_step))
    reserve = q_cost if kwargs.get("collapse_reference", "previous") == "reset_candidate" else 0
    return sample_num, q_cost, reserve


def rl_pruner_schedule(name: str, budget: int, n_steps: int, kwargs: Dict[str, Any]) -> Tuple[int, str]:
    """RL epochs per pruning step that spend ``budget`` evaluations: ``budget // n_steps`` per step, each RL epoch
    scoring ``sample_num`` Q values of ``1 + K + ... + K^(sample_step-1)`` evaluations, less the improved guard's
    reset point (one Q value per step). The config's ``lr_epoch`` is replaced.

    :param name: agent name, for messages.
    :param budget: the run's evaluation budget.
    :param n_steps: pruning steps of the episode.
    :param kwargs: the agent's constructor arguments (``sample_num``, ``sample_step``, ``collapse_reference``).
    :raises ConfigError: the budget does not pay for one RL epoch per step, naming the numbers.
    """
    sample_num, q_cost, reserve = rl_pruner_costs(kwargs)
    per_step = budget // max(1, n_steps)
    epoch_cost = sample_num * q_cost
    lr_epoch = (per_step - reserve) // epoch_cost
    if lr_epoch < 1:
        raise ConfigError(f"budget: {budget} evaluations over {n_steps} pruning steps give {per_step} per step, "
                          f"fewer than one RL epoch of {name} needs ({epoch_cost} = sample_num {sample_num} x "
                          f"{q_cost} per Q value" + (f", plus {reserve} for the reset point" if reserve else "")
                          + f"); raise the budget to >= {n_steps * (epoch_cost + reserve)} or lower sample_num")
    given = kwargs.get("lr_epoch")
    text = (f"{n_steps} steps x {lr_epoch} RL epochs x {sample_num} samples"
            + (f" x {q_cost} evaluations per Q value" if q_cost > 1 else "")
            + (f" + {reserve} reset point per step" if reserve else "")
            + f" = {n_steps * (lr_epoch * epoch_cost + reserve)} evaluations, derived from budget {budget}"
            + (f" (config lr_epoch {given} replaced)" if given is not None and int(given) != lr_epoch else ""))
    return lr_epoch, text


# ------------------------------------------------------------------------------------------------- resume

class CheckpointEvery(BaseCallback):
    """Calls ``save("search")`` every ``every`` pruning steps (0: never).

    :param save: writes the run checkpoint of the given phase.
    :param every: pruning steps between checkpoints.
    """

    def __init__(self, save: Callable[[str], None], every: int) -> None:
        super().__init__()
        self.save, self.every = save, int(every)

    def _on_step(self) -> bool:
        if self.every > 0 and self.model.num_timesteps % self.every == 0:
            self.save("search")
        return True


def check_resume(saved: RunCheckpoint, cfg: PruneRunConfig, name: str, path: Path) -> None:
    """Refuse a checkpoint made by another agent or with another config (in results), before anything is written.

    :param saved: the checkpoint read from the run folder.
    :param cfg: the config of the resuming run.
    :param name: the agent of the resuming run.
    :param path: the checkpoint file, for messages.
    :raises ResumeMismatch: naming the agent, or the config sections that differ.
    """
    if saved.agent_name != name:
        raise ResumeMismatch(f"{path} is a run of agent {saved.agent_name!r}, not {name!r}; pass "
                             f"--agent {saved.agent_name}")
    old, new = _comparable(saved.config), _comparable(cfg.to_dict())
    if old != new:
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise ResumeMismatch(f"the config differs from the one the checkpoint was made with (sections {diff}); "
                             f"resume with the same config and overrides")


def _comparable(config: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in config.items() if k not in NOT_COMPARED}


# ------------------------------------------------------------------------------------------------- report

def model_report(model: torch.nn.Module, env: Any, batch_size: int) -> Dict[str, Any]:
    """Validation and test accuracy, MACs and params of ``model`` on the env's task.

    :param model: a model on the env's device.
    :param env: the PruneEnv (its splits, input size and device).
    :param batch_size: evaluation batch size.
    """
    cost = count_costs(model, env.input_size, device=env.device)
    val = evaluate(model, env.splits.val, env.device, batch_size=batch_size)
    test = evaluate(model, env.splits.test, env.device, batch_size=batch_size)
    return {"val_top1": val["top1"], "test_top1": test["top1"], "test_top5": test["top5"],
            "macs": int(cost.macs), "params": int(cost.params)}


def bn_reestimated_report(model: torch.nn.Module, env: Any, batch_size: int) -> Optional[Dict[str, Any]]:
    """:func:`model_report` of ``model`` after the BatchNorm re-estimation the env's ``adaptive_bn`` reward applies
    (on a copy; the same training images): what the search's reward saw. None for the other estimators, or a model
    without BatchNorm.

    :param model: the pruned model (left unchanged).
    :param env: the PruneEnv it was searched on.
    :param batch_size: evaluation batch size.
    """
    from pruning_env.envs.reward import recalibrate_bn

    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if env.config.reward_estimator != "adaptive_bn" or not has_bn or env.task.estimator_data is None:
        return None
    net = recalibrate_bn(model, env.task.estimator_data, n_images=int(env.config.reward_train_images))
    return model_report(net, env, batch_size)


def latency_record(env: Any, kept: np.ndarray) -> Dict[str, Any]:
    """The run's latency setting (``metrics.json``'s ``latency``): the env's ``latency_*`` device setting, the
    table's grid and cache, the pruner options that define its groups (what ``evaluate.py`` needs to rebuild the same
    table), and the predicted latencies of the original and the kept channels when the env built a latency model
    (a latency target or budget, or ``gamma != 0``; otherwise ``predicted`` is None).

    :param env: the PruneEnv of the run.
    :param kept: kept channels per group of the best episode.
    """
    from dataclasses import asdict

    cfg = env.config
    record: Dict[str, Any] = {
        "setting": asdict(cfg.latency_setting()), "grid": [float(f) for f in cfg.latency_grid],
        "cache": None if cfg.latency_cache is None else str(cfg.latency_cache),
        "pruner": {"ignore_layers": list(cfg.ignore_layers), "min_channels": int(cfg.min_channels),
                   "round_to": int(cfg.round_to), "prune_normalized": bool(cfg.prune_normalized)},
        "predicted": None,
    }
    model = env.latency_model
    if model is not None:
        original, pruned = float(model.original), float(model.predict(kept))
        record["predicted"] = {"original_s": original, "pruned_s": pruned, "reduction": 1.0 - pruned / original,
                               "speedup": original / pruned, "from_cache": bool(getattr(model, "from_cache", False))}
    return record


def plot_distribution(env: Any, agent: Any, kept: np.ndarray, path: Path) -> None:
    """PNG: the learned per-group pruning distribution (or the realised share of removed channels) and the
    kept vs original channels per group.

    :param env: the PruneEnv (group names, original channels, layers per group).
    :param agent: the agent (its ``pd`` when it learns one).
    :param kept: kept channels per group of the best episode.
    :param path: the PNG file.
    """
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

        ax.bar(x - 0.2, initial_distribution(orig, k), 0.4, label="initial PD (width-proportional)", color="#bbbbbb")
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


# ----------------------------------------------------------------------------------------------- fine-tune

def finetune_pruned(cfg: PruneRunConfig, model: torch.nn.Module, env: Any, seed: int) -> Dict[str, Any]:
    """The run's final fine-tune of ``model`` in place (``cfg.finetune``: KD from the env's original model by
    default), every random draw from ``seed``; returns its statistics ({} for ``finetune.epochs`` 0) and leaves the
    model in eval mode.

    :param cfg: the run's config.
    :param model: the pruned model, on the env's device.
    :param env: the PruneEnv of the task (its splits, original model and device).
    :param seed: seed of the fine-tune (dropout, augmentation, batch order).
    """
    ft = cfg.finetune
    seed_everything(seed)
    stats: Dict[str, Any] = {}
    if ft.epochs > 0:
        stats = finetune(model, env.splits.train, val_data=env.splits.val, epochs=ft.epochs,
                         max_batches=ft.max_batches, lr=ft.lr, min_lr=ft.min_lr, warmup_ratio=ft.warmup_ratio,
                         teacher=env.original_model if ft.teacher == "original" else None, T=ft.T,
                         soft_weight=ft.soft_weight, batch_size=ft.batch_size, device=env.device, seed=seed,
                         progress=cfg.run.progress)
    model.eval()
    return stats


def finetune_searched(cfg: PruneRunConfig, folder: Union[RunFolder, str, Path], seed: Optional[int] = None,
                      env: Any = None) -> Dict[str, Any]:
    """Fine-tune the searched model of a run folder (rebuilt from the env's original model and checked by
    :meth:`RunFolder.read_searched_model`) with ``cfg``'s recipe and ``seed``: the run's own fine-tune for
    ``seed = cfg.seed``, another draw of it otherwise. Nothing is written.

    :param cfg: the config of the fine-tune (the run's, or another ``finetune`` section).
    :param folder: a run folder whose search finished.
    :param seed: seed of the fine-tune (default ``cfg.seed``).
    :param env: a PruneEnv of the run's task (default: built from ``cfg`` for the folder's agent).
    :return: ``{"seed", "report"`` (:func:`model_report` after the fine-tune), ``"finetune"`` (its statistics
        without the history), ``"seconds"}``.
    """
    folder = folder if isinstance(folder, RunFolder) else RunFolder(folder)
    own_env = env is None
    if own_env:
        env = build_env(cfg, folder.read_config().get("agent") or cfg.agent)
    try:
        model = folder.read_searched_model(env.original_model).to(env.device)
        seed = cfg.seed if seed is None else int(seed)
        t0 = time.perf_counter()
        stats = finetune_pruned(cfg, model, env, seed)
        seconds = time.perf_counter() - t0
        report = model_report(model, env, cfg.run.eval_batch_size)
    finally:
        if own_env:
            env.close()
    return {"seed": seed, "report": report, "finetune": {k: v for k, v in stats.items() if k != "history"},
            "seconds": seconds}


# ---------------------------------------------------------------------------------------------------- run

def run(cfg: PruneRunConfig, agent_name: Optional[str] = None, run_dir: Union[str, Path, None] = None,
        resume: bool = False, callbacks: Sequence[BaseCallback] = (), overwrite: bool = False) -> Dict[str, Any]:
    """Prune with one agent, fine-tune, evaluate and write the run folder; returns the metrics.

    Every phase (building the task, the search, the fine-tune) starts from ``cfg.seed``, so a run's result does
    not depend on what ran before it in the process (e.g. pretraining a missing checkpoint). A ``resume`` that
    is refused (another agent, another config, an agent that cannot resume) writes nothing.

    :param cfg: a checked config (:func:`rl_prune.config.load_config`).
    :param agent_name: agent to run (default ``cfg.agent``).
    :param run_dir: output folder (default ``{run.out_dir}/{name}``).
    The run holds the folder's lock (``run.lock``) throughout, and never reuses a folder that holds another run
    unless asked (:func:`check_folder_use`): ``resume`` continues it, ``overwrite`` replaces it.

    :param resume: continue from the folder's checkpoint when it has one.
    :param callbacks: extra SB3 callbacks for ``learn`` (after the checkpoint callback).
    :param overwrite: replace what the folder holds (a finished or unfinished run); never a running one.
    :raises ConfigError: a bad setting, a refused resume (:class:`ResumeMismatch`) or a refused folder
        (:class:`~rl_prune.run_folder.RunFolderError`, :class:`~rl_prune.run_folder.RunFolderLocked`), with a
        one-line message.
    """
    name = agent_name or cfg.agent
    if name not in AGENTS:
        raise ConfigError(f"unknown agent {name!r}; choose from {', '.join(AGENTS)}")
    folder = RunFolder(run_dir if run_dir is not None else Path(cfg.run.out_dir) / cfg.name)
    with folder.lock():
        check_folder_use(folder, resume, overwrite)
        return _run_in_folder(cfg, name, folder, resume, callbacks)


def check_folder_use(folder: RunFolder, resume: bool, overwrite: bool) -> None:
    """Refuse to start in a folder that holds another run unless asked: a finished or resumable run needs
    ``resume`` (to continue it) or ``overwrite`` (to replace it); a finished run has nothing to resume; files that
    are not a run's are never touched. A folder left by a run killed before its first checkpoint is reused.

    :param folder: the run folder (its lock held by this process).
    :param resume: the run continues the folder's checkpoint.
    :param overwrite: the run replaces the folder's contents.
    :raises RunFolderError: naming the folder and the options.
    """
    if resume and overwrite:
        raise ConfigError("--resume continues a run and --overwrite replaces it: pass one of them")
    status = folder.status
    if status == "other":
        raise RunFolderError(f"{folder.path} holds files that are not a run's; pick another run name (--name)")
    if resume and status == "finished":
        raise RunFolderError(f"{folder.path} holds a finished run (metrics.json): nothing to resume. Evaluate it "
                             f"(python evaluate.py {folder.path}), start a new run without --resume (it writes the "
                             f"next free name) or replace it with --overwrite")
    if not resume and not overwrite and status in ("finished", "resumable"):
        what = "a finished run" if status == "finished" else "an unfinished run with a checkpoint"
        raise RunFolderError(f"{folder.path} holds {what}; pass --resume to continue it or --overwrite to replace "
                             f"it (train_agent.py without either writes the next free name, e.g. "
                             f"{folder.path.name}_2)")


def rerank_size(env: Any) -> int:
    """The env's ``final_rerank`` (1, off, for an env without one)."""
    return int(getattr(getattr(env, "config", None), "final_rerank", 1) or 1)


def final_rerank(env: Any, best: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The env's ``final_rerank`` at the end of a search (:meth:`PruneEnv.rerank_finalists`): None when it is off;
    else its record: ``k``, the held-out scores of every finalist, the chosen one and the re-scores it cost (apart
    from the search's ``n_evaluations``; 0 when fewer than two candidates were evaluated), with ``best``: the
    search's best episode with the chosen candidate's model, kept channels and search accuracy in its place
    (``actions`` None when another candidate than the episode's final one was chosen: the action that gave it is
    not kept)."""
    size = rerank_size(env)
    if size <= 1:
        return None
    choice = env.rerank_finalists()
    if choice is None:
        print("final_rerank: fewer than two final candidates were evaluated; the search's own choice is kept",
              file=sys.stderr)
        return {"k": size, "evaluations": 0, "finalists": [], "chosen": None, "changed": False, "best": best}
    same = choice["kept_channels"] == np.asarray(best["info"]["kept_channels"], dtype=np.int64).tolist()
    new_best = {**best, "model": choice["model"], "kept_indices": [np.asarray(k).tolist() for k in
                                                                    choice["kept_indices"]],
                "info": {**best["info"], "kept_channels": choice["kept_channels"], "accuracy": choice["accuracy"]},
                "actions": best["actions"] if same else None}
    record = {k: v for k, v in choice.items() if k not in ("model", "kept_indices", "reductions")}
    record.update(k=size, changed=not same, best=new_best)
    print(f"final_rerank: {choice['evaluations']} finalists re-scored on {choice['holdout_images']} held-out "
          f"validation images; kept #{choice['chosen'] + 1} by search reward (held-out reward "
          f"{choice['holdout_reward']:.4f}, search reward {choice['reward']:.4f})"
          + ("" if not same else ": the search's own choice"), file=sys.stderr)
    return record


def _run_in_folder(cfg: PruneRunConfig, name: str, folder: RunFolder, resume: bool,
                   callbacks: Sequence[BaseCallback]) -> Dict[str, Any]:
    """:func:`run` once the folder is locked and may be used."""
    progress = cfg.run.progress
    saved: Optional[RunCheckpoint] = None
    if resume and not folder.has_checkpoint:
        print(f"no checkpoint in {folder.path}: starting a new run", file=sys.stderr)
    if resume and folder.has_checkpoint:
        ckpt_path = folder.file(RunFolder.CHECKPOINT)
        try:
            saved = folder.read_checkpoint()
        except ValueError as err:
            raise ConfigError(f"cannot resume from {ckpt_path}: {err}") from err
        check_resume(saved, cfg, name, ckpt_path)

    t_start = time.perf_counter()
    seed_everything(cfg.seed)  # phase 1: the task (model init, auto-pretraining, calibration data)
    try:
        env = build_env(cfg, name)
    except (TypeError, ValueError, FileNotFoundError, RuntimeError) as err:  # bad settings, files or device
        raise ConfigError(f"env of agent {name!r}: {err}") from err
    try:
        agent, learn_kwargs = build_agent(cfg, name, env, tensorboard_log=str(folder.tensorboard_dir))
    except (TypeError, ValueError) as err:  # bad agent arguments in the config
        raise ConfigError(f"agents.{name}: {err}") from err
    if saved is not None and rerank_size(env) > 1:
        raise ConfigError(f"--resume with final_rerank={rerank_size(env)}: its finalists live in the env's "
                          f"memory only and were lost with the killed run; rerun without --resume")
    if saved is not None and not agent.supports_resume:
        raise ConfigError(f"--resume is not supported by agent {name!r} (its supports_resume is False); rerun "
                          f"without it")
    if cfg.budget is not None and AGENTS[name].sb3_algo is None and AGENTS[name].budget_arg is None \
            and getattr(agent, "budget_schedule", None) is None:
        print(f"note: budget={cfg.budget} does not apply to {name!r} except as a cap: the evaluations it uses "
              f"are set by its own arguments (see docs/agents.md); look-aheads past the cap are stopped",
              file=sys.stderr)
    if saved is None:
        folder.clear()  # a new run starts from nothing: an overwritten run's files, or a killed one's leftovers
    folder.write_config({**cfg.to_dict(), "agent": name})
    print(f"run folder: {folder.path}", file=sys.stderr)
    if getattr(agent, "budget_schedule", None):
        print(f"{name} schedule: {agent.budget_schedule}", file=sys.stderr)

    def save_checkpoint(phase: str) -> None:
        folder.write_checkpoint(RunCheckpoint(phase=phase, agent_name=name, config=cfg.to_dict(),
                                              timesteps=agent.num_timesteps, agent_state=agent.checkpoint_state(),
                                              rng=rng_state()))

    phase = "new"
    if saved is None:
        seed_everything(cfg.seed)  # phase 2: the search, whatever building the task consumed
    else:
        agent.restore_checkpoint_state(saved.agent_state)
        set_rng_state(saved.rng)
        phase = saved.phase
        if phase == "search" and not agent.episode_active and agent.episodes > 0 \
                and learn_kwargs.get("total_timesteps") is None:
            phase = "search_done"  # killed after the last step's checkpoint: the episode is complete
        print(f"resumed {folder.path} from its checkpoint ({phase}, step {agent.num_timesteps})", file=sys.stderr)
    cbs: List[BaseCallback] = []
    if agent.supports_resume:
        cbs.append(CheckpointEvery(save_checkpoint, cfg.run.checkpoint_every))
    cbs.extend(callbacks)
    t_search = time.perf_counter()
    try:
        if phase != "search_done":
            agent.learn(callback=cbs, progress_bar=progress, tb_log_name=name, reset_num_timesteps=phase == "new",
                        **learn_kwargs)
            if agent.supports_resume:
                save_checkpoint("search_done")
    finally:
        agent.close()  # worker processes (SB3 with n_envs > 1)
    search_seconds = time.perf_counter() - t_search
    best = agent.best
    if best is None:
        raise RuntimeError(f"agent {name!r} finished no episode; give it more steps (budget / n_timesteps)")
    rerank = final_rerank(env, best)
    if rerank is not None:
        best = rerank.pop("best")

    bs = cfg.run.eval_batch_size
    pruned = copy.deepcopy(best["model"]).to(env.device)
    original = env.original_model
    if best.get("kept_indices") is not None:
        folder.write_searched_model(pruned, original, best["kept_indices"], env.input_size,
                                    {"ignore": env.config.ignore_layers,
                                     "prune_normalized": env.config.prune_normalized},
                                    source_name=cfg.env.get("checkpoint"))
    else:
        print(f"note: the env of {name!r} does not track kept-channel indices (kept_indices): no "
              f"{RunFolder.SEARCHED_MODEL} in {folder.path}", file=sys.stderr)
    report = {"original": model_report(original, env, bs), "pruned_before_finetune": model_report(pruned, env, bs),
              "pruned_bn_reestimated": bn_reestimated_report(pruned, env, bs)}
    t_ft = time.perf_counter()
    ft_stats = finetune_pruned(cfg, pruned, env, cfg.seed)  # phase 3, from cfg.seed as in every other run
    finetune_seconds = time.perf_counter() - t_ft
    report["pruned"] = model_report(pruned, env, bs)

    example = torch.randn(2, *env.input_size) if cfg.run.export_torchscript else None
    ts_method = folder.write_models(original, pruned, example)
    kept = np.asarray(best["info"]["kept_channels"], dtype=np.int64)
    plot_distribution(env, agent, kept, folder.file(RunFolder.DISTRIBUTION_PLOT))
    folder.write_steps(agent.history)

    orig, prn = report["original"], report["pruned"]
    reduced = reductions(Cost(prn["macs"], prn["params"]), Cost(orig["macs"], orig["params"]))
    env_kwargs = cfg.env_kwargs(name)
    dataset = env_kwargs.get("dataset")
    pd = getattr(agent, "pd", None)
    metrics = {
        "name": cfg.name, "agent": name, "seed": cfg.seed, "device": str(env.device), "dataset": env.splits.name,
        "data": {"dataset": dataset if isinstance(dataset, str) else env.splits.name,
                 "data_root": str(env_kwargs.get("data_root", "data")), "val_size": env.val_size,
                 "split_seed": env.split_seed},
        "input_size": list(env.input_size),
        "target": env.target, "target_metric": env.episode_metric, "n_steps": env.n_steps,
        "action_mode": env.action_mode, "alpha": env.alpha, "beta": env.beta, "gamma": float(env.config.gamma),
        "latency": latency_record(env, kept),
        "n_evaluations": agent.n_evaluations, "budget": cfg.budget, "final_rerank": rerank,
        "budget_schedule": getattr(agent, "budget_schedule", None), "timesteps": agent.num_timesteps,
        "best_episode": best["episode"], "best_reward": best["reward"],
        "reward_accuracy": best["info"]["accuracy"], "reward_estimator": env.config.reward_estimator,
        "flops_reduction": reduced.flops, "params_reduction": reduced.params,
        "speedup_macs": orig["macs"] / max(prn["macs"], 1),
        "group_names": list(env.group_names), "original_channels": np.asarray(env.original_channels).tolist(),
        "kept_channels": kept.tolist(), "actions": best["actions"],
        "pd": None if pd is None else [float(p) for p in pd],
        **report,
        "finetune": {k: v for k, v in ft_stats.items() if k != "history"} | {"config": cfg.to_dict()["finetune"]},
        "torchscript": ts_method,
        "seconds": {"search": search_seconds, "finetune": finetune_seconds,
                    "total": time.perf_counter() - t_start},
    }
    folder.write_metrics(metrics)
    env.close()
    return metrics


__all__ = ["run", "build_env", "build_agent", "final_rerank", "finetune_pruned", "finetune_searched", "rl_pruner_schedule", "sb3_hyperparams", "check_resume", "check_folder_use", "ResumeMismatch",
           "CheckpointEvery", "model_report", "latency_record", "bn_reestimated_report", "plot_distribution", "NOT_COMPARED"]
