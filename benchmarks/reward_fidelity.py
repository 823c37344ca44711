"""Reward fidelity against its ceiling: how well each reward estimator ranks random budgeted candidates by their
test top-1 after one fixed knowledge-distillation fine-tune, measured against the ground truth's own test-retest
reliability (every candidate fine-tuned with ``--ft-seeds`` seeds), with bootstrap spread and the cost of one
estimate as a multiple of one vanilla evaluation (measured wall time and counted images / SGD batches).

    python benchmarks/reward_fidelity.py --targets 0.875 0.5 --tag ceiling      # the CPU benchmark model
    python benchmarks/reward_fidelity.py --candidates 4 --finetune-epochs 1 --tag smoke --cache logs/fid_smoke
Candidates are built with the engine (Pruner plan/apply): per-group sparsities ``min(lambda * u_g, max_sparsity)``
with ``u_g ~ U(0, 1)`` and ``lambda`` bisected to the FLOPs-reduction target. Every unit of work is one atomic
JSON file under ``--cache`` (a folder): one per (target, candidate, estimator) and one per (target, candidate,
fine-tune seed), so an interrupted run resumes where it stopped and shards (``--shard K/N``) fill one folder.
Writes benchmarks/results/reward_fidelity{_TAG}.md|json|png.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from pruning_env.checkpoint import load_model, read_meta
from pruning_env.data import make_datasets, preload
from pruning_env.envs.budget import bisect_increasing
from pruning_env.envs.reward import REWARD_ESTIMATORS, logits_on, make_estimator
from pruning_env.pruning import Pruner
from pruning_env.runtime import atomic_write_text, seed_everything
from pruning_env.training import evaluate, finetune
from rl_prune.run_folder import weights_hash

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: benchmarks.common is imported from the repository root
    sys.path.insert(0, str(ROOT))

from benchmarks.common import spearman  # noqa: E402

#: estimator label -> (registered name, options, validation images per estimate: None = every one); vanilla is
#: first: every cost is a ratio to it. ``*_all``: variant (a), more images per estimate (every validation image,
#: BN statistics from 1,024 training images); ``bn_kd_loss*``: (b), a smoother signal; ``kd_refined*``: the
#: refinement of (c), ``multi_fidelity``, measured on every candidate (the summary simulates the successive
#: halving from it and from its cheap base): the same function and options as the env's ``kd_refined`` entry, kept
#: under the ``multi_fidelity`` name that the committed units (``--restore``) record.
ESTIMATORS: Dict[str, Tuple[str, Dict[str, Any], Optional[int]]] = {
    "vanilla": ("vanilla", {}, 250),
    "vanilla_all": ("vanilla", {}, None),
    "adaptive_bn": ("adaptive_bn", {"n_images": 256, "bn_batch_size": 64}, 250),
    "adaptive_bn_all": ("adaptive_bn", {"n_images": 1024, "bn_batch_size": 64}, None),
    "bn_kd_loss": ("bn_kd_loss", {"n_images": 256, "bn_batch_size": 64}, 250),
    "bn_kd_loss_all": ("bn_kd_loss", {"n_images": 1024, "bn_batch_size": 64}, None),
    "teacher_agreement_kl": ("teacher_agreement", {"metric": "kl"}, 250),
    "short_kd": ("short_kd", {"n_batches": 10, "lr": 0.01, "train_batch_size": 64}, 250),
    "kd_refined10": ("multi_fidelity", {"base": "adaptive_bn", "n_batches": 10, "lr": 0.01,
                                        "train_batch_size": 64}, 250),
    "kd_refined50": ("multi_fidelity", {"base": "adaptive_bn", "n_batches": 50, "lr": 0.01,
                                        "train_batch_size": 64}, 250),
    "kd_refined200": ("multi_fidelity", {"base": "adaptive_bn", "n_batches": 200, "lr": 0.01,
                                         "train_batch_size": 64}, 250),
}
#: the estimators of a random-candidate run unless ``--estimators`` names others (the committed tables' set;
#: ``kd_refined200``, about 3 epochs of the 4k training images, is measured on the searched models:
#: ``reward_fidelity_searched.py``)
DEFAULT_ESTIMATORS = [k for k in ESTIMATORS if k != "kd_refined200"]
#: simulated multi-fidelity searches: label -> (cheap estimator label, refined label, batch size, refined per batch)
MULTI_FIDELITY = {
    "multi_fidelity10": ("adaptive_bn", "kd_refined10", 10, 2),
    "multi_fidelity50": ("adaptive_bn", "kd_refined50", 10, 2),
}
#: the training images the estimators read (BN statistics, KD batches): a seeded subset of the training split
BN_TRAIN_IMAGES = 1024
#: fine-tune seed ``s`` of a candidate whose seed is ``c`` is ``c + FT_SEED_STRIDE * s`` (seed 0: the candidate's)
FT_SEED_STRIDE = 104729


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="checkpoints/vgg19_w0.25_cifar10_5k.pt",
                   help="pretrained zoo checkpoint (its meta gives the dataset, split seed and val size); relative "
                        "paths, also the dataset path in its meta, are read from the working directory (run "
                        "from the repository root)")
    p.add_argument("--targets", type=float, nargs="+", default=[0.875, 0.5], help="FLOPs reductions, in order")
    p.add_argument("--candidates", type=int, default=30, help="random candidates per target")
    p.add_argument("--ft-seeds", type=int, default=2,
                   help="fine-tunes per candidate, each with its own seed (2: the truth's test-retest rho)")
    p.add_argument("--estimators", nargs="+", default=DEFAULT_ESTIMATORS, choices=list(ESTIMATORS),
                   help="which estimators to compute (labels of ESTIMATORS)")
    p.add_argument("--max-sparsity", type=float, default=0.9, help="per-group cap on the removed fraction")
    p.add_argument("--calibration", type=int, default=100, help="training images of the Taylor importance")
    p.add_argument("--finetune-epochs", type=int, default=15, help="the fixed KD fine-tune of every candidate")
    p.add_argument("--finetune-lr", type=float, default=0.01)
    p.add_argument("--bootstrap", type=int, default=2000, help="resamples of the candidates for the spreads")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the shared box has 2 cores)")
    p.add_argument("--finetune-device", default="cpu",
                   help="where the fine-tune runs (the estimators always run on the CPU, so costs compare)")
    p.add_argument("--shard", default=None, metavar="K/N",
                   help="only fill the cache with candidates i where i %% N == K (parallel workers; no summary)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default="logs/reward_fidelity",
                   help="folder of finished units (resume): settings.json, then TARGET/cNNN/{est_LABEL,ftS}.json")
    p.add_argument("--restore", default=None, metavar="JSON",
                   help="first fill the cache with the finished candidates of a results JSON this script wrote with "
                        "the same settings and base checkpoint (its weights hash): the committed results carry "
                        "the work when the cache folder is lost")
    p.add_argument("--summary-only", action="store_true",
                   help="summarize the cached units without computing missing ones")
    p.add_argument("--note", default="", help="a paragraph for the markdown (e.g. how the cache was filled)")
    p.add_argument("--tag", default="", help="suffix of the result files")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    return p


def random_sparsity(pruner: Pruner, target: float, rng: np.random.Generator, cap: float) -> np.ndarray:
    """Per-group sparsities ``min(lambda * u, cap)`` whose plan removes ``target`` of the MACs.

    :param pruner: the Pruner of the unpruned model.
    :param target: FLOPs (MACs) reduction to reach.
    :param rng: source of ``u ~ U(0, 1)`` per group.
    :param cap: largest removed fraction of any group.
    """
    u = rng.uniform(0.0, 1.0, pruner.n_groups)
    full = pruner.plan_cost(sparsity=0.0).macs

    def reduction(lam: float) -> float:
        return 1.0 - pruner.plan_cost(sparsity=np.minimum(lam * u, cap)).macs / full

    lam, reached = bisect_increasing(reduction, target, 0.0, cap / max(u.min(), 1e-6), iters=40)
    if abs(reached - target) > 0.02:
        raise ValueError(f"could not reach a FLOPs reduction of {target} with max_sparsity {cap} "
                         f"(reached {reached:.3f}); raise --max-sparsity")
    return np.minimum(lam * u, cap)



def _timed(fn: Callable[[], float]) -> Tuple[float, float]:
    t0 = time.perf_counter()
    value = fn()
    return float(value), time.perf_counter() - t0


def estimate_counts(name: str, options: Dict[str, Any], n_reward: int) -> Dict[str, int]:
    """What one estimate reads, counted from its registry entry and options: validation images evaluated, training
    images passed through the BN re-estimation and SGD batches trained (``EstimatorSpec.batches_per_call``)."""
    spec = REWARD_ESTIMATORS[name]
    bn = 0
    if name in ("adaptive_bn", "bn_kd_loss"):
        bn = int(options.get("n_images", 256))
    elif spec.refine_top is not None:  # the refinement re-measures with its cheap base (default options)
        bn = 256 if options.get("base", "adaptive_bn") in ("adaptive_bn", "bn_kd_loss") else 0
    return {"val_images": int(n_reward), "bn_images": bn, "sgd_batches": spec.batches_per_call(options)}


class Units:
    """The resumable cache: one atomic JSON file per unit of work under ``root``.

    ``root/settings.json`` holds the settings every unit depends on, the base checkpoint's weights hash among them (a
    run with other settings, or with another checkpoint at the same path, is refused);
    ``root/t{target}/c{i:03d}/est_{label}.json`` one estimate (with its estimator's name, options and image count,
    recomputed when they differ) and ``root/t{target}/c{i:03d}/ft{s}.json`` one fine-tune.
    """

    def __init__(self, root: Path, settings: Dict[str, Any]):
        self.root = Path(root)
        path = self.root / "settings.json"
        settings = json.loads(json.dumps(settings))
        if path.is_file():
            cached = json.loads(path.read_text())
            if cached != settings:
                raise SystemExit(f"error: {path} was made with other settings {cached} (now {settings}); pass "
                                 f"another --cache")
        else:
            atomic_write_text(json.dumps(settings, indent=1), path)

    def cell(self, target: float, i: Union[int, str], unit: str) -> Path:
        """The file of one unit; ``i`` is a candidate's number, or a name (a searched model's unit name)."""
        return self.root / f"t{target:g}" / (i if isinstance(i, str) else f"c{i:03d}") / f"{unit}.json"

    def read(self, target: float, i: Union[int, str], unit: str, spec: Optional[Dict[str, Any]] = None) -> Optional[Dict]:
        path = self.cell(target, i, unit)
        if not path.is_file():
            return None
        row = json.loads(path.read_text())
        if spec is not None and row.get("spec") != json.loads(json.dumps(spec)):
            return None
        return row

    def write(self, target: float, i: Union[int, str], unit: str, row: Dict[str, Any]) -> None:
        atomic_write_text(json.dumps(row), self.cell(target, i, unit))


class EstimationContext(NamedTuple):
    """What every estimate reads, the same for a random candidate and for a searched model."""
    #: the base checkpoint's model (eval mode): the teacher and the source every candidate is cut from
    teacher: nn.Module
    #: train / val / test splits with the training augmentation, and without it
    splits: Any
    plain: Any
    #: preloaded validation images per estimator image count (None: every one), and the teacher's logits on them
    rewards: Dict[Optional[int], Any]
    teacher_logits: Dict[Optional[int], torch.Tensor]
    #: the training images of BN re-estimation and KD batches (never a validation or test image)
    bn_train: Any


def estimation_context(checkpoint: str, seed: int) -> EstimationContext:
    """The base model and the data of the estimators, drawn with ``seed`` from the checkpoint's own split."""
    seed_everything(seed)
    meta = read_meta(checkpoint)
    teacher = load_model(checkpoint).eval()
    splits = make_datasets(meta["dataset"], val_size=meta["val_size"], seed=meta["seed"])
    plain = make_datasets(meta["dataset"], val_size=meta["val_size"], seed=meta["seed"], augment=False)
    sizes = sorted({r for _, _, r in ESTIMATORS.values()}, key=lambda r: -1 if r is None else r)
    rewards = {r: preload(splits.val, n=r, seed=seed) for r in sizes}
    teacher_logits = {r: logits_on(teacher, data) for r, data in rewards.items()}
    bn_train = preload(plain.train, n=BN_TRAIN_IMAGES, seed=seed + 1)  # training images only
    return EstimationContext(teacher, splits, plain, rewards, teacher_logits, bn_train)


