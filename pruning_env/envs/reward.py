"""Reward estimators: how the accuracy term of the pruning reward is estimated for one pruned candidate, and their
registry (:data:`REWARD_ESTIMATORS`): each entry carries its function, its options and what it reads.

Every estimator is a pure function ``fn(model, teacher, reward_data, train_data, **options) -> float`` (larger is
better); a multi-fidelity entry's function is the refinement the env applies to a batch's best candidates only.
"""
from __future__ import annotations

import copy
import functools
import inspect
import itertools
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from pruning_env.runtime import model_device
from pruning_env.training import EvalData, evaluate, iter_batches, kd_loss, make_sgd, model_logits, train_epoch

#: ``fn(model, teacher, reward_data, train_data) -> accuracy estimate`` (options bound by :func:`make_estimator`)
RewardEstimator = Callable[[nn.Module, nn.Module, EvalData, Optional[EvalData]], float]
#: measures of :func:`teacher_agreement`
AGREEMENT_METRICS = ("top1", "kl")


def _train_batches(train_data: Optional[EvalData], batch_size: int,
                   what: str) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    if train_data is None:
        raise ValueError(f"the {what} estimator needs training images: pass train_data (x, y) from the "
                         f"training split (never the validation or test split)")
    return iter_batches(train_data, batch_size)


def vanilla(model: nn.Module, teacher: Optional[nn.Module], reward_data: EvalData,
            train_data: Optional[EvalData] = None, *, batch_size: int = 256) -> float:
    """The authors' reward: top-1 of the pruned model on the reward images, right after pruning.

    :param model: the pruned candidate (left unchanged).
    :param teacher: unused; accepted so that every estimator has the same signature.
    :param reward_data: validation images, a DataLoader, a Dataset or ``(x, y)`` tensors.
    :param train_data: unused.
    :param batch_size: evaluation batch size.
    """
    return evaluate(model, reward_data, batch_size=batch_size)["top1"]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, train_data: EvalData, n_images: int = 256, batch_size: int = 64) -> nn.Module:
    """A copy of ``model`` whose BatchNorm running statistics are re-estimated (EagleEye, ECCV 2020).

    The copy's BN statistics are reset and recomputed as an exact average (``momentum=None``) over the first
    ``n_images`` of ``train_data``, with only the BN layers in train mode (dropout stays off) and no gradients.
    Weights are untouched; ``model`` itself is left unchanged. The copy is returned in eval mode.

    :param model: the pruned candidate.
    :param train_data: images from the training split; only these are seen in train mode.
    :param n_images: how many training images estimate the statistics (a few hundred suffice).
    :param batch_size: batch size of the estimation passes (each batch is one BN average step).
    """
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    net = copy.deepcopy(model).eval()
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    device = model_device(net)
    seen = 0
    for x, _ in _train_batches(train_data, batch_size, "adaptive_bn"):
        x = x[: n_images - seen].to(device)
        if len(x) < 2:  # a BN batch statistic needs two images
            break
        net(x)
        seen += len(x)
        if seen >= n_images:
            break
    if seen == 0:
        raise ValueError("train_data gave no batch of >= 2 images to re-estimate the BatchNorm statistics")
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
    return net.eval()


def adaptive_bn(model: nn.Module, teacher: Optional[nn.Module], reward_data: EvalData, train_data: EvalData, *,
                n_images: int = 256, bn_batch_size: int = 64, batch_size: int = 256) -> float:
    """EagleEye's adaptive-BN accuracy: top-1 on the reward images after :func:`recalibrate_bn` on a copy.

    :param model: the pruned candidate (left unchanged).
    :param teacher: unused; accepted so that every estimator has the same signature.
    :param reward_data: validation images (evaluated in eval mode only).
    :param train_data: training images for the BN statistics.
    :param n_images: training images used for the statistics.
    :param bn_batch_size: batch size of the statistics passes.
    :param batch_size: evaluation batch size.
    """
    net = recalibrate_bn(model, train_data, n_images=n_images, batch_size=bn_batch_size)
    return evaluate(net, reward_data, batch_size=batch_size)["top1"]


