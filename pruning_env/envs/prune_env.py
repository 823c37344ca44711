"""RL-Pruner as a Gymnasium environment: one episode prunes a pretrained CNN from its original state to a
target sparsity in ``n_steps`` steps; the action is a per-group sparsity vector (or pruning distribution).

Reward (spec §3, on held-out validation images, never the test set):
``accuracy + alpha * (1 - MACs/MACs0) + beta * (1 - params/params0)``. Look-ahead (``evaluate_action``,
``snapshot``/``restore``) lets agents score candidate actions from one state with the importance cached.
"""
from __future__ import annotations

import copy
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
from gymnasium import spaces

from pruning_env.checkpoint import default_checkpoint_path, load_model
from pruning_env.runtime import resolve_device, sync
from pruning_env.costs import Cost, count_costs, layer_macs
from pruning_env.data import DatasetSplits, make_datasets, preload
from pruning_env.envs.budget import (bisect_increasing, channel_sparsity, charged, cumulative_goal,
                                     distribution_to_counts, normalize_distribution, step_channel_budget)
from pruning_env.training import evaluate, finetune

ACTION_MODES = ("sparsity", "distribution")
METRICS = ("flops", "channels", "params")
RECOVERY_MODES = (None, "kd", "ce")
#: validation images held out when neither the caller nor the checkpoint says (10% of CIFAR's training set)
DEFAULT_VAL_SIZE = 5000
#: per-group observation features, in order
GROUP_FEATURES = ("original_channels", "remaining_fraction", "flops_share", "params_share", "importance",
                  "position")
#: global observation features, in order (appended after the per-group block)
GLOBAL_FEATURES = ("step_fraction", "flops_reduction", "params_reduction", "channel_sparsity", "accuracy",
                   "target")


@dataclass
class _Candidate:
    """A pruned model built from one state and one action, with everything the reward needs."""

    model: nn.Module
    plan: Any  # pruning_env.pruning.PrunePlan the model was built from (the next state's pruner derives from it)
    keep: np.ndarray
    cost: Cost
    accuracy: float
    step_budget: float
    time_prune: float
    time_eval: float


@dataclass
class _State:
    """One node of the pruning trajectory. States are never modified after creation (except their
    candidate cache), so a snapshot is just a reference."""

    model: nn.Module
    pruner: Any  # pruning_env.pruning.Pruner, None at terminal states (no further pruning possible)
    channels: np.ndarray
    cost: Cost
    accuracy: float
    step_index: int
    terminated: bool
    truncated: bool
    group_macs: np.ndarray
    group_params: np.ndarray
    importance: np.ndarray
    candidates: "OrderedDict[bytes, _Candidate]" = field(default_factory=OrderedDict)


def _importance_means(result: Any, pruner: Any, n_groups: int) -> np.ndarray:
    """Mean channel importance per group from whatever ``compute_importance`` returned (or cached)."""
    scores = result if result is not None else getattr(pruner, "importance", None)
    if isinstance(scores, dict):
        scores = [scores[g.name] if g.name in scores else scores.get(i) for i, g in enumerate(pruner.groups)]
    means = np.zeros(n_groups)
    if scores is None or len(scores) != n_groups:
        return means
    for i, s in enumerate(scores):
        if s is None:
            continue
        v = s.detach().float().cpu().numpy() if isinstance(s, torch.Tensor) else np.asarray(s, dtype=np.float64)
        v = v[np.isfinite(v)] if v.size else v
        means[i] = float(np.abs(v).mean()) if v.size else 0.0
    return means


