"""Every setting of the two envs as documented dataclasses: :class:`PruneEnvConfig` (the pruning env) and
:class:`PatchEnvConfig` (AgentViT's patch-selection env), each validated once on creation by one grammar.

The envs, ``gym.make`` kwargs and the run configs all build these classes, so a bad value gets the same error
(naming the field and its allowed range, :mod:`pruning_env.schema`) whichever way it arrives, before any data,
model or training is touched.
"""
from __future__ import annotations

import difflib
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn

from pruning_env.data import DatasetSplits
from pruning_env.envs.budget import ACTION_MODES, METRICS
from pruning_env.envs.parallel import ParallelConfig
from pruning_env.envs.reward import AGREEMENT_METRICS, CHEAP_ESTIMATORS, REWARD_ESTIMATORS
from pruning_env.pruning.importance import CRITERIA, Importance
from pruning_env.schema import Settings, setting

RECOVERY_MODES = (None, "kd", "ce")
#: validation images held out when neither the caller nor the checkpoint says (10% of CIFAR's training set)
DEFAULT_VAL_SIZE = 5000
VAL_SIZE_WORDS = "None, a count >= 1 or a fraction in (0, 1)"
#: the patch-selection env's choices
PATCH_ACTION_MODES = ("scores", "mask")
BINARIZE_RULES = ("mean", "topk")
LOSS_REFERENCES = ("first_reward", "first_step")
VIT_OPTIMIZERS = ("adam", "adamw")
LR_SCHEDULES = ("constant", "cosine")


class ConfigAttribute:
    """An env attribute that reads a config field (or property), so a setting has one home and agents and reports
    can still read ``env.target``; assigning the attribute on an env overrides it there only (an agent may enlarge
    ``env.lookahead_cache``).

    :param name: the config attribute read; default the env attribute's own name.
    """

    def __init__(self, name: Optional[str] = None) -> None:
        self.name = name

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = self.name or name

    def __get__(self, env: Any, owner: Optional[type] = None) -> Any:
        return self if env is None else getattr(env.config, self.name)


class PruneEnvSettings:
    """The settings a :class:`~pruning_env.envs.prune_env.PruneEnv` exposes as attributes (agents and reports read
    ``env.target``, ``env.budget``, ...), each read from the env's ``config`` (:class:`ConfigAttribute`)."""

    budget = ConfigAttribute("step_metric")  # budget, or target_metric in distribution mode; None: budget-free
    max_steps = ConfigAttribute("step_cap")  # steps after which a budget-free episode is truncated
    action_mode = ConfigAttribute()
    target = ConfigAttribute()
    target_metric = ConfigAttribute()
    episode_metric = ConfigAttribute()
    n_steps = ConfigAttribute()
    alpha = ConfigAttribute()
    beta = ConfigAttribute()
    max_step_sparsity = ConfigAttribute()
    distribution_max_sparsity = ConfigAttribute()
    target_tolerance = ConfigAttribute()
    lookahead_cache = ConfigAttribute()
    eval_batch_size = ConfigAttribute()


def zoo_model_problem(model: Any) -> Optional[str]:
    """Why ``model`` names no zoo model (listing the zoo and the closest name), or None (a module passes).

    :param model: a model name or an ``nn.Module``.
    """
    if not isinstance(model, str):
        return None
    from pruning_env.models import list_models

    names = list_models()
    if model in names:
        return None
    close = difflib.get_close_matches(model, names, n=1, cutoff=0.0)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"no such model in the zoo; {hint}the zoo's models are {', '.join(names)}"


def val_size_problem(value: Union[int, float]) -> Optional[str]:
    """None when ``value`` is a held-out count >= 1 (an integer) or a fraction in (0, 1)."""
    ok = value >= 1 if isinstance(value, numbers.Integral) else 0 < value < 1
    return None if ok else ""


def criterion_problem(value: Any) -> Optional[str]:
    """None for an ``Importance`` or the name of a criterion in ``CRITERIA``."""
    return None if not isinstance(value, str) or value in CRITERIA else ""