def kd_finetune(model: nn.Module, teacher: nn.Module, train_data: EvalData, *, n_batches: int = 10,
                lr: float = 0.01, T: float = 2.0, soft_weight: float = 0.75, train_batch_size: int = 64) -> nn.Module:
    """A copy of ``model`` after ``n_batches`` SGD steps of knowledge distillation from ``teacher``: the one short
    KD fine-tune of the estimators (:func:`short_kd`, the refinement of :func:`kd_refined`).

    The batches are the first ones of ``train_data`` in order (cycled if it runs out), so the copy is deterministic
    for a given ``train_data``; the loss is :func:`pruning_env.training.kd_loss`. The copy is returned in eval mode.

    :param model: the pruned candidate (left unchanged).
    :param teacher: the unpruned source model (left unchanged, its train/eval flag restored).
    :param train_data: training images ``(x, y)`` (never validation or test images).
    :param n_batches: SGD steps.
    :param lr: SGD learning rate (momentum 0.9, weight decay 5e-4), constant.
    :param T: distillation temperature.
    :param soft_weight: weight of the distillation term.
    :param train_batch_size: batch size of the steps.
    """
    if n_batches < 1:
        raise ValueError(f"n_batches must be >= 1, got {n_batches}")
    if teacher is None:
        raise ValueError("a KD fine-tune needs the teacher (the unpruned source model)")
    net = copy.deepcopy(model)
    batches = list(itertools.islice(_train_batches(train_data, train_batch_size, "KD fine-tune"), n_batches))
    teacher_was_training = teacher.training
    try:
        train_epoch(net, itertools.islice(itertools.cycle(batches), n_batches), make_sgd(net, lr),
                    device=model_device(net), teacher=teacher, T=T, soft_weight=soft_weight)
    finally:
        teacher.train(teacher_was_training)
    return net.eval()


def short_kd(model: nn.Module, teacher: nn.Module, reward_data: EvalData, train_data: EvalData, *,
             n_batches: int = 10, lr: float = 0.01, T: float = 2.0, soft_weight: float = 0.75,
             train_batch_size: int = 64, batch_size: int = 256) -> float:
    """Top-1 on the reward images after :func:`kd_finetune` (``n_batches`` SGD steps of distillation) on a copy.

    :param model: the pruned candidate (left unchanged).
    :param teacher: the unpruned source model (left unchanged).
    :param reward_data: validation images.
    :param train_data: training images ``(x, y)`` for the recovery steps.
    :param n_batches: recovery steps.
    :param lr: SGD learning rate (momentum 0.9, weight decay 5e-4), constant.
    :param T: distillation temperature.
    :param soft_weight: weight of the distillation term.
    :param train_batch_size: batch size of the recovery steps.
    :param batch_size: evaluation batch size.
    """
    net = kd_finetune(model, teacher, train_data, n_batches=n_batches, lr=lr, T=T, soft_weight=soft_weight,
                      train_batch_size=train_batch_size)
    return evaluate(net, reward_data, batch_size=batch_size)["top1"]


@torch.no_grad()
def logits_on(model: nn.Module, data: EvalData, batch_size: int = 256) -> torch.Tensor:
    """Logits of ``model`` (eval mode, no gradients) on every image of ``data``, in order: the teacher's are
    computed once and passed to :func:`teacher_agreement` as ``teacher_logits``.

    :param model: the classifier (its training flag is restored).
    :param data: images ``(x, y)`` or a DataLoader / Dataset.
    :param batch_size: evaluation batch size.
    """
    was_training = model.training
    model.eval()
    device = model_device(model)
    try:
        return torch.cat([model_logits(model(x.to(device))).float() for x, _ in iter_batches(data, batch_size)])
    finally:
        model.train(was_training)