def restore_units(units: Units, path: Path, settings: Dict[str, Any]) -> int:
    """Write the finished candidates of results JSON ``path`` into ``units`` (existing units are kept) and return
    how many unit files were written; refused unless every cache setting, the base checkpoint's weights hash among
    them, equals the JSON's.

    :param units: the cache.
    :param path: a ``reward_fidelity*.json`` this script wrote.
    :param settings: the cache settings of the present run.
    """
    if not path.is_file():
        raise SystemExit(f"error: --restore {path}: no such file")
    saved = json.loads(path.read_text())
    theirs = saved.get("settings", {})
    differ = {k: (theirs.get(k), v) for k, v in json.loads(json.dumps(settings)).items() if theirs.get(k) != v}
    if differ:
        raise SystemExit(f"error: --restore {path} was made with other settings or another base checkpoint "
                         f"(setting: (theirs, now)): {differ}")
    written = 0
    for target, rows in saved.get("candidates", {}).items():
        for row in rows:
            i = int(row["i"])
            cells = [(f"ft{s}", ft) for s, ft in enumerate(row["ft"])]
            cells += [(f"est_{label}", est) for label, est in row["est"].items()]
            for unit, value in cells:
                if not units.cell(float(target), i, unit).is_file():
                    units.write(float(target), i, unit, value)
                    written += 1
    return written