@dataclass
class PruneEnvConfig(Settings):
    """Settings of :class:`~pruning_env.envs.prune_env.PruneEnv` (see ``docs/env.md`` for the semantics).

    Build it directly, with :meth:`from_kwargs`, or let ``PruneEnv(**kwargs)`` / ``gym.make(id, **kwargs)``
    build it. Every field is checked by :func:`pruning_env.schema.validate` (its limits are declared with it):
    ``ValueError`` (or ``TypeError`` for a wrong type) naming the field and the allowed range.
    """

    key_label = "PruneEnv setting"

    @property
    def uses_latency(self) -> bool:
        """Whether the env needs the latency model (a latency target or budget, or ``gamma != 0``)."""
        return "latency" in (self.target_metric, self.step_metric) or self.gamma != 0

    def latency_setting(self) -> Any:
        """The :class:`~pruning_env.costs.latency.LatencySetting` of the ``latency_*`` fields."""
        from pruning_env.costs.latency import LatencySetting

        return LatencySetting(device=self.latency_device, threads=self.latency_threads,
                              batch_size=self.latency_batch_size, dtype=self.latency_dtype,
                              channels_last=self.latency_channels_last)

    def build_latency_model(self, pruner: Any) -> Any:
        """The :class:`~pruning_env.costs.latency.LatencyModel` of ``pruner``'s model in the ``latency_*`` setting
        (cached on disk unless ``latency_cache=False``); a setting this machine cannot measure, e.g. CUDA without a
        GPU, is a ``ValueError`` naming ``latency_device``.

        :param pruner: the :class:`~pruning_env.pruning.Pruner` of the original model (its widths are the full ones).
        """
        from pruning_env.costs.latency import LatencyModel

        setting = self.latency_setting()
        try:
            setting.torch_device  # noqa: B018  (CUDA asked without one fails here, before any table is built)
        except RuntimeError as e:
            raise ValueError(f"latency_device={self.latency_device!r}: {e}") from e
        cache = True if self.latency_cache is None else self.latency_cache
        return LatencyModel.build(pruner, setting, cache=cache, grid=self.latency_grid)

    # ---- task: model, data, checkpoint
    model: Union[str, nn.Module] = setting("vgg19", what="a zoo name or an nn.Module", check=zoo_model_problem)
    """zoo name (``pruning_env.models.list_models()``) or an ``nn.Module`` (copied, never modified)."""
    dataset: Union[str, DatasetSplits] = setting("cifar100", what="a dataset name or DatasetSplits")
    """dataset name for ``pruning_env.data.make_datasets`` or ready ``DatasetSplits``."""
    width: float = setting(1.0, low=0, low_open=True)
    """zoo channel multiplier (> 0)."""
    checkpoint: Optional[Union[str, Path]] = setting(None, what="a file path")
    """pretrained weights file (default ``checkpoints/{model}[_wW]_{dataset}.pt``)."""
    pretrained: bool = True
    """load the checkpoint; False builds an untrained, seeded model (tests, experiments)."""
    auto_pretrain_epochs: int = setting(0, low=0)
    """when > 0 and the checkpoint file is missing, pretrain one for this many epochs first."""
    data_root: Union[str, Path] = setting("data", what="a folder path")
    """folder holding torchvision's CIFAR files."""
    download: bool = False
    """let torchvision download CIFAR when missing."""
    val_size: Union[int, float, None] = setting(None, what=VAL_SIZE_WORDS, check=val_size_problem)
    """images held out from training for the reward (count >= 1 or fraction in (0, 1)); None: the checkpoint's."""
    split_seed: Optional[int] = setting(None, low=0)
    """seed of the train/validation split; None: the checkpoint's, else ``seed``."""
    # ---- episode
    action_mode: str = setting("sparsity", choices=ACTION_MODES)
    """``"sparsity"`` (fraction of each group removed) or ``"distribution"`` (authors' pruning distribution)."""
    budget: Optional[str] = setting(None, choices=(None, "target") + METRICS)
    """None, ``"flops"``, ``"channels"``, ``"params"``, ``"latency"`` (predicted by the latency model of the
    ``latency_*`` setting) or ``"target"`` (whatever ``target_metric`` is): rescale actions so each step meets its
    cumulative goal."""
    target: float = setting(0.5, low=0, high=1, low_open=True, high_open=True, what="a fraction")
    """fraction of the target metric removed by the end of the episode, in (0, 1)."""
    target_metric: str = setting("flops", choices=METRICS)
    """``"flops"``, ``"channels"`` (the authors' sparsity), ``"params"`` or ``"latency"`` (predicted latency of the
    ``latency_*`` device setting, see ``docs/latency.md``)."""
    n_steps: int = setting(1, low=1)
    """pruning steps per episode (integer >= 1; 1 = one-shot)."""
    max_step_sparsity: float = setting(0.9, low=0, high=1, low_open=True, high_open=True)
    """largest fraction of a group removed in one step (sparsity mode), in (0, 1)."""
    distribution_max_sparsity: Optional[float] = setting(None, low=0, high=1, low_open=True, high_open=True)
    """largest fraction of a group removed in one step in distribution mode, in (0, 1) (AMC's per-layer bound: 0.8
    keeps at least 20 %); None: down to ``min_channels``, the authors' behaviour."""
    target_tolerance: float = setting(0.005, low=0, high=1, high_open=True)
    """how close to the target counts as reached (budget-free episodes), in [0, 1)."""
    max_steps: Optional[int] = setting(None, low=1)
    """safety cap on budget-free episodes (then truncated); None: ``4 * n_steps + 6``."""
    # ---- reward
    alpha: float = 0.25
    """weight of the FLOPs reduction in the reward (finite)."""
    beta: float = 0.25
    """weight of the params reduction in the reward (finite)."""
    gamma: float = 0.0
    """weight of the predicted latency reduction in the reward (finite; 0 keeps the authors' reward; non-zero
    builds the latency model of the ``latency_*`` setting)."""
    # ---- latency model (built only when target_metric / budget is "latency" or gamma != 0)
    latency_device: str = setting("cpu", what="'cpu', 'cuda' or 'cuda:N'")
    """device the latency is predicted for (a setting that cannot be measured here is refused at construction)."""
    latency_threads: int = setting(1, low=1)
    """torch intra-op threads of the latency setting (CPU)."""
    latency_batch_size: int = setting(1, low=1)
    """images per forward pass of the latency setting."""
    latency_dtype: str = setting("float32", choices=("float32", "float16", "bfloat16"))
    """dtype of the latency setting."""
    latency_channels_last: bool = False
    """time 4-D tensors in channels_last memory format."""
    latency_cache: Optional[Union[str, Path]] = setting(None, what="None or a folder path")
    """folder of cached latency tables; None: ``~/.cache/rl-prune/latency``."""
    latency_grid: Tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    """width fractions each op is measured at when the table is built."""
    reward_samples: Optional[int] = setting(1000, low=1)
    """validation images the reward is measured on (>= 1; None = all)."""
    eval_batch_size: int = setting(500, low=1)
    """batch size of the reward evaluation (>= 1)."""
    reward_estimator: str = setting("vanilla", choices=tuple(REWARD_ESTIMATORS))
    """how the reward's accuracy term is estimated for a candidate: a name in
    ``pruning_env.envs.reward.REWARD_ESTIMATORS`` (each entry says what it estimates and which settings it
    reads); ``"vanilla"`` is the authors' top-1 right after pruning."""
    reward_train_images: int = setting(256, low=2)
    """training images (never validation or test) for the estimators' BN statistics (``adaptive_bn``,
    ``bn_kd_loss``: all of them) and KD batches (``short_kd``, ``multi_fidelity``, ``kd_refined``: the first ones,
    cycled) (>= 2)."""
    reward_bn_batch_size: int = setting(64, low=2)
    """batch size of the BN statistics passes: the statistics average ``reward_train_images / reward_bn_batch_size``
    training batches (>= 2)."""
    reward_kd_batches: int = setting(10, low=1)
    """SGD steps of batch 64 of the estimators' short KD fine-tune (``short_kd``, ``kd_refined``;
    ``multi_fidelity``'s refinement) (>= 1)."""
    reward_kd_lr: float = setting(0.01, low=0, low_open=True)
    """constant SGD learning rate of that fine-tune (finite, > 0)."""
    reward_agreement: str = setting("top1", choices=AGREEMENT_METRICS)
    """``teacher_agreement``'s measure: ``"top1"`` (same prediction as the teacher) or ``"kl"``."""
    reward_refine_base: str = setting("adaptive_bn", choices=CHEAP_ESTIMATORS)
    """``multi_fidelity``'s cheap estimator: every candidate of a batched look-ahead gets it, and the refined ones
    are measured with it again after the fine-tune; ``kd_refined``'s: what it measures after the fine-tune."""
    reward_refine_top: int = setting(2, low=1)
    """``multi_fidelity``: new candidates of each batched look-ahead that are refined, the best by cheap reward
    (>= 1)."""
    final_rerank: int = setting(1, low=1)
    """at the end of a search, re-score the ``final_rerank`` best final-step candidates the env evaluated (by the
    search's reward) on held-out validation images the reward never read, and keep the best there (1: off, the
    search's own best is kept). Each search picks the best of many noisy scores on one fixed image set, so its
    choice is optimistic (``benchmarks/results/reward_fidelity_searched.md``); the re-scores are counted apart from
    the search budget (``PruneEnv.rerank_finalists``). Needs a budget (``n_steps`` steps) and ``reward_samples``
    below the validation size (>= 1)."""
    final_rerank_samples: Optional[int] = setting(None, low=1)
    """held-out validation images of ``final_rerank`` (None: every validation image the reward does not read)."""
    # ---- importance and pruning granularity
    calibration_size: int = setting(100, low=1)
    """training images per calibration batch of the importance criterion (>= 1)."""
    calibration_batches: int = setting(1, low=1)
    """calibration batches (>= 1)."""
    importance: Union[str, Importance] = setting("taylor", what=f"one of {CRITERIA} or an Importance",
                                                 check=criterion_problem)
    """importance criterion (a name in ``pruning_env.pruning.importance.CRITERIA`` or an ``Importance``)."""
    importance_train_mode: bool = False
    """compute importance with the model in train mode (the authors' BatchNorm behaviour)."""
    min_channels: int = setting(1, low=1)
    """channels every group keeps at least (>= 1)."""
    round_to: int = setting(1, low=1)
    """round kept channels to a multiple of this (>= 1)."""
    ignore_layers: Tuple[str, ...] = setting((), what="a list of layer names")
    """layer names the pruner leaves untouched."""
    prune_normalized: bool = False
    """also prune the channels a LayerNorm normalises (the embedding width of ViT, Swin, ConvNeXt)."""
    # ---- recovery between steps
    recovery: Optional[str] = setting(None, choices=RECOVERY_MODES)
    """None, ``"kd"`` (distillation from the teacher) or ``"ce"``: fine-tune after each non-final step."""
    recovery_batches: int = setting(0, low=0)
    """training batches of recovery per step (>= 0; 0 = use ``recovery_epochs``)."""
    recovery_epochs: int = setting(0, low=0)
    """epochs of recovery per step (>= 0), used when ``recovery_batches`` is 0."""
    recovery_lr: float = setting(1e-3, low=0, low_open=True)
    """peak learning rate of recovery (finite, > 0)."""
    recovery_batch_size: int = setting(128, low=1)
    """batch size of recovery (>= 1; the authors use 256)."""
    recovery_period: int = setting(1, low=1)
    """recover after every ``recovery_period``-th step (the authors' ``post_train_period``, >= 1)."""
    recovery_best_snapshot: bool = False
    """keep the best epoch of each recovery by reward-image accuracy, the start included (authors' snapshot)."""
    teacher_switch: bool = False
    """after a recovery whose accuracy beats the teacher's, the recovered model becomes the KD teacher (§9.16)."""
    kd_T: float = setting(2.0, low=0, low_open=True)
    """distillation temperature (finite, > 0)."""
    kd_soft_weight: float = setting(0.75, low=0, high=1)
    """weight of the distillation term, in [0, 1]."""
    # ---- execution
    device: Optional[Union[str, torch.device]] = setting(None, what="None, 'cpu', 'cuda' or 'cuda:N'")
    """``"cpu"``, ``"cuda"``, ``"cuda:N"``; None picks CUDA when available."""
    amp: bool = False
    """float16 autocast for the reward evaluation on CUDA."""
    channels_last: bool = False
    """channels-last evaluation on CUDA."""
    lookahead_cache: int = setting(8, low=0)
    """look-ahead candidates kept per state (>= 0)."""
    record_timings: bool = False
    """fill ``time_*`` info keys with wall-clock seconds (0.0 when False: infos exactly repeatable)."""
    seed: Optional[int] = setting(None, low=0)
    """seed of the reward subset, the calibration batches and untrained weights (>= 0; None = 0)."""
    render_mode: Optional[str] = setting(None, what="None (PruneEnv has no render modes)", check=lambda value: "")
    """Gymnasium's render mode; the env has none, so only None."""
    parallel: ParallelConfig = setting(default_factory=ParallelConfig)
    """how ``evaluate_actions`` scores candidates, e.g. ``{backend: ray, num_workers: 8}`` (a mapping or a
    :class:`~pruning_env.envs.parallel.ParallelConfig`; default: serial, in this process)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.recovery is not None and self.recovery_batches == 0 and self.recovery_epochs == 0:
            raise ValueError(f"recovery={self.recovery!r} needs a length: set recovery_batches >= 1 or "
                             f"recovery_epochs >= 1 (both are 0, so it would never run), or recovery=None")
        if self.final_rerank > 1:
            if self.reward_samples is None:
                raise ValueError(f"final_rerank={self.final_rerank} needs held-out validation images, but "
                                 f"reward_samples=None gives every one to the reward; set reward_samples below the "
                                 f"validation size")
            if self.step_metric is None:
                raise ValueError(f"final_rerank={self.final_rerank} re-scores the final step's candidates: it needs a "
                                 f"budget (budget=..., or action_mode='distribution'), so that every episode ends "
                                 f"after n_steps steps")

    # ---- derived settings
    @property
    def step_metric(self) -> Optional[str]:
        """The metric each step is matched to: ``budget``, or ``target_metric`` in distribution mode (which
        always has a budget), else None (budget-free)."""
        if self.budget is not None:
            return self.target_metric if self.budget == "target" else self.budget
        return self.target_metric if self.action_mode == "distribution" else None

    @property
    def episode_metric(self) -> str:
        """The metric the episode's target is measured in."""
        return self.step_metric or self.target_metric

    @property
    def step_cap(self) -> int:
        """Steps after which a budget-free episode is truncated."""
        return int(self.max_steps) if self.max_steps is not None else 4 * int(self.n_steps) + 6

    @property
    def recovers(self) -> bool:
        """Whether recovery fine-tunes between steps at all."""
        return self.recovery is not None and (self.recovery_batches > 0 or self.recovery_epochs > 0)

    def recovery_options(self) -> Dict[str, Any]:
        """Keyword arguments of :func:`pruning_env.training.recover` for one recovery (teacher, data and seed
        aside)."""
        return dict(epochs=max(1, self.recovery_epochs), max_batches=self.recovery_batches or None,
                    lr=self.recovery_lr, batch_size=self.recovery_batch_size, T=self.kd_T,
                    soft_weight=self.kd_soft_weight)