def teacher_agreement(model: nn.Module, teacher: nn.Module, reward_data: EvalData,
                      train_data: Optional[EvalData] = None, *, metric: str = "top1", T: float = 1.0,
                      teacher_logits: Optional[torch.Tensor] = None, batch_size: int = 256) -> float:
    """Agreement of the pruned model with the teacher on the reward images (labels are not used).

    :param model: the pruned candidate (left unchanged).
    :param teacher: the unpruned source model (left unchanged).
    :param reward_data: validation images.
    :param train_data: unused.
    :param metric: ``"top1"``: fraction of images where both predict the same class; ``"kl"``:
        ``-KL(p_teacher ‖ p_model)`` at temperature ``T``, averaged over images (0 is perfect agreement).
    :param T: softmax temperature of the ``"kl"`` metric.
    :param teacher_logits: the teacher's logits on ``reward_data`` in order, when already computed (the env
        evaluates many candidates against one teacher); computed here when None.
    :param batch_size: evaluation batch size.
    """
    if metric not in AGREEMENT_METRICS:
        raise ValueError(f"metric must be one of {AGREEMENT_METRICS}, got {metric!r}")
    if teacher_logits is None:
        if teacher is None:
            raise ValueError("teacher_agreement needs the teacher or its precomputed teacher_logits")
        teacher_logits = logits_on(teacher, reward_data, batch_size)
    logits = logits_on(model, reward_data, batch_size)
    teacher_logits = teacher_logits.to(logits.device).float()
    if teacher_logits.shape != logits.shape:
        raise ValueError(f"teacher_logits has shape {tuple(teacher_logits.shape)}, the model gives "
                         f"{tuple(logits.shape)} on reward_data")
    if metric == "top1":
        return (logits.argmax(1) == teacher_logits.argmax(1)).float().mean().item()
    kl = F.kl_div(F.log_softmax(logits / T, dim=1), F.log_softmax(teacher_logits / T, dim=1),
                  reduction="batchmean", log_target=True)
    return -kl.item()


def bn_kd_loss(model: nn.Module, teacher: nn.Module, reward_data: EvalData, train_data: EvalData, *,
               n_images: int = 256, bn_batch_size: int = 64, T: float = 2.0, soft_weight: float = 0.75,
               teacher_logits: Optional[torch.Tensor] = None, batch_size: int = 256) -> float:
    """The negated distillation loss of the fine-tune on the reward images after :func:`recalibrate_bn` on a copy:
    ``-(w * T^2 * KL(p_teacher || p_model) + (1 - w) * CE)`` at temperature ``T``, averaged over the images
    (:func:`pruning_env.training.kd_loss`). Larger is better (0 would be a perfect copy of confident, correct
    teacher predictions); unlike a top-1 it moves with every image's probabilities, not only with its argmax.

    :param model: the pruned candidate (left unchanged).
    :param teacher: the unpruned source model (left unchanged).
    :param reward_data: validation images with labels (evaluated in eval mode only).
    :param train_data: training images for the BN statistics.
    :param n_images: training images used for the statistics.
    :param bn_batch_size: batch size of the statistics passes.
    :param T: distillation temperature.
    :param soft_weight: weight ``w`` of the distillation term (1: pure KL to the teacher; 0: cross-entropy).
    :param teacher_logits: the teacher's logits on ``reward_data`` in order, when already computed.
    :param batch_size: evaluation batch size.
    """
    net = recalibrate_bn(model, train_data, n_images=n_images, batch_size=bn_batch_size)
    if teacher_logits is None:
        if teacher is None:
            raise ValueError("bn_kd_loss needs the teacher or its precomputed teacher_logits")
        teacher_logits = logits_on(teacher, reward_data, batch_size)
    logits = logits_on(net, reward_data, batch_size)
    labels = torch.cat([y for _, y in iter_batches(reward_data, batch_size)]).to(logits.device)
    teacher_logits = teacher_logits.to(logits.device).float()
    if teacher_logits.shape != logits.shape:
        raise ValueError(f"teacher_logits has shape {tuple(teacher_logits.shape)}, the model gives "
                         f"{tuple(logits.shape)} on reward_data")
    # one call over every image: kd_loss's batch means are then the means over the whole reward set
    return -kd_loss(logits, teacher_logits, labels, T=T, soft_weight=soft_weight).item()


