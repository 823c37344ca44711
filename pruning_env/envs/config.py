"""PruneEnvConfig: every setting of the pruning env as one documented dataclass, validated once on creation.

The env, ``gym.make`` kwargs and the run configs all build this class, so a bad value gets the same error
(naming the field and its allowed range) whichever way it arrives, before any data, model or training is touched.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Tuple, Union

import torch
import torch.nn as nn

from pruning_env.data import DatasetSplits
from pruning_env.envs.parallel import ParallelConfig
from pruning_env.pruning.importance import CRITERIA, Importance

ACTION_MODES = ("sparsity", "distribution")
METRICS = ("flops", "channels", "params")
RECOVERY_MODES = (None, "kd", "ce")
#: names of ``PruneEnvConfig.reward_estimator`` (the functions live in ``pruning_env.envs.reward``)
REWARD_ESTIMATOR_NAMES = ("vanilla", "adaptive_bn", "short_kd", "teacher_agreement")
AGREEMENT_METRICS = ("top1", "kl")
#: validation images held out when neither the caller nor the checkpoint says (10% of CIFAR's training set)
DEFAULT_VAL_SIZE = 5000


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass
class PruneEnvConfig:
    """Settings of :class:`~pruning_env.envs.prune_env.PruneEnv` (see ``docs/env.md`` for the semantics).

    Build it directly, with :meth:`from_kwargs`, or let ``PruneEnv(**kwargs)`` / ``gym.make(id, **kwargs)``
    build it. Invalid values raise ``ValueError`` (or ``TypeError`` for a wrong type) naming the field and the
    allowed range.
    """

    # ---- task: model, data, checkpoint
    model: Union[str, nn.Module] = "vgg19"
    """zoo name (``pruning_env.models.list_models()``) or an ``nn.Module`` (copied, never modified)."""
    dataset: Union[str, DatasetSplits] = "cifar100"
    """dataset name for ``pruning_env.data.make_datasets`` or ready ``DatasetSplits``."""
    width: float = 1.0
    """zoo channel multiplier (> 0)."""
    checkpoint: Optional[Union[str, Path]] = None
    """pretrained weights file (default ``checkpoints/{model}[_wW]_{dataset}.pt``)."""
    pretrained: bool = True
    """load the checkpoint; False builds an untrained, seeded model (tests, experiments)."""
    auto_pretrain_epochs: int = 0
    """when > 0 and the checkpoint file is missing, pretrain one for this many epochs first."""
    data_root: Union[str, Path] = "data"
    """folder holding torchvision's CIFAR files."""
    download: bool = False
    """let torchvision download CIFAR when missing."""
    val_size: Union[int, float, None] = None
    """images held out from training for the reward (count >= 1 or fraction in (0, 1)); None: the checkpoint's."""
    split_seed: Optional[int] = None
    """seed of the train/validation split; None: the checkpoint's, else ``seed``."""
    # ---- episode
    action_mode: str = "sparsity"
    """``"sparsity"`` (fraction of each group removed) or ``"distribution"`` (authors' pruning distribution)."""
    budget: Optional[str] = None
    """None, ``"flops"``, ``"channels"`` or ``"params"``: rescale actions so each step meets its cumulative goal."""
    target: float = 0.5
    """fraction of the target metric removed by the end of the episode, in (0, 1)."""
    target_metric: str = "flops"
    """``"flops"``, ``"channels"`` (the authors' sparsity) or ``"params"``."""
    n_steps: int = 1
    """pruning steps per episode (integer >= 1; 1 = one-shot)."""
    max_step_sparsity: float = 0.9
    """largest fraction of a group removed in one step (sparsity mode), in (0, 1)."""
    target_tolerance: float = 0.005
    """how close to the target counts as reached (budget-free episodes), in [0, 1)."""
    max_steps: Optional[int] = None
    """safety cap on budget-free episodes (then truncated); None: ``4 * n_steps + 6``."""
    # ---- reward
    alpha: float = 0.25
    """weight of the FLOPs reduction in the reward (finite)."""
    beta: float = 0.25
    """weight of the params reduction in the reward (finite)."""
    reward_samples: Optional[int] = 1000
    """validation images the reward is measured on (>= 1; None = all)."""
    eval_batch_size: int = 500
    """batch size of the reward evaluation (>= 1)."""
    reward_estimator: str = "vanilla"
    """how the reward's accuracy term is estimated for a candidate (``pruning_env.envs.reward``): ``"vanilla"``
    (authors: top-1 right after pruning), ``"adaptive_bn"`` (EagleEye: BN statistics re-estimated on training
    images first), ``"short_kd"`` (after ``reward_kd_batches`` KD steps) or ``"teacher_agreement"``."""
    reward_train_images: int = 256
    """training images (never validation or test) for ``adaptive_bn``'s BN statistics and ``short_kd``'s
    batches (>= 2)."""
    reward_kd_batches: int = 10
    """SGD steps of ``short_kd`` (>= 1)."""
    reward_agreement: str = "top1"
    """``teacher_agreement``'s measure: ``"top1"`` (same prediction as the teacher) or ``"kl"``."""
    # ---- importance and pruning granularity
    calibration_size: int = 100
    """training images per calibration batch of the importance criterion (>= 1)."""
    calibration_batches: int = 1
    """calibration batches (>= 1)."""
    importance: Union[str, Importance] = "taylor"
    """importance criterion (a name in ``pruning_env.pruning.importance.CRITERIA`` or an ``Importance``)."""
    importance_train_mode: bool = False
    """compute importance with the model in train mode (the authors' BatchNorm behaviour)."""
    min_channels: int = 1
    """channels every group keeps at least (>= 1)."""
    round_to: int = 1
    """round kept channels to a multiple of this (>= 1)."""
    ignore_layers: Tuple[str, ...] = ()
    """layer names the pruner leaves untouched."""
    prune_normalized: bool = False
    """also prune the channels a LayerNorm normalises (the embedding width of ViT, Swin, ConvNeXt)."""
    # ---- recovery between steps
    recovery: Optional[str] = None
    """None, ``"kd"`` (distillation from the teacher) or ``"ce"``: fine-tune after each non-final step."""
    recovery_batches: int = 0
    """training batches of recovery per step (>= 0; 0 = use ``recovery_epochs``)."""
    recovery_epochs: int = 0
    """epochs of recovery per step (>= 0), used when ``recovery_batches`` is 0."""
    recovery_lr: float = 1e-3
    """peak learning rate of recovery (finite, > 0)."""
    recovery_batch_size: int = 128
    """batch size of recovery (>= 1; the authors use 256)."""
    recovery_period: int = 1
    """recover after every ``recovery_period``-th step (the authors' ``post_train_period``, >= 1)."""
    recovery_best_snapshot: bool = False
    """keep the best epoch of each recovery by reward-image accuracy, the start included (authors' snapshot)."""
    teacher_switch: bool = False
    """after a recovery whose accuracy beats the teacher's, the recovered model becomes the KD teacher (§9.16)."""
    kd_T: float = 2.0
    """distillation temperature (finite, > 0)."""
    kd_soft_weight: float = 0.75
    """weight of the distillation term, in [0, 1]."""
    # ---- execution
    device: Optional[Union[str, torch.device]] = None
    """``"cpu"``, ``"cuda"``, ``"cuda:N"``; None picks CUDA when available."""
    amp: bool = False
    """float16 autocast for the reward evaluation on CUDA."""
    channels_last: bool = False
    """channels-last evaluation on CUDA."""
    lookahead_cache: int = 8
    """look-ahead candidates kept per state (>= 0)."""
    record_timings: bool = False
    """fill ``time_*`` info keys with wall-clock seconds (0.0 when False: infos exactly repeatable)."""
    seed: Optional[int] = None
    """seed of the reward subset, the calibration batches and untrained weights (>= 0; None = 0)."""
    render_mode: Optional[str] = None
    """Gymnasium's render mode; the env has none, so only None."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """how ``evaluate_actions`` scores candidates, e.g. ``{backend: ray, num_workers: 8}`` (a mapping or a
    :class:`~pruning_env.envs.parallel.ParallelConfig`; default: serial, in this process)."""

    def __post_init__(self) -> None:
        _check_type("model", self.model, (str, nn.Module), "a zoo name or an nn.Module")
        _check_type("dataset", self.dataset, (str, DatasetSplits), "a dataset name or DatasetSplits")
        _real("width", self.width, low=0.0, low_open=True)
        if self.checkpoint is not None:
            _check_type("checkpoint", self.checkpoint, (str, Path), "None or a file path")
        _bool("pretrained", self.pretrained)
        _int("auto_pretrain_epochs", self.auto_pretrain_epochs, low=0)
        _check_type("data_root", self.data_root, (str, Path), "a folder path")
        _bool("download", self.download)
        if self.val_size is not None:
            if _is_int(self.val_size):
                _int("val_size", self.val_size, low=1)
            elif _is_real(self.val_size):
                if not 0.0 < float(self.val_size) < 1.0:
                    raise ValueError(f"val_size must be None, a count >= 1 or a fraction in (0, 1), "
                                     f"got {self.val_size!r}")
            else:
                raise TypeError(f"val_size must be None, a count >= 1 or a fraction in (0, 1), "
                                f"got {type(self.val_size).__name__} {self.val_size!r}")
        _optional_int("split_seed", self.split_seed, low=0)
        _choice("action_mode", self.action_mode, ACTION_MODES)
        _choice("budget", self.budget, (None,) + METRICS)
        _real("target", self.target, low=0.0, high=1.0, low_open=True, high_open=True, what="a fraction")
        _choice("target_metric", self.target_metric, METRICS)
        _int("n_steps", self.n_steps, low=1)
        _real("max_step_sparsity", self.max_step_sparsity, low=0.0, high=1.0, low_open=True, high_open=True)
        _real("target_tolerance", self.target_tolerance, low=0.0, high=1.0, high_open=True)
        _optional_int("max_steps", self.max_steps, low=1)
        _real("alpha", self.alpha)
        _real("beta", self.beta)
        _optional_int("reward_samples", self.reward_samples, low=1)
        _int("eval_batch_size", self.eval_batch_size, low=1)
        _choice("reward_estimator", self.reward_estimator, REWARD_ESTIMATOR_NAMES)
        _int("reward_train_images", self.reward_train_images, low=2)
        _int("reward_kd_batches", self.reward_kd_batches, low=1)
        _choice("reward_agreement", self.reward_agreement, AGREEMENT_METRICS)
        _int("calibration_size", self.calibration_size, low=1)
        _int("calibration_batches", self.calibration_batches, low=1)
        if not isinstance(self.importance, Importance):
            _choice("importance", self.importance, CRITERIA)
        _bool("importance_train_mode", self.importance_train_mode)
        _int("min_channels", self.min_channels, low=1)
        _int("round_to", self.round_to, low=1)
        if isinstance(self.ignore_layers, str) or not all(isinstance(n, str) for n in self.ignore_layers):
            raise TypeError(f"ignore_layers must be a list of layer names, got {self.ignore_layers!r}")
        self.ignore_layers = tuple(self.ignore_layers)
        _bool("prune_normalized", self.prune_normalized)
        _choice("recovery", self.recovery, RECOVERY_MODES)
        _int("recovery_batches", self.recovery_batches, low=0)
        _int("recovery_epochs", self.recovery_epochs, low=0)
        _real("recovery_lr", self.recovery_lr, low=0.0, low_open=True)
        _int("recovery_batch_size", self.recovery_batch_size, low=1)
        _int("recovery_period", self.recovery_period, low=1)
        _bool("recovery_best_snapshot", self.recovery_best_snapshot)
        _bool("teacher_switch", self.teacher_switch)
        _real("kd_T", self.kd_T, low=0.0, low_open=True)
        _real("kd_soft_weight", self.kd_soft_weight, low=0.0, high=1.0)
        if self.device is not None:
            _check_type("device", self.device, (str, torch.device), "None, 'cpu', 'cuda' or 'cuda:N'")
        _bool("amp", self.amp)
        _bool("channels_last", self.channels_last)
        _int("lookahead_cache", self.lookahead_cache, low=0)
        _bool("record_timings", self.record_timings)
        _optional_int("seed", self.seed, low=0)
        self.parallel = ParallelConfig.from_dict(self.parallel)
        if self.render_mode is not None:
            raise ValueError(f"render_mode must be None (PruneEnv has no render modes), got {self.render_mode!r}")
        if self.recovery is not None and self.recovery_batches == 0 and self.recovery_epochs == 0:
            raise ValueError(f"recovery={self.recovery!r} needs a length: set recovery_batches >= 1 or "
                             f"recovery_epochs >= 1 (both are 0, so it would never run), or recovery=None")

    @classmethod
    def field_names(cls) -> Tuple[str, ...]:
        """Names of the settings (the keyword arguments ``PruneEnv`` and ``gym.make`` accept)."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "PruneEnvConfig":
        """A validated config from keyword arguments; an unknown name is a ``TypeError`` listing the valid ones.

        :param kwargs: any of :meth:`field_names`.
        """
        names = cls.field_names()
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise TypeError(f"unknown PruneEnv setting(s) {unknown}; valid settings are: {', '.join(names)}")
        return cls(**kwargs)

    # ---- derived settings
    @property
    def step_metric(self) -> Optional[str]:
        """The metric each step is matched to: ``budget``, or ``target_metric`` in distribution mode (which
        always has a budget), else None (budget-free)."""
        if self.budget is not None:
            return self.budget
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