@dataclass
class PatchEnvConfig(Settings):
    """Settings of :class:`~pruning_env.envs.patch_env.PatchSelectEnv` (AgentViT; see ``docs/agentvit.md``),
    checked like :class:`PruneEnvConfig`. ``PatchSelectEnv(**kwargs)`` and ``gym.make("RLPatch-...", **kwargs)``
    build it."""

    key_label = "PatchSelectEnv setting"

    model: Union[str, nn.Module] = setting("vit_tiny_patch4", what="a zoo name or a SimpleViT-like module",
                                           check=zoo_model_problem)
    """a zoo name (``vit_tiny_patch4``) or a built :class:`~pruning_env.models.vit.SimpleViT`."""
    dataset: Union[str, DatasetSplits] = setting("cifar10", what="a dataset name or DatasetSplits")
    """a name for :func:`pruning_env.data.make_datasets` or ready :class:`DatasetSplits`."""
    width: float = setting(1.0, low=0, low_open=True)
    """zoo width multiplier."""
    depth: int = setting(6, low=1)
    """zoo depth (transformer blocks)."""
    model_kwargs: Optional[Dict[str, Any]] = None
    """extra zoo kwargs (e.g. ``dim_head``)."""
    data_root: Union[str, Path] = setting("data", what="a folder path")
    """folder holding torchvision's CIFAR files."""
    download: bool = False
    """let torchvision download CIFAR."""
    val_size: Union[int, float, None] = setting(None, what=VAL_SIZE_WORDS, check=val_size_problem)
    """validation images held out from train (for the trainer's per-epoch evaluation)."""
    batch_size: int = setting(128, low=1)
    """ViT training batch (the notebook: 128); short final batches are dropped."""
    epochs: int = setting(100, low=1)
    """passes over the training split per episode (the notebook: 100)."""
    lr: float = setting(1e-3, low=0)
    """ViT learning rate (the notebook: 1e-3); the peak value under ``lr_schedule="cosine"``."""
    optimizer: str = setting("adam", choices=VIT_OPTIMIZERS)
    """``"adam"`` (the notebook) or ``"adamw"`` (decoupled weight decay; norms, biases and 1-D parameters are
    not decayed)."""
    weight_decay: float = setting(0.0, low=0)
    """ViT weight decay (the notebook: 0)."""
    lr_schedule: str = setting("constant", choices=LR_SCHEDULES)
    """``"constant"`` (the notebook) or ``"cosine"``: linear warm-up over ``warmup_epochs``, then cosine decay to
    ``min_lr`` at the end of the episode, stepped per batch."""
    warmup_epochs: float = setting(0.0, low=0)
    """warm-up length in epochs (may be fractional); cosine schedule only."""
    min_lr: float = setting(0.0, low=0)
    """final learning rate of the cosine schedule."""
    label_smoothing: float = setting(0.0, low=0, high=1, high_open=True)
    """label smoothing of the ViT's cross-entropy (the notebook: 0); the reward's loss Lt is this smoothed loss."""
    action_mode: str = setting("scores", choices=PATCH_ACTION_MODES)
    """``"scores"`` (per-patch scores, binarised by ``binarize``) or ``"mask"`` (a keep-mask used as is)."""
    binarize: str = setting("mean", choices=BINARIZE_RULES)
    """``"mean"`` (keep scores >= their mean, the notebook's rule) or ``"topk"`` (the ``n_keep`` best)."""
    n_keep: int = setting(30, low=1)
    """target kept count k* (the notebook: 30 of 64); at most the model's patch count."""
    loss_weight: float = 1.0
    """weight of L0/Lt (the notebook: 1)."""
    patch_weight: float = 20.0
    """weight of the patch-count term (the notebook: 20)."""
    reward_every: int = setting(50, low=1)
    """reward period in batches (the notebook: 50; its stored run: 10)."""
    loss_reference: str = setting("first_reward", choices=LOSS_REFERENCES)
    """``"first_reward"`` (notebook: L0 is the loss at the first reward step) or ``"first_step"``."""
    same_batch_next_state: bool = True
    """recompute the state of the same batch after the update on reward steps (the notebook's s')."""
    augment: bool = True
    """training augmentation on the train split."""
    observe: bool = True
    """compute the state; False returns zero observations and skips the state passes (for baselines that
    ignore the state, so their training time holds no agent cost)."""
    time_info: bool = True
    """put ``step_time``/``state_time`` in ``info`` (wall-clock times are the env's only non-repeatable output;
    Gymnasium's ``check_env`` compares infos of seeded runs, so the registered ids use False)."""
    device: Optional[Union[str, torch.device]] = setting(None, what="None, 'auto', 'cpu', 'cuda' or 'cuda:N'")
    """where the ViT trains; None / ``"auto"`` picks CUDA when available."""
    seed: Optional[int] = setting(None, low=0)
    """seeds the ViT's initial weights, the data split and order, and the env's torch stream."""
    num_workers: int = setting(0, low=0)
    """DataLoader workers."""


__all__ = ["PruneEnvConfig", "PatchEnvConfig", "ACTION_MODES", "RECOVERY_MODES", "DEFAULT_VAL_SIZE",
           "PATCH_ACTION_MODES", "BINARIZE_RULES", "LOSS_REFERENCES", "VIT_OPTIMIZERS", "LR_SCHEDULES",
           "ConfigAttribute", "PruneEnvSettings", "zoo_model_problem", "val_size_problem"]