def kd_refined(model: nn.Module, teacher: nn.Module, reward_data: EvalData, train_data: EvalData, *,
               base: Union[str, RewardEstimator] = "adaptive_bn", n_batches: int = 10, lr: float = 0.01,
               T: float = 2.0, soft_weight: float = 0.75, train_batch_size: int = 64) -> float:
    """The cheap estimator ``base`` measured on a copy after :func:`kd_finetune` (``n_batches`` KD steps on training
    images): the ``kd_refined`` estimator (every candidate) and the refined score of ``multi_fidelity`` (the env
    refines only a batch's best candidates with it, ``CandidateScorer.candidates``, and keeps the better of this
    and the cheap score).

    :param model: the pruned candidate (left unchanged).
    :param teacher: the unpruned source model (left unchanged).
    :param reward_data: validation images (evaluated in eval mode only).
    :param train_data: training images for the fine-tune (and the base's BN statistics).
    :param base: the cheap estimator: a name in :data:`REWARD_ESTIMATORS` (its default options) or a bound
        estimator ``fn(model, teacher, reward_data, train_data) -> float``.
    :param n_batches: KD steps of the fine-tune.
    :param lr: its SGD learning rate.
    :param T: its distillation temperature.
    :param soft_weight: its weight of the distillation term.
    :param train_batch_size: its batch size.
    """
    if isinstance(base, str) and base in REWARD_ESTIMATORS and base not in CHEAP_ESTIMATORS:
        raise ValueError(f"base must score one candidate on its own, one of {CHEAP_ESTIMATORS}; got {base!r}")
    fn = make_estimator(base) if isinstance(base, str) else base
    net = kd_finetune(model, teacher, train_data, n_batches=n_batches, lr=lr, T=T, soft_weight=soft_weight,
                      train_batch_size=train_batch_size)
    return float(fn(net, teacher, reward_data, train_data))


@dataclass(frozen=True)
class EstimatorSpec:
    """One entry of :data:`REWARD_ESTIMATORS`: an estimator function and what it needs. A new estimator is a
    function plus an entry (its options name the env settings they are read from, which validate them).

    :ivar fn: ``fn(model, teacher, reward_data, train_data, **options) -> float``.
    :ivar options: keyword option of ``fn`` -> the ``PruneEnvConfig`` setting it is read from.
    :ivar summary: what it estimates, in one line.
    :ivar teacher: the estimate reads the teacher (Ray actors then receive each state's teacher).
    :ivar train_images: it reads training images (BN statistics, KD batches): the task preloads them.
    :ivar teacher_logits: ``fn`` takes ``teacher_logits``, the teacher's logits on the reward images, which the
        scorer computes once per teacher.
    :ivar plain_top1: the estimate is the plain top-1 on the reward images, which the scorer computes itself (AMP /
        channels-last on CUDA; a backend may queue it without waiting).
    :ivar train_batches: the option of ``fn`` that is its number of SGD batches per call (each is counted in the
        env's ``train_batches``), or None when it trains nothing.
    :ivar refine_top: marks a multi-fidelity entry: the setting of how many of a batched look-ahead's best new
        candidates are refined. Every candidate first gets the cheap estimate named by ``fn``'s ``base`` option;
        ``fn`` is then the refinement of the best ones (``CandidateScorer.candidates``).
    """

    fn: Callable[..., float]
    options: Mapping[str, str]
    summary: str
    teacher: bool = False
    train_images: bool = False
    teacher_logits: bool = False
    plain_top1: bool = False
    train_batches: Optional[str] = None
    refine_top: Optional[str] = None

    def batches_per_call(self, options: Mapping[str, Any]) -> int:
        """SGD batches one call of ``fn`` with ``options`` trains (its :attr:`train_batches` option, else 0).

        :param options: the keyword options it is called with (a missing one takes ``fn``'s default).
        """
        if self.train_batches is None:
            return 0
        if self.train_batches in options:
            return int(options[self.train_batches])
        return int(self.default(self.train_batches))

    def default(self, option: str) -> Any:
        """The default of ``fn``'s keyword ``option`` (e.g. a multi-fidelity entry's ``base``)."""
        return inspect.signature(self.fn).parameters[option].default

    def options_from(self, settings: Any) -> Dict[str, Any]:
        """The keyword options of ``fn`` read from an env config.

        :param settings: a :class:`~pruning_env.envs.config.PruneEnvConfig`.
        """
        return {option: getattr(settings, name) for option, name in self.options.items()}