def _group_costs(model: nn.Module, members: Sequence[Sequence[str]], input_size: Tuple[int, ...],
                 device: torch.device) -> Tuple[np.ndarray, np.ndarray]:
    """MACs and parameters of each group's member layers (the layers whose outputs the group prunes)."""
    modules = dict(model.named_modules())
    name_of = {id(m): n for n, m in modules.items()}
    macs: Dict[str, int] = {}
    wanted = {n for group in members for n in group if n in modules}

    def hook(module, _inputs, output):
        if isinstance(output, torch.Tensor):
            name = name_of[id(module)]
            macs[name] = macs.get(name, 0) + layer_macs(module, output)

    handles = [modules[n].register_forward_hook(hook) for n in wanted]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros((1, *input_size), device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    g_macs = np.array([sum(macs.get(n, 0) for n in group) for group in members], dtype=np.float64)
    g_params = np.array([sum(p.numel() for n in group if n in modules for p in modules[n].parameters(recurse=False))
                         for group in members], dtype=np.float64)
    return g_macs, g_params


class PruneEnv(gym.Env):
    """Structured channel pruning of a pretrained CNN as a Gymnasium environment (RL-Pruner, spec §2-§3).

    **Episode.** ``reset()`` starts from a fresh copy of the original model; each ``step(action)`` removes
    channels from every prunable group (coupled layers, e.g. a residual add, form one group and share one
    value) and returns the reward of the pruned model. The episode *terminates* when the target is reached:
    with a budget (any ``budget``, and always in ``"distribution"`` mode) after exactly ``n_steps`` steps,
    each step meeting the cumulative goal ``target * step / n_steps``; without a budget when the
    ``target_metric`` reduction is within ``target_tolerance`` of ``target``. Budget-free episodes are
    *truncated* after ``max_steps`` steps (default ``4 * n_steps + 6``) or when no channel can be removed.

    **Action.** ``Box(0, 1, (n_groups,), float32)``, two interpretations:

    * ``"sparsity"``: entry g is the fraction of group g's *current* channels removed at this step, clipped to
      ``[0, max_step_sparsity]`` (values outside the space are clipped, not rejected). With ``budget`` set
      (``"flops"``, ``"channels"`` or ``"params"``) the whole vector is rescaled by one scalar (bisection on
      the analytic cost) so that the step meets its cumulative goal exactly (up to channel granularity); an
      all-zero action then counts as uniform, and when the named groups cannot carry the goal even at
      ``max_step_sparsity`` the other groups are raised to a common sparsity floor (never a missed budget).
    * ``"distribution"``: the authors' way (spec §2.1-2.4). The entries are clipped at 0, groups already at
      their channel floor are zeroed, and the rest is normalised (all zero means uniform). The distribution
      splits this step's budget of ``M`` layer-channels with :func:`distribution_to_counts`. For a channel
      budget ``M = int(filter_num * target / n_steps)`` (fixed, ``step_filter_budget``); for FLOPs or params
      ``M`` is found by bisection so the step meets ``target * step / n_steps`` exactly.

    NaN/inf entries or a wrong shape raise ``ValueError``; stepping before ``reset()`` or after the end of the
    episode raises ``RuntimeError``.

    **Reward.** ``accuracy + alpha * flops_reduction + beta * params_reduction``: top-1 (a fraction) of the
    pruned model right after pruning (before any recovery, as the authors), on a fixed seeded subset of
    ``reward_samples`` validation images held out from the training data; reductions are relative to the
    original model (MACs by :func:`pruning_env.costs.count_costs`, the thop convention).

    **Recovery.** ``recovery="kd"`` (distillation from the original model, ``kd_soft_weight * T² * KL +
    (1 - kd_soft_weight) * CE``, spec §5.2) or ``"ce"`` fine-tunes the pruned model after each non-final step
    for ``recovery_batches`` batches (or ``recovery_epochs`` epochs); off by default.

    **Observation.** ``Box(0, 1, (6 * n_groups + 6,), float32)``: per group (grouped by feature, each a block
    of ``n_groups``) ``GROUP_FEATURES`` = original channels / widest group, remaining fraction, MACs and params
    of the group's member layers / original model totals, mean |importance| / largest group mean, position
    in the network; then ``GLOBAL_FEATURES`` = step / n_steps, FLOPs reduction, params reduction, channel
    sparsity, last accuracy (after recovery when on), target.

    **Look-ahead.** :meth:`evaluate_action` scores an action from the current state without advancing
    (the importance of a state is computed once and reused); the last ``lookahead_cache`` candidates are kept
    so ``step()`` with an identical action reuses the built model. :meth:`snapshot` / :meth:`restore` save
    and return to a state for deeper trees (a snapshot is a cheap reference: states are never modified).

    :param model: zoo name (see :func:`pruning_env.models.list_models`) or an ``nn.Module`` (copied, never
        modified); a module needs ``dataset`` as a name or :class:`DatasetSplits`.
    :param dataset: dataset name for :func:`pruning_env.data.make_datasets` or ready splits.
    :param width: zoo channel multiplier.
    :param checkpoint: pretrained weights (default ``checkpoints/{model}[_wW]_{dataset}.pt``).
    :param pretrained: load the checkpoint; False builds an untrained model (seeded) for tests.
    :param auto_pretrain_epochs: when > 0 and the checkpoint is missing, train one first for this many
        epochs (:func:`pruning_env.pretrain.ensure_pretrained`; the quickstart id uses it).
    :param data_root: folder holding torchvision's CIFAR files.
    :param download: let torchvision download CIFAR when missing.
    :param action_mode: ``"sparsity"`` or ``"distribution"`` (see above).
    :param budget: ``None``, ``"flops"``, ``"channels"`` or ``"params"``: rescale actions so each step meets
        its cumulative goal; the episode's target is then measured in this metric.
    :param target: fraction to remove by the end of the episode.
    :param target_metric: ``"flops"``, ``"channels"`` (authors' sparsity) or ``"params"``.
    :param n_steps: pruning steps per episode (1 = one-shot).
    :param alpha: weight of the FLOPs reduction in the reward.
    :param beta: weight of the params reduction in the reward.
    :param reward_samples: validation images the reward is measured on (None = all).
    :param val_size: images held out from training for validation (a count or a fraction). None takes the
        count stored in the checkpoint (``pruning_env.pretrain`` records it), so the reward images are exactly
        the ones held out from pretraining, else ``DEFAULT_VAL_SIZE`` (5000, 10% of CIFAR).
    :param calibration_size: training images per calibration batch for the importance criterion.
    :param calibration_batches: calibration batches.
    :param importance: importance criterion passed to ``Pruner.compute_importance``.
    :param importance_train_mode: compute importance with the model in train mode (authors' BN behaviour).
    :param min_channels: channels every group keeps at least.
    :param round_to: round kept channels to a multiple of this.
    :param max_step_sparsity: largest fraction of a group removed in one step (sparsity mode).
    :param recovery: ``None``, ``"kd"`` or ``"ce"``.
    :param recovery_batches: training batches of recovery per step.
    :param recovery_epochs: epochs of recovery per step (used when ``recovery_batches`` is 0).
    :param recovery_lr: peak learning rate of recovery.
    :param recovery_batch_size: batch size of recovery.
    :param kd_T: distillation temperature.
    :param kd_soft_weight: weight of the distillation term.
    :param ignore_layers: layer names the pruner leaves untouched.
    :param device: ``"cpu"``, ``"cuda"``; None picks CUDA when available.
    :param amp: float16 autocast for the reward evaluation on CUDA. Off by default: every look-ahead candidate
        has new layer shapes, and on an H100 with VGG-19 width 0.25 the per-shape kernel setup made AMP slower
        (first pass 42 vs 27 ms, later passes 5.8 vs 4.5 ms for 1000 images); it pays off on wide models.
    :param channels_last: channels-last evaluation on CUDA (off by default for the same reason).
    :param eval_batch_size: batch size of the reward evaluation.
    :param target_tolerance: how close to the target counts as reached (budget-free episodes).
    :param max_steps: safety cap on budget-free episodes (then ``truncated``).
    :param lookahead_cache: look-ahead candidates kept per state.
    :param record_timings: fill ``time_*`` info keys with wall-clock seconds (0.0 when False, which makes
        infos exactly repeatable, e.g. for Gymnasium's determinism checks).
    :param seed: seed of the reward subset, the calibration batches and untrained weights (0 when None).
    :param split_seed: seed of the train/validation split; None takes the ``seed`` stored in the checkpoint
        (``pruning_env.pretrain`` records it), so reward images are never ones the model was trained on,
        else ``seed``. Auto-pretraining uses the same split.
    """

    metadata = {"render_modes": []}

    def __init__(self, model: Union[str, nn.Module] = "vgg19", dataset: Union[str, DatasetSplits] = "cifar100",
                 width: float = 1.0, checkpoint: Optional[Union[str, Path]] = None, pretrained: bool = True,
                 auto_pretrain_epochs: int = 0, data_root: Union[str, Path] = "data", download: bool = False,
                 action_mode: str = "sparsity", budget: Optional[str] = None, target: float = 0.5,
                 target_metric: str = "flops", n_steps: int = 1, alpha: float = 0.25, beta: float = 0.25,
                 reward_samples: Optional[int] = 1000, val_size: Union[int, float, None] = None,
                 calibration_size: int = 100, calibration_batches: int = 1, importance: str = "taylor",
                 importance_train_mode: bool = False, min_channels: int = 1, round_to: int = 1,
                 max_step_sparsity: float = 0.9, recovery: Optional[str] = None, recovery_batches: int = 0,
                 recovery_epochs: int = 0, recovery_lr: float = 1e-3, recovery_batch_size: int = 128,
                 kd_T: float = 2.0,
                 kd_soft_weight: float = 0.75, ignore_layers: Sequence[str] = (),
                 device: Optional[Union[str, torch.device]] = None, amp: bool = False,
                 channels_last: bool = False, eval_batch_size: int = 500,
                 target_tolerance: float = 0.005, max_steps: Optional[int] = None, lookahead_cache: int = 8,
                 record_timings: bool = True, seed: Optional[int] = None, split_seed: Optional[int] = None,
                 render_mode: Optional[str] = None):
        super().__init__()
        if action_mode not in ACTION_MODES:
            raise ValueError(f"action_mode must be one of {ACTION_MODES}, got {action_mode!r}")
        if target_metric not in METRICS:
            raise ValueError(f"target_metric must be one of {METRICS}, got {target_metric!r}")
        if budget is not None and budget not in METRICS:
            raise ValueError(f"budget must be None or one of {METRICS}, got {budget!r}")
        if recovery not in RECOVERY_MODES:
            raise ValueError(f"recovery must be one of {RECOVERY_MODES}, got {recovery!r}")
        if not 0.0 < float(target) < 1.0:
            raise ValueError(f"target must be a fraction in (0, 1), got {target}")
        if int(n_steps) < 1:
            raise ValueError(f"n_steps must be >= 1, got {n_steps}")
        if not 0.0 < float(max_step_sparsity) < 1.0:
            raise ValueError(f"max_step_sparsity must be in (0, 1), got {max_step_sparsity}")
        if render_mode is not None:
            raise ValueError(f"PruneEnv has no render modes, got render_mode={render_mode!r}")
        self.render_mode = None
        self.action_mode = action_mode
        self.target = float(target)
        self.target_metric = target_metric
        self.n_steps = int(n_steps)
        # the metric each step is matched to: a budget always applies in distribution mode
        self.budget = budget if budget is not None else (target_metric if action_mode == "distribution" else None)
        self.episode_metric = self.budget or target_metric
        self.alpha, self.beta = float(alpha), float(beta)
        self.max_step_sparsity = float(max_step_sparsity)
        self.importance_criterion = importance
        self.importance_train_mode = bool(importance_train_mode)
        self.min_channels, self.round_to = int(min_channels), int(round_to)
        self.recovery = recovery
        self.recovery_batches, self.recovery_epochs = int(recovery_batches), int(recovery_epochs)
        self.recovery_lr, self.kd_T, self.kd_soft_weight = float(recovery_lr), float(kd_T), float(kd_soft_weight)
        self.recovery_batch_size = int(recovery_batch_size)
        self.ignore_layers = tuple(ignore_layers)
        self.target_tolerance = float(target_tolerance)
        self.max_steps = int(max_steps) if max_steps is not None else 4 * self.n_steps + 6
        self.lookahead_cache = max(0, int(lookahead_cache))
        self.record_timings = bool(record_timings)
        self.eval_batch_size = int(eval_batch_size)
        self.seed = 0 if seed is None else int(seed)
        self.device = resolve_device(device)
        cuda = self.device.type == "cuda"
        self.amp = cuda and bool(amp)
        self.channels_last = cuda and bool(channels_last)

        meta = self._checkpoint_meta(model, dataset, width, checkpoint, pretrained)
        # the checkpoint's split (seed and held-out count) by default: reward images were never trained on
        self.split_seed = int(split_seed if split_seed is not None else meta.get("seed", self.seed))
        self.val_size = val_size if val_size is not None else meta.get("val_size", DEFAULT_VAL_SIZE)
        self.splits = self._load_data(dataset, data_root, download, self.val_size)
        self._warn_split_mismatch(meta, dataset)
        self.input_size = tuple(self.splits.input_size)
        net = self._load_model(model, dataset, width, checkpoint, pretrained, auto_pretrain_epochs, data_root,
                               download)
        self.original_model = net.to(self.device).eval()
        self.original_cost = count_costs(self.original_model, self.input_size, device=self.device)
        self._example = torch.zeros((1, *self.input_size), device=self.device)
        self._val = preload(self.splits.val, n=reward_samples, seed=self.seed, device=self.device)
        self._calibration = self._calibration_batches(int(calibration_size), int(calibration_batches))

        probe = self._make_pruner(copy.deepcopy(self.original_model))
        self.group_names: List[str] = [g.name for g in probe.groups]
        self.n_groups = len(self.group_names)
        if self.n_groups == 0:
            raise ValueError("the model has no prunable channel group (every conv/linear is ignored or is the "
                             "classifier); nothing to prune")
        # layers whose cost the group's channels carry: producers plus their BatchNorm/depthwise followers
        self._members = [list(g.members) + list(getattr(g, "followers", ())) for g in probe.groups]
        self.original_channels = np.asarray(probe.num_channels, dtype=np.int64).copy()
        self.layer_counts = np.asarray(probe.layer_counts, dtype=np.int64).copy()
        self.step_filter_budget = step_channel_budget(self.original_channels, self.layer_counts, self.target,
                                                      self.n_steps)
        self._macs_scale = max(float(self.original_cost.macs), 1.0)
        self._params_scale = max(float(self.original_cost.params), 1.0)
        # the initial state (built at the first reset) reuses the probe: its model is a private copy already
        self._probe: Optional[Any] = probe

        self.action_space = spaces.Box(0.0, 1.0, shape=(self.n_groups,), dtype=np.float32)
        self.observation_space = spaces.Box(0.0, 1.0, shape=(len(GROUP_FEATURES) * self.n_groups
                                                             + len(GLOBAL_FEATURES),), dtype=np.float32)
        self._original_accuracy: Optional[float] = None
        self._state: Optional[_State] = None
        self._initial_state: Optional[_State] = None
        # counters live on the env, not on states: restoring a snapshot does not refund evaluations
        self._episode_evaluations = 0
        self.total_evaluations = 0

    # ------------------------------------------------------------------ construction helpers
    def _checkpoint_path(self, model, dataset, width, checkpoint) -> Path:
        ds_name = dataset if isinstance(dataset, str) else dataset.name
        return Path(checkpoint) if checkpoint is not None else default_checkpoint_path(model, ds_name, width)

    def _checkpoint_meta(self, model, dataset, width, checkpoint, pretrained) -> Dict[str, Any]:
        """Metadata of the checkpoint that will be loaded (empty when none is, or it has none)."""
        if not (isinstance(model, str) and pretrained):
            return {}
        path = self._checkpoint_path(model, dataset, width, checkpoint)
        if not path.is_file():
            return {}
        from pruning_env.checkpoint import read_meta

        try:
            return read_meta(path)
        except Exception:  # an unreadable file gets its precise error from load_model
            return {}

    def _warn_split_mismatch(self, meta: Dict[str, Any], dataset) -> None:
        """Warn when the validation split differs from the one the checkpoint was pretrained with."""
        held_out = meta.get("val_size")
        same_data = isinstance(dataset, str) and meta.get("dataset") == dataset
        if held_out is not None and same_data and len(self.splits.val) != int(held_out):
            warnings.warn(f"val_size={self.val_size!r} holds out {len(self.splits.val)} images but the checkpoint "
                          f"was pretrained holding out {int(held_out)}: some reward images were trained on. Leave "
                          f"val_size unset to use the checkpoint's split", stacklevel=3)

    def _load_data(self, dataset, data_root, download, val_size) -> DatasetSplits:
        if isinstance(dataset, DatasetSplits):
            return dataset
        if not isinstance(dataset, str):
            raise TypeError(f"dataset must be a name or DatasetSplits, got {type(dataset).__name__}")
        return make_datasets(dataset, root=data_root, download=download, val_size=val_size, seed=self.split_seed,
                             augment=True)

    def _load_model(self, model, dataset, width, checkpoint, pretrained, auto_pretrain_epochs, data_root,
                    download) -> nn.Module:
        if isinstance(model, nn.Module):
            net = copy.deepcopy(model)  # the caller's module is never touched
        elif not isinstance(model, str):
            raise TypeError(f"model must be a zoo name or an nn.Module, got {type(model).__name__}")
        elif pretrained:
            ds_name = dataset if isinstance(dataset, str) else self.splits.name
            path = self._checkpoint_path(model, dataset, width, checkpoint)
            if not path.is_file() and auto_pretrain_epochs > 0:
                from pruning_env.pretrain import ensure_pretrained

                ensure_pretrained(model, ds_name, width=width, epochs=int(auto_pretrain_epochs), out=path,
                                  data_root=data_root, download=download, device=str(self.device),
                                  val_size=self.val_size, seed=self.split_seed)
            if not path.is_file():
                width_arg = "" if float(width) == 1.0 else f" --width {float(width):g}"
                raise FileNotFoundError(
                    f"pretrained checkpoint not found: {path}. Train it with `python -m pruning_env.pretrain "
                    f"--model {model} --dataset {ds_name}{width_arg} --out {path}`, pass checkpoint=PATH, or use "
                    f"pretrained=False for an untrained model")
            net = load_model(path, map_location="cpu")
        else:
            from pruning_env.models import create_model

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                net = create_model(model, num_classes=self.splits.num_classes, width=width)
        out = self._num_outputs(net)
        if out is not None and out != self.splits.num_classes:
            raise ValueError(f"the model has {out} outputs but dataset {self.splits.name!r} has "
                             f"{self.splits.num_classes} classes; use a checkpoint trained on this dataset")
        return net

    def _num_outputs(self, net: nn.Module) -> Optional[int]:
        cfg = getattr(net, "zoo_config", None)
        if cfg is not None and "num_classes" in cfg:
            return int(cfg["num_classes"])
        was_training = net.training
        net.eval()
        try:
            with torch.no_grad():
                out = net(torch.zeros((1, *self.input_size)))
        except Exception:  # the pruner's trace gives the precise error later
            return None
        finally:
            net.train(was_training)
        out = out[0] if isinstance(out, (tuple, list)) else out
        return int(out.shape[-1]) if isinstance(out, torch.Tensor) and out.dim() == 2 else None

    def _calibration_batches(self, size: int, n_batches: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        if size < 1 or n_batches < 1:
            raise ValueError(f"calibration_size and calibration_batches must be >= 1, got {size}, {n_batches}")
        # the train split is augmented with torch's global RNG: fork it so calibration is seeded and the
        # caller's RNG stream is left alone
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + 1)
            x, y = preload(self.splits.train, n=size * n_batches, seed=self.seed + 1, device=self.device)
        return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]

    def _make_pruner(self, model: nn.Module):
        from pruning_env.pruning import Pruner

        return Pruner(model, self._example, ignore=self.ignore_layers, min_channels=self.min_channels,
                      round_to=self.round_to)

    # ------------------------------------------------------------------ public properties
    @property
    def model(self) -> nn.Module:
        """The current (pruned) model; after ``reset()`` a copy of ``original_model`` shared by all episodes.

        Treat it as read-only (copy it before training it yourself): states, snapshots and look-ahead
        candidates reference their models instead of copying them."""
        return self._require_state().model

    @property
    def current_channels(self) -> np.ndarray:
        """Channels per group in the current state."""
        return self._require_state().channels.copy()

    @property
    def step_index(self) -> int:
        """Steps taken in this episode."""
        return self._require_state().step_index

    @property
    def n_evaluations(self) -> int:
        """Models evaluated in this episode (look-aheads plus steps that did not reuse one);
        ``total_evaluations`` counts over the env's lifetime."""
        return self._episode_evaluations

    @property
    def original_accuracy(self) -> float:
        """Reward-subset top-1 of the original model (evaluated once)."""
        if self._original_accuracy is None:
            self._original_accuracy = self._evaluate(self.original_model)
        return self._original_accuracy

    # ------------------------------------------------------------------ core
    def _require_state(self) -> _State:
        if self._state is None:
            raise RuntimeError("call reset() before using the environment (no episode has started)")
        return self._state

    def _require_active(self) -> _State:
        state = self._require_state()
        if state.terminated or state.truncated:
            raise RuntimeError(f"the episode is over (terminated={state.terminated}, truncated={state.truncated}) "
                               f"after {state.step_index} steps; call reset() to start a new one")
        return state

    def _evaluate(self, model: nn.Module) -> float:
        return float(evaluate(model, self._val, device=self.device, batch_size=self.eval_batch_size,
                              amp=self.amp, channels_last=self.channels_last)["top1"])

    def _make_state(self, model: nn.Module, channels: np.ndarray, cost: Cost, accuracy: float, step_index: int,
                    final: bool, pruner: Any = None) -> Tuple[_State, float]:
        """Build a state; its pruner and importance only when the episode can go on from it.

        :param pruner: the state's pruner: traced for the initial state, ``parent.child(model, plan)`` after a
            step (same groups without a re-trace), None at final states.
        """
        t0 = time.perf_counter()
        importance = np.zeros(self.n_groups)
        stuck = False
        if final:
            pruner = None
        else:
            result = pruner.compute_importance(self._calibration, criterion=self.importance_criterion,
                                               train_mode=self.importance_train_mode)
            importance = _importance_means(result, pruner, self.n_groups)
            sync(self.device)
            stuck = bool(np.all(self._floor_keep(pruner, channels) >= channels))
        time_importance = time.perf_counter() - t0
        g_macs, g_params = _group_costs(model, self._members, self.input_size, self.device)
        truncated = False
        terminated = final
        if not final and self.budget is None:
            truncated = stuck or step_index >= self.max_steps
        state = _State(model=model, pruner=pruner, channels=np.asarray(channels, dtype=np.int64).copy(),
                       cost=cost, accuracy=float(accuracy), step_index=step_index, terminated=terminated,
                       truncated=truncated, group_macs=g_macs, group_params=g_params, importance=importance)
        return state, time_importance

    def _floor_keep(self, pruner, channels: np.ndarray) -> np.ndarray:
        """Fewest channels each group may keep (the pruner's floor and rounding)."""
        return np.minimum(np.asarray(pruner.keep_counts(np.full(self.n_groups, 1.0)), dtype=np.int64), channels)

    def _metric(self, metric: str, keep: np.ndarray, cost: Cost) -> float:
        if metric == "flops":
            return 1.0 - cost.macs / self._macs_scale
        if metric == "params":
            return 1.0 - cost.params / self._params_scale
        return channel_sparsity(keep, self.original_channels, self.layer_counts)

    def _validate_action(self, action: Any) -> np.ndarray:
        try:
            a = np.asarray(action, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise ValueError(f"action must be numeric with shape ({self.n_groups},), got {action!r}") from err
        if a.size != self.n_groups or np.squeeze(a).ndim > 1 or (a.ndim > 1 and a.shape[-1] != self.n_groups):
            raise ValueError(f"action must have shape ({self.n_groups},): one value per prunable group "
                             f"({', '.join(self.group_names[:4])}{', ...' if self.n_groups > 4 else ''}), "
                             f"got shape {a.shape}")
        a = a.reshape(self.n_groups)
        if not np.all(np.isfinite(a)):
            bad = np.flatnonzero(~np.isfinite(a)).tolist()
            raise ValueError(f"action has NaN/inf entries at groups {bad}; every entry must be a finite number "
                             f"in [0, 1]")
        return a

    def _keep_for(self, state: _State, a: np.ndarray) -> Tuple[np.ndarray, float]:
        """Kept channels per group for a validated action, and the step's budget (scale or M)."""
        pruner = state.pruner
        current = state.channels
        goal = cumulative_goal(self.target, state.step_index + 1, self.n_steps)
        metric = self.budget

        seen: Dict[bytes, float] = {}

        def reduction(keep: np.ndarray) -> float:
            # many scales give the same kept counts: cost each distinct plan once
            key = keep.tobytes()
            if key not in seen:
                if metric == "channels":
                    seen[key] = channel_sparsity(keep, self.original_channels, self.layer_counts)
                else:
                    seen[key] = self._metric(metric, keep, pruner.plan_cost(keep=keep))
            return seen[key]

        if self.action_mode == "sparsity":
            s = np.clip(a, 0.0, self.max_step_sparsity)
            if metric is None:
                return self._keep_counts(pruner, s, current), 1.0
            if not np.any(s > 0):
                s = np.full(self.n_groups, self.max_step_sparsity)
            hi = self.max_step_sparsity / float(s[s > 0].min())

            def keep_at(scale: float) -> np.ndarray:
                return self._keep_counts(pruner, np.clip(scale * s, 0.0, self.max_step_sparsity), current)

            # below this bracket width no group's removed count can move by more than 1/100 of a channel
            tol = 1e-2 / max(float((s * current).max()), 1e-12)
            scale, _ = bisect_increasing(lambda x: reduction(keep_at(x)), goal, 0.0, hi, iters=60, tol=tol)
            if reduction(keep_at(scale)) >= goal - 1e-9 or scale < hi:
                return keep_at(scale), float(scale)
            # the groups the action names are all at max_step_sparsity and the goal is still out of reach:
            # raise every group's sparsity to a common floor, as little as needed, instead of missing the budget
            top = np.clip(hi * s, 0.0, self.max_step_sparsity)

            def keep_floor(f: float) -> np.ndarray:
                return self._keep_counts(pruner, np.maximum(top, f), current)

            tol = 1e-2 / max(float(current.max()), 1.0)
            f, _ = bisect_increasing(lambda x: reduction(keep_floor(x)), goal, 0.0, self.max_step_sparsity,
                                     iters=60, tol=tol)
            return keep_floor(f), float(hi)

        floor = self._floor_keep(pruner, current)
        max_remove = current - floor
        dist = normalize_distribution(np.clip(a, 0.0, None), eligible=max_remove > 0)

        def keep_for_budget(m: int) -> np.ndarray:
            return current - distribution_to_counts(dist, self.layer_counts, m, max_remove)

        if metric == "channels":
            m = self.step_filter_budget
        else:
            m, _ = bisect_increasing(lambda x: reduction(keep_for_budget(int(x))), goal, 0,
                                     charged(max_remove, self.layer_counts), integer=True)
        return keep_for_budget(int(m)), float(m)

    def _keep_counts(self, pruner, sparsity: np.ndarray, current: np.ndarray) -> np.ndarray:
        keep = np.asarray(pruner.keep_counts(sparsity), dtype=np.int64)
        return np.minimum(keep, current)

    def _build_candidate(self, state: _State, a: np.ndarray) -> _Candidate:
        t0 = time.perf_counter()
        keep, step_budget = self._keep_for(state, a)
        plan = state.pruner.plan(keep=keep)
        cost = state.pruner.plan_cost(plan)
        model = state.pruner.apply(plan)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        model.eval()
        sync(self.device)
        t1 = time.perf_counter()
        accuracy = self._evaluate(model)
        t2 = time.perf_counter()
        self._episode_evaluations += 1
        self.total_evaluations += 1
        return _Candidate(model=model, plan=plan, keep=keep, cost=cost, accuracy=accuracy, step_budget=step_budget,
                          time_prune=t1 - t0, time_eval=t2 - t1)

    def _candidate(self, state: _State, a: np.ndarray) -> Tuple[_Candidate, bool]:
        key = a.astype(np.float32).tobytes()
        if key in state.candidates:
            state.candidates.move_to_end(key)
            return state.candidates[key], True
        cand = self._build_candidate(state, a)
        if self.lookahead_cache > 0:
            state.candidates[key] = cand
            while len(state.candidates) > self.lookahead_cache:
                state.candidates.popitem(last=False)
        return cand, False

    def _reward(self, accuracy: float, cost: Cost) -> float:
        return (accuracy + self.alpha * (1.0 - cost.macs / self._macs_scale)
                + self.beta * (1.0 - cost.params / self._params_scale))

    def _info(self, accuracy: float, cost: Cost, keep: np.ndarray, step: int, n_evaluations: int,
              time_prune: float = 0.0, time_importance: float = 0.0, time_eval: float = 0.0,
              **extra: Any) -> Dict[str, Any]:
        keep = np.asarray(keep, dtype=np.int64)
        timing = self.record_timings
        info = {
            "accuracy": float(accuracy),
            "reward": float(self._reward(accuracy, cost)),
            "macs": int(cost.macs),
            "params": int(cost.params),
            "macs_ratio": cost.macs / self._macs_scale,
            "params_ratio": cost.params / self._params_scale,
            "flops_reduction": 1.0 - cost.macs / self._macs_scale,
            "params_reduction": 1.0 - cost.params / self._params_scale,
            "channel_sparsity": channel_sparsity(keep, self.original_channels, self.layer_counts),
            "group_sparsity": 1.0 - keep / self.original_channels,
            "kept_channels": keep.copy(),
            "step": int(step),
            "n_evaluations": int(n_evaluations),
            "time_prune": float(time_prune) if timing else 0.0,
            "time_importance": float(time_importance) if timing else 0.0,
            "time_eval": float(time_eval) if timing else 0.0,
        }
        info["target_progress"] = self._metric(self.episode_metric, keep, cost)
        info.update(extra)
        return info

    def _observation(self, state: _State) -> np.ndarray:
        orig = self.original_channels.astype(np.float64)
        n = self.n_groups
        imp = state.importance
        imp = imp / imp.max() if imp.size and imp.max() > 0 else np.zeros(n)
        position = np.arange(n) / max(n - 1, 1)
        group = np.concatenate([
            orig / orig.max(),
            state.channels / orig,
            state.group_macs / self._macs_scale,
            state.group_params / self._params_scale,
            imp,
            position,
        ])
        glob = np.array([
            min(1.0, state.step_index / self.n_steps),
            1.0 - state.cost.macs / self._macs_scale,
            1.0 - state.cost.params / self._params_scale,
            channel_sparsity(state.channels, self.original_channels, self.layer_counts),
            state.accuracy,
            self.target,
        ])
        return np.clip(np.concatenate([group, glob]), 0.0, 1.0).astype(np.float32)

    # ------------------------------------------------------------------ Gymnasium API
    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None) -> Tuple[np.ndarray, dict]:
        """Start an episode from the original model (a private copy, traced and scored on the first reset).

        :param seed: seeds ``np_random`` (used for recovery shuffling); the reward subset and calibration
            data are fixed by the constructor's ``seed``.
        :param options: unused.
        """
        super().reset(seed=seed)
        t_imp = 0.0
        if self._initial_state is None:
            # every episode starts from the same state: trace and score it once (states are immutable)
            t0 = time.perf_counter()
            probe, self._probe = self._probe, None
            pruner = probe if probe is not None else self._make_pruner(copy.deepcopy(self.original_model).eval())
            t_trace = time.perf_counter() - t0
            self._initial_state, t_imp = self._make_state(pruner.model, self.original_channels, self.original_cost,
                                                          self.original_accuracy, 0, final=False, pruner=pruner)
            t_imp += t_trace
        self._state = self._initial_state
        self._episode_evaluations = 0
        info = self._info(self._state.accuracy, self.original_cost, self.original_channels, 0, 0,
                          time_importance=t_imp)
        return self._observation(self._state), info

    def evaluate_action(self, action: Any) -> Tuple[float, Dict[str, Any]]:
        """Reward and info that ``step(action)`` would give, without advancing (look-ahead).

        The state (model, channels, step, observation) is unchanged; only the evaluation counters move.
        The built candidate is cached, so a following ``step`` with the same action does no pruning work.

        :param action: as for :meth:`step`.
        :return: ``(reward, info)``; ``info["cached"]`` says whether an earlier look-ahead was reused.
        """
        state = self._require_active()
        a = self._validate_action(action)
        cand, cached = self._candidate(state, a)
        info = self._info(cand.accuracy, cand.cost, cand.keep, state.step_index + 1, self._episode_evaluations,
                          0.0 if cached else cand.time_prune, 0.0, 0.0 if cached else cand.time_eval,
                          step_budget=cand.step_budget, cached=cached, lookahead=True)
        return info["reward"], info

    def step(self, action: Any) -> Tuple[np.ndarray, float, bool, bool, Dict[str, Any]]:
        """Prune the current model with ``action`` and return ``(obs, reward, terminated, truncated, info)``."""
        state = self._require_active()
        a = self._validate_action(action)
        cand, cached = self._candidate(state, a)
        # the candidate leaves the cache: it becomes the new state's model (recovery may train it in place)
        state.candidates.pop(a.astype(np.float32).tobytes(), None)
        step_index = state.step_index + 1
        if self.budget is not None:
            final = step_index >= self.n_steps
        else:
            final = self._metric(self.target_metric, cand.keep, cand.cost) >= self.target - self.target_tolerance
        model, accuracy, extra = cand.model, cand.accuracy, {}
        time_recovery = 0.0
        if self.recovery is not None and not final and (self.recovery_batches > 0 or self.recovery_epochs > 0):
            t0 = time.perf_counter()
            accuracy = self._recover(model)
            time_recovery = time.perf_counter() - t0
            extra["accuracy_recovered"] = accuracy
        # the pruned model's groups come from the parent's (no re-trace): the action vector keeps its meaning even
        # where a trace could not tell the structure apart (a depthwise conv left with one channel)
        pruner = None if final else state.pruner.child(model, cand.plan)
        new_state, t_imp = self._make_state(model, cand.keep, cand.cost, accuracy, step_index, final, pruner)
        self._state = new_state
        info = self._info(cand.accuracy, cand.cost, cand.keep, step_index, self._episode_evaluations,
                          0.0 if cached else cand.time_prune, t_imp, 0.0 if cached else cand.time_eval,
                          step_budget=cand.step_budget, cached=cached, lookahead=False,
                          time_recovery=time_recovery if self.record_timings else 0.0, **extra)
        return (self._observation(new_state), info["reward"], new_state.terminated, new_state.truncated, info)

    def _recover(self, model: nn.Module) -> float:
        """Short fine-tune between steps (KD from the original model or plain CE); returns new accuracy."""
        seed = int(self.np_random.integers(2**31 - 1))
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            finetune(model, self.splits.train, epochs=max(1, self.recovery_epochs),
                     max_batches=self.recovery_batches if self.recovery_batches > 0 else None, lr=self.recovery_lr,
                     teacher=self.original_model if self.recovery == "kd" else None, T=self.kd_T,
                     soft_weight=self.kd_soft_weight, batch_size=self.recovery_batch_size, device=self.device,
                     amp=self.amp, seed=seed, progress=False)
        model.eval()
        return self._evaluate(model)

    def snapshot(self) -> _State:
        """The current state, to return to with :meth:`restore` (a reference; states are immutable)."""
        return self._require_state()

    def restore(self, snap: _State) -> np.ndarray:
        """Return to a state from :meth:`snapshot` of this env; returns its observation.

        :param snap: an object returned by ``snapshot()``.
        """
        if not isinstance(snap, _State):
            raise TypeError(f"restore() takes an object returned by snapshot(), got {type(snap).__name__}")
        self._state = snap
        return self._observation(snap)

    def close(self) -> None:
        """Release the models and cached tensors."""
        self._state = None
        self._initial_state = None
        self._probe = None
        super().close()


__all__ = ["PruneEnv", "ACTION_MODES", "METRICS", "GROUP_FEATURES", "GLOBAL_FEATURES", "DEFAULT_VAL_SIZE"]