def _check_type(name: str, value: Any, types: tuple, what: str) -> None:
    if not isinstance(value, types):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__} {value!r}")


def _bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if not any(value is a or (isinstance(value, str) and value == a) for a in allowed):
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _range_text(low: Optional[float], high: Optional[float], low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return ""


def _real(name: str, value: Any, low: Optional[float] = None, high: Optional[float] = None,
          low_open: bool = False, high_open: bool = False, what: str = "a finite number") -> None:
    allowed = " ".join(filter(None, [what, _range_text(low, high, low_open, high_open)]))
    if not _is_real(value):
        raise TypeError(f"{name} must be {allowed}, got {type(value).__name__} {value!r}")
    v = float(value)
    bad = (not math.isfinite(v) or (low is not None and (v <= low if low_open else v < low))
           or (high is not None and (v >= high if high_open else v > high)))
    if bad:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _int(name: str, value: Any, low: Optional[int] = None) -> None:
    allowed = f"an integer >= {low}" if low is not None else "an integer"
    if not _is_int(value):
        raise TypeError(f"{name} must be {allowed}, got {type(value).__name__} {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _optional_int(name: str, value: Any, low: Optional[int] = None) -> None:
    if value is None:
        return
    allowed = f"None or an integer >= {low}" if low is not None else "None or an integer"
    if not _is_int(value):
        raise TypeError(f"{name} must be {allowed}, got {type(value).__name__} {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


__all__ = ["PruneEnvConfig", "ACTION_MODES", "METRICS", "RECOVERY_MODES", "REWARD_ESTIMATOR_NAMES",
           "AGREEMENT_METRICS", "DEFAULT_VAL_SIZE"]