#: estimator name -> its entry; ``vanilla`` is the authors' reward
REWARD_ESTIMATORS: Dict[str, EstimatorSpec] = {
    "vanilla": EstimatorSpec(vanilla, {"batch_size": "eval_batch_size"},
                             "the authors': top-1 right after pruning", plain_top1=True),
    "adaptive_bn": EstimatorSpec(adaptive_bn, {"batch_size": "eval_batch_size", "n_images": "reward_train_images",
                                               "bn_batch_size": "reward_bn_batch_size"},
                                 "EagleEye: top-1 after re-estimating BatchNorm statistics on training images",
                                 train_images=True),
    "short_kd": EstimatorSpec(short_kd, {"batch_size": "eval_batch_size", "n_batches": "reward_kd_batches",
                                         "lr": "reward_kd_lr", "T": "kd_T", "soft_weight": "kd_soft_weight"},
                              "top-1 after reward_kd_batches SGD steps of distillation from the teacher",
                              teacher=True, train_images=True, train_batches="n_batches"),
    "teacher_agreement": EstimatorSpec(teacher_agreement, {"batch_size": "eval_batch_size",
                                                           "metric": "reward_agreement"},
                                       "agreement with the teacher's predictions (top-1 or -KL), no labels",
                                       teacher=True, teacher_logits=True),
    "bn_kd_loss": EstimatorSpec(bn_kd_loss, {"batch_size": "eval_batch_size", "n_images": "reward_train_images",
                                             "bn_batch_size": "reward_bn_batch_size", "T": "kd_T",
                                             "soft_weight": "kd_soft_weight"},
                                "minus the fine-tune's KD loss (KL + CE) after re-estimating BatchNorm statistics",
                                teacher=True, train_images=True, teacher_logits=True),
    "multi_fidelity": EstimatorSpec(kd_refined, {"base": "reward_refine_base", "n_batches": "reward_kd_batches",
                                                 "lr": "reward_kd_lr", "T": "kd_T", "soft_weight": "kd_soft_weight"},
                                    "successive halving: reward_refine_base for every candidate of a batch, "
                                    "re-measured after a short KD fine-tune for its reward_refine_top best",
                                    teacher=True, train_images=True, train_batches="n_batches",
                                    refine_top="reward_refine_top"),
    "kd_refined": EstimatorSpec(kd_refined, {"base": "reward_refine_base", "n_batches": "reward_kd_batches",
                                             "lr": "reward_kd_lr", "T": "kd_T", "soft_weight": "kd_soft_weight"},
                                "reward_refine_base after a short KD fine-tune (reward_kd_batches steps), for every "
                                "candidate: the estimate that ranks candidates at 8x (reward_fidelity_ceiling.md)",
                                teacher=True, train_images=True, train_batches="n_batches"),
}
#: the estimators that score one candidate on their own, built on no other: the cheap estimates that a
#: multi-fidelity entry and ``kd_refined`` can build on
CHEAP_ESTIMATORS = tuple(name for name, spec in REWARD_ESTIMATORS.items()
                         if spec.refine_top is None and "base" not in spec.options)


def make_estimator(name: str, **options: Union[int, float, str]) -> RewardEstimator:
    """The estimator called ``name`` with its keyword ``options`` bound.

    :param name: a key of :data:`REWARD_ESTIMATORS`.
    :param options: keyword options of that function, e.g. ``n_images=256`` for ``adaptive_bn``.
    """
    if name not in REWARD_ESTIMATORS:
        raise ValueError(f"unknown reward estimator {name!r}; choose from {', '.join(REWARD_ESTIMATORS)}")
    fn = REWARD_ESTIMATORS[name].fn
    allowed = [p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"reward estimator {name!r} has no option(s) {unknown}; its options are {allowed}")
    return functools.partial(fn, **options) if options else fn


__all__ = ["RewardEstimator", "REWARD_ESTIMATORS", "CHEAP_ESTIMATORS", "EstimatorSpec", "AGREEMENT_METRICS",
           "make_estimator", "recalibrate_bn", "kd_finetune", "logits_on", "vanilla", "adaptive_bn", "short_kd",
           "teacher_agreement", "bn_kd_loss", "kd_refined"]