def _spec(label: str) -> Dict[str, Any]:
    name, options, n_reward = ESTIMATORS[label]
    return {"name": name, "options": options, "reward_samples": n_reward}


def run_estimates(student: nn.Module, teacher: nn.Module, labels: Sequence[str], rewards: Dict[Optional[int], Any],
                  teacher_logits: Dict[Optional[int], torch.Tensor], bn_train, seed: int, units: Units,
                  target: float, i: Union[int, str]) -> None:
    """Every missing estimate of one candidate (CPU, one unit file each)."""
    for label in labels:
        spec = _spec(label)
        if units.read(target, i, f"est_{label}", spec) is not None:
            continue
        name, options, n_reward = ESTIMATORS[label]
        extra = {"teacher_logits": teacher_logits[n_reward]} if REWARD_ESTIMATORS[name].teacher_logits else {}
        fn = make_estimator(name, **options)
        torch.manual_seed(seed)
        data = rewards[n_reward]
        value, seconds = _timed(lambda: fn(student, teacher, data, bn_train, **extra))
        units.write(target, i, f"est_{label}", {"spec": spec, "value": value, "seconds": seconds,
                                                **estimate_counts(name, options, len(data[1]))})


def run_finetune(student: nn.Module, ft_teacher: nn.Module, splits, test_data, args: argparse.Namespace,
                 seed: int) -> Dict[str, Any]:
    """The fixed KD fine-tune of a copy of ``student`` (from ``ft_teacher``, on ``--finetune-device``) and its
    val / test top-1 (every image of ``test_data``, the preloaded test split; the per-image correctness
    too, for split-half checks)."""
    net = copy.deepcopy(student).to(args.finetune_device)
    t0 = time.perf_counter()
    finetune(net, splits.train, epochs=args.finetune_epochs, lr=args.finetune_lr, teacher=ft_teacher,
             batch_size=128, device=args.finetune_device, seed=seed, progress=False)
    seconds = time.perf_counter() - t0
    net.eval()
    correct = (logits_on(net, test_data).argmax(1).cpu() == test_data[1]).numpy().astype(int)
    return {"seed": seed, "seconds": seconds, "test_top1": float(correct.mean()),
            "val_top1": evaluate(net, splits.val)["top1"], "test_correct": "".join(map(str, correct))}


def bootstrap_rho(x: Sequence[float], y: Sequence[float], n: int, seed: int) -> Dict[str, float]:
    """Spearman rho of (x, y) and its spread over ``n`` resamples of the pairs."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    rho = spearman(x, y)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n):
        idx = rng.integers(0, len(x), len(x))
        if np.ptp(x[idx]) > 0 and np.ptp(y[idx]) > 0:
            draws.append(spearman(x[idx], y[idx]))
    draws = np.asarray(draws, float)
    return {"rho": rho, "boot_mean": float(draws.mean()), "boot_std": float(draws.std()),
            "ci95_low": float(np.percentile(draws, 2.5)), "ci95_high": float(np.percentile(draws, 97.5))}


def spearman_brown(r: float, k: int = 2) -> float:
    """Reliability of the mean of ``k`` parallel measurements whose single-measurement reliability is ``r``:
    ``k r / (1 + (k - 1) r)`` (e.g. the test-retest rho of two fine-tune seeds gives the mean-of-two's)."""
    if not (-1.0 <= r <= 1.0):
        raise ValueError(f"a reliability must lie in [-1, 1], got {r}")
    if k < 1:
        raise ValueError(f"k must be a positive count of measurements, got {k}")
    denominator = 1.0 + (k - 1) * r
    return float(k * r / denominator) if denominator > 0 else float("nan")


def fidelity_vs_ceiling(estimate: Sequence[float], seed_a: Sequence[float], seed_b: Sequence[float]) -> Dict[str, float]:
    """An estimator's Spearman rho against the mean-of-two-seeds truth, against that truth's own ceiling.

    ``retest``: rho between the two seeds' truths; ``reliability``: its Spearman-Brown value for their mean;
    ``ceiling``: the highest rho any estimator can reach against a criterion of that reliability,
    ``sqrt(reliability)`` (attenuation); ``share``: ``rho / ceiling`` (nan when the truth is not reliable).
    """
    a, b = np.asarray(seed_a, float), np.asarray(seed_b, float)
    if not (len(estimate) == len(a) == len(b)):
        raise ValueError(f"estimate, seed_a and seed_b need one value per candidate, got lengths "
                         f"{len(estimate)}, {len(a)}, {len(b)}")
    retest = spearman(a, b)
    rel = spearman_brown(retest) if np.isfinite(retest) else float("nan")
    ceiling = float(np.sqrt(rel)) if np.isfinite(rel) and rel > 0 else float("nan")
    rho = spearman(estimate, (a + b) / 2.0)
    return {"rho": rho, "retest": retest, "reliability": rel, "ceiling": ceiling,
            "share": rho / ceiling if np.isfinite(ceiling) else float("nan"),
            "distinct": int(len(np.unique(np.asarray(estimate, float))))}


#: the truth's own numbers in a :func:`bootstrap_fidelity` result (the same for every estimator of a target)
CEILING_KEYS = ("retest", "retest_std", "retest_ci95", "reliability", "ceiling", "ceiling_std", "ceiling_ci95")


def bootstrap_fidelity(estimate: Sequence[float], seed_a: Sequence[float], seed_b: Sequence[float], n: int,
                       seed: int) -> Dict[str, Any]:
    """:func:`fidelity_vs_ceiling` and the spread of each of its numbers over ``n`` resamples of the candidates
    (fixed ``seed``; resamples where a quantity is undefined are left out of that quantity)."""
    e, a, b = (np.asarray(v, float) for v in (estimate, seed_a, seed_b))
    point = fidelity_vs_ceiling(e, a, b)
    rng = np.random.default_rng(seed)
    draws: Dict[str, list] = {k: [] for k in ("rho", "retest", "ceiling", "share")}
    for _ in range(n):
        idx = rng.integers(0, len(e), len(e))
        d = fidelity_vs_ceiling(e[idx], a[idx], b[idx])
        for k in draws:
            if np.isfinite(d[k]):
                draws[k].append(d[k])
    out: Dict[str, Any] = dict(point)
    for k, v in draws.items():
        v = np.asarray(v, float)
        out[f"{k}_std"] = float(v.std()) if len(v) else float("nan")
        out[f"{k}_ci95"] = ([float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if len(v)
                            else [float("nan"), float("nan")])
    return out



def _collect(units: Units, target: float, n: int, ft_seeds: int, labels: Sequence[str]) -> List[Dict[str, Any]]:
    """The finished candidates of a target: every fine-tune seed done (estimates as far as present)."""
    rows = []
    for i in range(n):
        fts = [units.read(target, i, f"ft{s}") for s in range(ft_seeds)]
        if any(f is None for f in fts):
            continue
        est = {label: units.read(target, i, f"est_{label}", _spec(label)) for label in labels}
        rows.append({"i": i, "ft": fts, "est": {k: v for k, v in est.items() if v is not None}})
    return rows


def multi_fidelity_scores(cheap: np.ndarray, refined: np.ndarray, batch: int, top: int) -> Tuple[np.ndarray, np.ndarray]:
    """The env's successive halving on candidates taken in order in batches of ``batch``: every one keeps its
    cheap score but the ``top`` best of each batch by it (ties: the earlier), whose score is the better of the
    cheap and the refined one (``CandidateScorer.candidates``). Returns the scores and the refined mask."""
    scores, mask = cheap.astype(float).copy(), np.zeros(len(cheap), bool)
    for start in range(0, len(cheap), batch):
        idx = np.arange(start, min(start + batch, len(cheap)))
        best = idx[np.argsort(-cheap[idx], kind="stable")[:top]]
        mask[best] = True
        scores[best] = np.maximum(cheap[best], refined[best])
    return scores, mask


def pick_regret(score: np.ndarray, truth: np.ndarray, batch: int, n: int, seed: int,
                refine: Optional[Tuple[np.ndarray, int]] = None) -> Dict[str, float]:
    """What choosing by ``score`` loses: over ``n`` random batches of ``batch`` candidates, the truth of the best
    candidate minus the truth of the one with the highest score (ties: the earlier), in top-1 points; with
    ``refine=(refined, top)`` the score is the multi-fidelity one within each batch."""
    rng = np.random.default_rng(seed)
    regrets = []
    for _ in range(n):
        idx = rng.choice(len(truth), size=min(batch, len(truth)), replace=False)
        s = score[idx]
        if refine is not None:
            s, _ = multi_fidelity_scores(s, refine[0][idx], len(idx), refine[1])
        regrets.append(truth[idx].max() - truth[idx][int(np.argmax(s))])
    regrets = np.asarray(regrets) * 100
    return {"regret": float(regrets.mean()), "regret_std": float(regrets.std())}


def summarize(units: Units, targets: Sequence[float], n_cand: int, ft_seeds: int, labels: Sequence[str],
              n_boot: int, seed: int, pick_batch: int = 10) -> Dict[str, Any]:
    """Per target: the truth's test-retest rho and ceiling, and per estimator its rho against the mean-of-seeds
    truth as a share of the ceiling (bootstrap spread), the pick regret, and its cost relative to vanilla."""
    out: Dict[str, Any] = {}
    for t in targets:
        rows = _collect(units, t, n_cand, ft_seeds, labels)
        if len(rows) < 4 or "vanilla" not in labels:
            continue
        a = np.array([r["ft"][0]["test_top1"] for r in rows])
        b = np.array([r["ft"][1]["test_top1"] for r in rows]) if ft_seeds > 1 else a
        truth = (a + b) / 2
        full = [r for r in rows if all(k in r["est"] for k in labels)]
        vanilla_s = float(np.median([r["est"]["vanilla"]["seconds"] for r in full]))
        s: Dict[str, Any] = {
            "n": len(rows), "n_complete": len(full),
            "test_top1_mean": float(truth.mean()), "test_top1_std": float(truth.std()),
            "seed_gap_mean": float(np.abs(a - b).mean()), "seed_gap_max": float(np.abs(a - b).max()),
            "finetune_seconds_median": float(np.median([f["seconds"] for r in rows for f in r["ft"]])),
            "vanilla_seconds_median": vanilla_s, "estimators": {}}
        keep = [r["i"] for r in full]
        sel = np.array([r["i"] in keep for r in rows])
        ta, tb, tt = a[sel], b[sel], truth[sel]
        values = {k: np.array([r["est"][k]["value"] for r in full]) for k in labels}
        costs = {k: {"seconds": float(np.median([r["est"][k]["seconds"] for r in full])),
                     **{c: full[0]["est"][k][c] for c in ("val_images", "bn_images", "sgd_batches")}}
                 for k in labels}
        derived = {k: v for k, v in MULTI_FIDELITY.items() if v[0] in labels and v[1] in labels}
        for k, (cheap, refined, batch, top) in derived.items():
            values[k], _ = multi_fidelity_scores(values[cheap], values[refined], batch, top)
            f = top / batch
            costs[k] = {c: costs[cheap][c] + f * costs[refined][c] for c in ("seconds", "val_images", "bn_images",
                                                                             "sgd_batches")}
        for k, v in values.items():
            stats = bootstrap_fidelity(v, ta, tb, n_boot, seed) if ft_seeds > 1 else bootstrap_rho(v, tt, n_boot, seed)
            stats["rho_seed0"] = spearman(v, ta)
            stats["cost_ratio"] = costs[k]["seconds"] / vanilla_s
            stats.update({c: costs[k][c] for c in ("val_images", "bn_images", "sgd_batches")})
            stats["mean"] = float(np.mean(v))
            refine = None
            if k in derived:
                cheap, refined, batch, top = derived[k]
                refine = (values[refined], top)
                stats.update(pick_regret(values[cheap], tt, pick_batch, n_boot, seed, refine))
            else:
                stats.update(pick_regret(v, tt, pick_batch, n_boot, seed))
            s["estimators"][k] = stats
        rnd = np.random.default_rng(seed)
        s["random_pick_regret"] = float(np.mean([tt[idx].max() - tt[idx][0] for idx in
                                                 (rnd.choice(len(tt), min(pick_batch, len(tt)), replace=False)
                                                  for _ in range(n_boot))]) * 100)
        if ft_seeds > 1:
            s.update({k: s["estimators"]["vanilla"][k] for k in CEILING_KEYS})
        out[f"{t:g}"] = s
    return out


def write_markdown(path: Path, summary: Dict[str, Any], settings: Dict[str, Any], command: str,
                   base: Dict[str, Any]) -> None:
    lines = ["# Reward fidelity against its ceiling: which estimate ranks candidates by fine-tuned accuracy?", "",
             f"Command: `{command}`", "",
             f"Base model: `{settings['checkpoint']}` (val top-1 {base['val_top1']:.3f}, test top-1 "
             f"{base['test_top1']:.3f}; weights sha256 `{str(settings.get('checkpoint_weights'))[:12]}`). "
             f"Candidates: random budgeted per-group sparsities (cap "
             f"{settings['max_sparsity']}), Taylor order from {settings['calibration']} training images. "
             f"Ground truth: test top-1 (all {base['n_test']} test images) after {settings['finetune_epochs']} "
             f"epochs of KD fine-tune (lr {settings['finetune_lr']}, batch 128, teacher = base model), each "
             f"candidate fine-tuned with {settings['ft_seeds']} seeds; the truth is their mean. "
             "**retest**: Spearman rho between the seeds' test top-1s (the truth's test-retest reliability; both "
             "seeds read the same test images, so test-sampling noise is not in it); **ceiling**: "
             "sqrt(Spearman-Brown reliability of the mean of the seeds), the highest rho any estimator can reach "
             "against that truth; **rho / ceiling**: an estimator's rho against the mean truth as a share of it. "
             f"Spread: std and 95 % interval over {settings['bootstrap']} bootstrap resamples of the candidates "
             "(the ceiling is re-estimated in each). **Cost**: median wall seconds of one estimate / median of one "
             "vanilla evaluation (250 images), one CPU thread on a shared machine, and what one estimate reads: "
             "validation images evaluated, training images through the BN re-estimation, SGD batches of 64 "
             "(each also runs the teacher). **Pick regret**: over random batches of 10 candidates (RL-Pruner's "
             "sample_num), the truth of the batch's best minus that of the estimator's choice, in top-1 points. "
             "BN statistics and KD batches come from training images only; estimators read validation images "
             "only; the test split is read only after the fine-tunes. rho is nan where an estimator gives every "
             "candidate the same value (distinct values: 1).", "",
             "Estimators (`pruning_env/envs/reward.py` registry names and options): " + "; ".join(
                 f"`{k}` = `{n}` {o}{' on every validation image' if r is None else f' on {r} validation images'}"
                 for k, (n, o, r) in settings["estimators"].items()) + ". " + "; ".join(
                 f"`{k}`: the env's successive halving, `{c}` for all, the best {top} of each batch of {bt} "
                 f"(in candidate order) re-scored by `{rf}` and kept at the better of the two; its cost is the "
                 f"cheap one plus {top}/{bt} of the refinement" for k, (c, rf, bt, top) in MULTI_FIDELITY.items())
             + ".", ""]
    for key, s in summary.items():
        lines += [f"## FLOPs reduction {float(key):.1%} ({s['n']} candidates, {s['n_complete']} with every "
                  f"estimate)", ""]
        if "ceiling" in s:
            lines += [f"Truth: test top-1 {s['test_top1_mean']:.3f} ± {s['test_top1_std']:.3f} across candidates; "
                      f"the two seeds differ by {100 * s['seed_gap_mean']:.1f} points on average (at most "
                      f"{100 * s['seed_gap_max']:.1f}). **Test-retest rho {s['retest']:.3f} ± {s['retest_std']:.3f} "
                      f"[{s['retest_ci95'][0]:.3f}, {s['retest_ci95'][1]:.3f}]; ceiling {s['ceiling']:.3f} ± "
                      f"{s['ceiling_std']:.3f}.** Fine-tune {s['finetune_seconds_median']:.0f} s, vanilla "
                      f"evaluation {s['vanilla_seconds_median']:.2f} s (medians). Picking at random in a batch of "
                      f"10 loses {s['random_pick_regret']:.1f} points.", ""]
        lines += ["| estimator | rho (mean truth) | ± std | 95 % interval | **rho / ceiling** | ± std | 95 % interval | "
                  "rho (seed 0) | pick regret (pts) | cost (× vanilla, wall) | val images | BN images | "
                  "SGD batches | distinct values |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for label, e in s["estimators"].items():
            share = (f"**{e['share']:.2f}** | {e['share_std']:.2f} | [{e['share_ci95'][0]:.2f}, "
                     f"{e['share_ci95'][1]:.2f}]" if "share" in e else "– | – | –")
            spread = e.get("rho_std", e.get("boot_std"))
            ci = e.get("rho_ci95", [e.get("ci95_low"), e.get("ci95_high")])
            lines.append(f"| {label} | {e['rho']:.3f} | {spread:.3f} | [{ci[0]:.3f}, {ci[1]:.3f}] | {share} | "
                         f"{e['rho_seed0']:.3f} | {e['regret']:.1f} | {e['cost_ratio']:.1f} | "
                         f"{e['val_images']:g} | {e['bn_images']:g} | {e['sgd_batches']:g} | "
                         f"{e.get('distinct', '–')} |")
        lines.append("")
    if settings["note"]:
        lines += [settings["note"], ""]
    lines += [f"Machine: {settings['machine']}, {settings['threads']} torch thread(s), fine-tunes on "
              f"{settings['finetune_device']}.", ""]
    atomic_write_text("\n".join(lines), path)


def write_plot(path: Path, summary: Dict[str, Any]) -> None:
    """rho / ceiling per estimator and target, with the bootstrap std as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k, s in summary.items() if "ceiling" in s]
    if not keys:
        return
    labels = list(summary[keys[0]]["estimators"])
    fig, ax = plt.subplots(figsize=(max(7.0, 0.75 * len(labels) * len(keys)), 4.2))
    width = 0.8 / len(keys)
    x = np.arange(len(labels))
    for j, key in enumerate(keys):
        es = summary[key]["estimators"]
        ax.bar(x + (j - (len(keys) - 1) / 2) * width, [es[k]["share"] for k in labels], width,
               yerr=[es[k]["share_std"] for k in labels], capsize=3,
               label=f"-{float(key):.1%} FLOPs (ceiling {summary[key]['ceiling']:.2f})")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(0.8, color="k", lw=0.8, ls="--")
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("Spearman rho / ceiling (± bootstrap std)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _parse_shard(text: Optional[str]) -> Tuple[int, int]:
    if text is None:
        return 0, 1
    k, _, n = text.partition("/")
    if not (k.isdigit() and n.isdigit() and int(k) < int(n)):
        raise SystemExit(f"error: --shard must be K/N with 0 <= K < N, got {text!r}")
    return int(k), int(n)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.ft_seeds < 1 or args.candidates < 1:
        raise SystemExit(f"error: --ft-seeds and --candidates must be >= 1, got {args.ft_seeds}, {args.candidates}")
    torch.set_num_threads(args.threads)
    teacher, splits, plain, rewards, teacher_logits, bn_train = estimation_context(args.checkpoint, args.seed)
    calib = preload(plain.train, n=args.calibration, seed=args.seed + 2)
    test_data = preload(splits.test)
    pruner = Pruner(teacher, torch.zeros(1, *splits.input_size))
    pruner.compute_importance([calib], criterion="taylor")
    base = {"val_top1": evaluate(teacher, splits.val)["top1"], "test_top1": evaluate(teacher, splits.test)["top1"],
            "n_test": len(test_data[1])}

    settings = {k: getattr(args, k) for k in ("checkpoint", "max_sparsity", "calibration", "finetune_epochs",
                                              "finetune_lr", "seed")}
    settings["bn_train_images"] = BN_TRAIN_IMAGES
    # the base model's bytes, not only its path: a retrained checkpoint at the same path refuses the old cache
    settings["checkpoint_weights"] = weights_hash(teacher)
    units = Units(Path(args.cache), settings)
    if args.restore:
        print(f"restored {restore_units(units, Path(args.restore), settings)} units from {args.restore}",
              file=sys.stderr)
    shard, n_shards = _parse_shard(args.shard)
    ft_teacher = copy.deepcopy(teacher).to(args.finetune_device)
    todo = [(t, i) for t in args.targets for i in range(args.candidates) if i % n_shards == shard
            and not args.summary_only]
    for t, i in tqdm(todo, desc="candidates", dynamic_ncols=True):
        missing_est = [k for k in args.estimators if units.read(t, i, f"est_{k}", _spec(k)) is None]
        missing_ft = [s for s in range(args.ft_seeds) if units.read(t, i, f"ft{s}") is None]
        if not (missing_est or missing_ft):
            continue
        seed = args.seed * 100003 + int(round(t * 1000)) * 1009 + i
        sparsity = random_sparsity(pruner, t, np.random.default_rng(seed), args.max_sparsity)
        plan = pruner.plan(sparsity=sparsity)
        student = pruner.apply(plan).eval()
        run_estimates(student, teacher, missing_est, rewards, teacher_logits, bn_train, seed, units, t, i)
        for s in missing_ft:
            torch.manual_seed(seed + FT_SEED_STRIDE * s)
            row = run_finetune(student, ft_teacher, splits, test_data, args, seed + FT_SEED_STRIDE * s)
            cost = pruner.plan_cost(plan)
            row.update(keep=plan.num_kept.tolist(), macs=cost.macs, params=cost.params)
            units.write(t, i, f"ft{s}", row)
    if args.shard:
        return 0

    summary = summarize(units, args.targets, args.candidates, args.ft_seeds, args.estimators, args.bootstrap,
                        args.seed)
    settings.update(bootstrap=args.bootstrap, threads=args.threads, note=args.note, ft_seeds=args.ft_seeds,
                    finetune_device=args.finetune_device, candidates=args.candidates,
                    estimators={k: ESTIMATORS[k] for k in args.estimators},
                    machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                            f"{platform.system()} {platform.release()}, torch {torch.__version__}")
    given = list(sys.argv[1:] if argv is None else argv)
    if "--note" in given:  # the note is printed below the tables, not inside the command
        i = given.index("--note")
        given[i + 1] = "..."
    command = shlex.join(["python", "benchmarks/reward_fidelity.py", *given])
    out = Path(args.out)
    stem = "reward_fidelity" + (f"_{args.tag}" if args.tag else "")
    candidates = {f"{t:g}": _collect(units, t, args.candidates, args.ft_seeds, args.estimators) for t in args.targets}
    for rows in candidates.values():
        for r in rows:
            for f in r["ft"]:
                f.pop("test_correct", None)
    atomic_write_text(json.dumps({"command": command, "settings": settings, "base": base, "summary": summary,
                                  "candidates": candidates}, indent=1), out / f"{stem}.json")
    write_markdown(out / f"{stem}.md", summary, settings, command, base)
    write_plot(out / f"{stem}.png", summary)
    print((out / f"{stem}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
