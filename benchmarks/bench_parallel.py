"""Parallel candidate evaluation: one RL-Pruner pruning step (RL epochs of 10 look-ahead candidates, then the
step) with each evaluation backend, from the same state with the same noise, so rewards must match exactly.

    python benchmarks/bench_parallel.py                         # CPU: serial 1 / 2 threads, Ray 1 / 2 workers
    python benchmarks/bench_parallel.py --device cuda --tag cuda --paper   # GPU: serial, overlapped, Ray 1 GPU
Writes benchmarks/results/bench_parallel[_TAG].md|json: step times and ratios, the Ray dispatch overhead per
candidate and per state, and (from a ``--paper`` run's full-width VGG-19 measurements, this run's or a saved
one) the expected search time per step on 8 GPUs and 4 x 8 GPUs for VGG-19 / CIFAR-100 with the authors'
settings (10 RL epochs x 10 candidates on 10,000 images).
Target (issue 14): 2 Ray workers >= 1.6x serial 1-thread and faster than serial 2-thread, identical rewards.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import pickle
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import yaml

from agents.rl_pruner.policies import TopKBuffer, initial_distribution, sample_action, update_distribution
from pruning_env.envs.parallel import import_ray
from pruning_env.envs.scoring import build_model
from pruning_env.envs.prune_env import PruneEnv
from pruning_env.runtime import atomic_write_text, machine_info, sync
from pruning_env.training import evaluate

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
#: the authors' search settings (spec §2.7, §8): RL epochs x samples per pruning step, reward images, steps
PAPER = dict(lr_epoch=10, sample_num=10, reward_images=10_000, eval_batch_size=256, steps=95)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "bench_cpu_vgg19w025_npz.yaml"),
                   help="run config whose env section is the benchmark task")
    p.add_argument("--data", default=None, help="dataset override, e.g. npz:PATH (default: the config's)")
    p.add_argument("--device", default="cpu", help="cpu: serial 1/2 threads and Ray 1/2 workers; cuda: serial, "
                   "serial overlapped and 1 Ray worker on the GPU")
    p.add_argument("--epochs", type=int, default=None, help="RL epochs of the timed step (default: the config's "
                   "agents.rl_pruner.lr_epoch; authors: 10)")
    p.add_argument("--samples", type=int, default=None, help="candidates per RL epoch (default: the config's "
                   "agents.rl_pruner.sample_num; authors: 10)")
    p.add_argument("--repeats", type=int, default=2, help="timed steps per backend (the faster one is reported)")
    p.add_argument("--no-ray", action="store_true", help="serial backends only")
    p.add_argument("--paper", action="store_true", help="also measure a full-width VGG-19 / CIFAR-100 candidate "
                   "on 10,000 generated images (GPU only: minutes on a CPU) for the projection")
    p.add_argument("--tag", default="", help="suffix of the result files (bench_parallel_TAG.*)")
    p.add_argument("--out", default=str(RESULTS))
    return p


def env_settings(args: argparse.Namespace) -> Tuple[Dict[str, Any], bool]:
    """The config's env section for this benchmark (and its RL-Pruner epochs and samples unless given); an
    untrained model of the same shape when the checkpoint is missing (timings and the equality check do not
    need trained weights)."""
    cfg = yaml.safe_load(Path(args.config).read_text())
    agent = (cfg.get("agents") or {}).get("rl_pruner") or {}
    args.epochs = args.epochs or int(agent.get("lr_epoch", 3))
    args.samples = args.samples or int(agent.get("sample_num", 10))
    env = dict(cfg["env"])
    if args.data:
        env["dataset"] = args.data
    # the authors' reward (plain top-1): the one Ray actors score; the config may name an estimator for its runs
    env["reward_estimator"] = "vanilla"
    env.pop("reward_train_images", None)
    untrained = not Path(str(env.get("checkpoint", ""))).is_file()
    if untrained:
        env.pop("checkpoint", None)
        env["pretrained"] = False
    env.update(device=args.device, record_timings=True,
               lookahead_cache=args.epochs * args.samples + 1)  # the chosen candidate is never evicted
    return env, untrained


def backends(args: argparse.Namespace) -> List[Tuple[str, int, Dict[str, Any]]]:
    """(label, torch threads in this process, parallel section) per timed setting."""
    ray = not args.no_ray
    if ray:
        try:
            import_ray()
        except ImportError as err:
            print(f"note: {err}; timing the serial backends only", flush=True)
            ray = False
    if args.device.startswith("cuda"):
        rows = [("serial", 1, {"backend": "serial", "overlap": False}),
                ("serial, overlapped", 1, {"backend": "serial", "overlap": True})]
        return rows + ([("Ray, 1 worker (1 GPU)", 1, {"backend": "ray", "num_workers": 1})] if ray else [])
    rows = [("serial, 1 thread", 1, {"backend": "serial"}), ("serial, 2 threads", 2, {"backend": "serial"})]
    if ray:
        # the driver plans while the workers score; its own torch work (the next state's importance) runs
        # while they idle, so it may use as many threads as there are workers
        rows += [("Ray, 1 worker", 1, {"backend": "ray", "num_workers": 1}),
                 ("Ray, 2 workers", 2, {"backend": "ray", "num_workers": 2})]
    return rows


def rl_step(env: PruneEnv, epochs: int, samples: int, seed: int) -> Dict[str, Any]:
    """One RL-Pruner pruning step as the agent runs it (spec §2.7-2.8): per RL epoch, ``samples`` noisy copies
    of the PD scored by one batched look-ahead, the top-K buffer, the PD update; then ``env.step`` with the
    buffer's best (a cached candidate). Returns the wall times and every reward."""
    rng = np.random.default_rng(seed)
    eligible = env.current_channels > env.config.min_channels
    scale = np.sqrt(env.layer_counts.astype(np.float64))
    pd = initial_distribution(env.current_channels, env.layer_counts, eligible)
    buffer = TopKBuffer(samples)
    best_q, rewards, epoch_s = 0.0, [], []
    sync(env.device)
    t0 = time.perf_counter()
    for _ in range(epochs):
        actions = [sample_action(pd, rng, 0.04, eligible, noise_scale=scale) for _ in range(samples)]
        te = time.perf_counter()
        r, _ = env.evaluate_actions(actions)
        epoch_s.append(time.perf_counter() - te)
        rewards += r
        for q, a in zip(r, actions):
            buffer.offer(q, a)
        if max(r) > best_q:
            best_q = max(r)
            pd = update_distribution(pd, buffer.best().action, 0.1, True, 0.25, eligible)
    t1 = time.perf_counter()
    _, reward, *_ = env.step(buffer.best().action)
    sync(env.device)
    t2 = time.perf_counter()
    return dict(step_s=t2 - t0, sampling_s=t1 - t0, env_step_s=t2 - t1, epoch_s=epoch_s, rewards=rewards,
                chosen_reward=float(reward))


def plan_actions(env: PruneEnv, count: int, seed: int) -> List[np.ndarray]:
    rng = np.random.default_rng(seed)
    pd = initial_distribution(env.current_channels, env.layer_counts)
    return [sample_action(pd, rng, 0.04) for _ in range(count)]


def bare_ratio(env: PruneEnv, samples: int, seed: int) -> Dict[str, float]:
    """A batch of look-aheads against plain evaluation passes of the very models it builds (the floor)."""
    actions = plan_actions(env, samples, seed)
    pruner = env.pruner
    models = [build_model(pruner, pruner.plan(keep=env.keep_for_action(a)), env.channels_last) for a in actions]
    reward = env.task.reward_data

    def bare_pass() -> float:
        sync(env.device)
        t0 = time.perf_counter()
        for m in models:
            evaluate(m, reward, device=env.device, batch_size=env.eval_batch_size, amp=env.amp,
                     channels_last=env.channels_last)
        sync(env.device)
        return time.perf_counter() - t0

    bare_pass()  # these layer shapes are new: both timed passes below meet them warm
    t0 = time.perf_counter()
    env.evaluate_actions(actions)
    sync(env.device)
    batch = time.perf_counter() - t0
    bare = bare_pass()
    return dict(bare_eval_s=bare, lookahead_batch_s=batch, lookahead_over_bare=batch / bare)


def ray_overheads(env: PruneEnv, samples: int, repeats: int = 3) -> Dict[str, float]:
    """Dispatch overhead of the Ray backend at the current state: per candidate, the worker time not spent in
    surgery or evaluation (``(workers x wall - busy) / candidates``, load imbalance included); per state, the
    extra wall time of a batch whose pruner must first go through the object store to every worker."""
    backend = env.evaluation_backend
    pruner = env.pruner
    plans = [pruner.plan(keep=env.keep_for_action(a)) for a in plan_actions(env, samples, seed=99)]
    w = backend.num_workers
    per_cand, per_state = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        scored = backend.evaluate(pruner, plans)
        wall = time.perf_counter() - t0
        busy = sum(s.time_prune + s.time_eval for s in scored)
        per_cand.append((w * wall - busy) / len(plans))
        few = plans[:w]
        t0 = time.perf_counter()
        backend.evaluate(pruner, few)
        same = time.perf_counter() - t0
        t0 = time.perf_counter()
        backend.evaluate(copy.copy(pruner), few)  # a new object: published and fetched again, like a new state
        fresh = time.perf_counter() - t0
        per_state.append(fresh - same)
    return dict(dispatch_per_candidate_s=statistics.median(per_cand), dispatch_per_state_s=statistics.median(per_state),
                state_bytes=len(pickle.dumps(pruner)))


def run_setting(base: Dict[str, Any], label: str, threads: int, parallel: Dict[str, Any],
                args: argparse.Namespace) -> Dict[str, Any]:
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    env = PruneEnv(**base, parallel=parallel)
    env.reset(seed=0)
    first = plan_actions(env, 2, seed=1)
    env.evaluate_actions(first)  # warm-up: Ray start, first kernels of these shapes
    env.step(first[0])  # the timed steps start from state 1 (a new state for the backend, as in a run)
    root = env.snapshot()
    warm_s = time.perf_counter() - t0
    steps = []
    for i in range(args.repeats):  # fresh noise each time: every candidate is new (no cache hit)
        steps.append(rl_step(env, args.epochs, args.samples, seed=2 + i))
        env.restore(root)
    best = min(steps, key=lambda s: s["step_s"])
    row = dict(backend=label, threads=threads, parallel=parallel, warmup_s=warm_s,
               candidates=args.epochs * args.samples, n_evaluations=env.n_evaluations, **best,
               all_rewards=[s["rewards"] + [s["chosen_reward"]] for s in steps])
    row["planning_per_candidate_s"] = planning_time(env, args.samples)
    if parallel["backend"] == "ray":
        row.update(ray_overheads(env, args.samples))
    if env.device.type == "cuda":
        row.update(bare_ratio(env, args.samples, seed=5))
    env.close()
    print(f"{label:24s} step {best['step_s']:7.2f} s (sampling {best['sampling_s']:7.2f} s, env.step "
          f"{best['env_step_s']:5.2f} s), warm-up {warm_s:5.1f} s", flush=True)
    return row


def planning_time(env: PruneEnv, samples: int) -> float:
    """Driver-side work per candidate: action to kept channels (budget bisection) and plan."""
    actions = plan_actions(env, samples, seed=7)
    t0 = time.perf_counter()
    for a in actions:
        env.pruner.plan(keep=env.keep_for_action(a))
    return (time.perf_counter() - t0) / len(actions)


def paper_candidate(device: str) -> Dict[str, Any]:
    """The authors' candidate: a full-width VGG-19 for CIFAR-100 (untrained, generated 32x32 images) scored on
    10,000 images with batch 256, by the serial backend plain and overlapped; plus the driver's planning and
    the env step (next state's Taylor importance on 100 calibration images)."""
    from pruning_env.data import make_synthetic

    splits = make_synthetic(n_train=PAPER["reward_images"] + 500, n_test=10, num_classes=100, image_size=32,
                            val_size=PAPER["reward_images"], seed=0)
    out: Dict[str, Any] = {}
    for overlap in (False, True):
        env = PruneEnv(model="vgg19", dataset=splits, width=1.0, pretrained=False, device=device,
                       action_mode="distribution", budget="flops", target=0.95, n_steps=95, alpha=0.0, beta=0.0,
                       reward_samples=PAPER["reward_images"], eval_batch_size=PAPER["eval_batch_size"],
                       calibration_size=100, record_timings=True, lookahead_cache=2 * 10 + 1,
                       parallel={"backend": "serial", "overlap": overlap})
        env.reset(seed=0)
        env.evaluate_actions(plan_actions(env, 3, seed=1))  # warm-up
        name = "overlapped" if overlap else "plain"
        ratio = bare_ratio(env, 10, seed=3)
        out[f"candidate_{name}_s"] = ratio["lookahead_batch_s"] / 10
        out["bare_eval_s"] = ratio["bare_eval_s"] / 10
        out[f"lookahead_over_bare_{name}"] = ratio["lookahead_over_bare"]
        if not overlap:
            out["planning_per_candidate_s"] = planning_time(env, 10)
            out["state_bytes"] = len(pickle.dumps(env.pruner))  # what goes to the workers once per state
            sync(env.device)
            t0 = time.perf_counter()
            env.step(plan_actions(env, 1, seed=4)[0])
            sync(env.device)
            out["env_step_s"] = time.perf_counter() - t0
        env.close()
    return out


def project(paper: Dict[str, Any], ray_row: Dict[str, Any], cpu_state_bytes: int) -> List[Dict[str, Any]]:
    """Search time per pruning step with the authors' settings, from measured parts (see the markdown)."""
    e, k = PAPER["lr_epoch"], PAPER["sample_num"]
    t_plan = paper["planning_per_candidate_s"]
    t_c = paper["candidate_plain_s"] - t_plan  # an actor's share: surgery and evaluation, one GPU, no overlap
    t_step = paper["env_step_s"]
    o_c = ray_row["dispatch_per_candidate_s"]
    # a state's trip through the object store scales with its bytes
    o_s = ray_row["dispatch_per_state_s"] * paper["state_bytes"] / cpu_state_bytes
    network = paper["state_bytes"] / 1.25e9  # 10 Gb/s to each extra node, nodes fetch in parallel
    rows = [dict(setting="1 GPU, serial", gpus=1, step_s=e * k * paper["candidate_plain_s"] + t_step),
            dict(setting="1 GPU, serial overlapped", gpus=1, step_s=e * k * paper["candidate_overlapped_s"] + t_step)]
    for label, gpus, extra in (("8 GPUs, 1 node (Ray)", 8, 0.0), ("4 nodes x 8 GPUs (Ray)", 32, network)):
        rounds = math.ceil(k / gpus)  # an RL epoch's candidates; epochs run one after another (PD update)
        # candidates are dispatched as soon as planned: an epoch ends when the last plan's candidate is scored,
        # or when the workers' rounds are done, whichever is later
        epoch = max(k * t_plan + t_c + o_c, t_plan + rounds * (t_c + o_c))
        rows.append(dict(setting=label, gpus=gpus, step_s=e * epoch + o_s + extra + t_step))
    base = rows[0]["step_s"]
    for r in rows:
        r["speedup"] = base / r["step_s"]
        r["run_search_h"] = r["step_s"] * PAPER["steps"] / 3600
    return rows


def render(meta: Dict[str, Any], rows: List[Dict[str, Any]], paper: Optional[Dict[str, Any]],
           projection: Optional[List[Dict[str, Any]]]) -> str:
    base = rows[0]
    same = all(r["all_rewards"] == base["all_rewards"] for r in rows)
    lines = [f"# Parallel candidate evaluation: one RL-Pruner step ({meta['device']})", "",
             f"{meta['task']}; {meta['epochs']} RL epochs x {meta['samples']} candidates = "
             f"{meta['epochs'] * meta['samples']} look-aheads, then `env.step` (next state's Taylor importance). "
             f"Machine: {meta['machine']['cpu']}, {meta['machine']['cpu_count']} cores, torch "
             f"{meta['machine']['torch']}{', ' + meta['machine']['cuda'] if meta['machine']['cuda'] else ''}. "
             f"Fastest of {meta['repeats']} steps per backend (each with its own noise seed), all from the same state; "
             f"every backend gets the same seeds.", "",
             "| backend | main-process threads | step s | sampling s | env.step s | speed-up vs first row "
             "| dispatch / candidate ms | dispatch / state ms | driver planning / candidate ms "
             "| look-ahead batch / bare evals |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = lambda key: f"{r[key] * 1e3:.1f}" if key in r else "-"  # noqa: E731
        ratio = f"{r['lookahead_over_bare']:.3f}" if "lookahead_over_bare" in r else "-"
        lines.append(f"| {r['backend']} | {r['threads']} | {r['step_s']:.2f} | {r['sampling_s']:.2f} | "
                     f"{r['env_step_s']:.2f} | "
                     f"{base['step_s'] / r['step_s']:.2f}x | {ms('dispatch_per_candidate_s')} | "
                     f"{ms('dispatch_per_state_s')} | {ms('planning_per_candidate_s')} | {ratio} |")
    n = sum(len(r) for r in base["all_rewards"])
    lines += ["", f"Rewards of all {n} candidates and chosen steps identical across backends: "
              f"**{'yes' if same else 'NO'}**."]
    by = {r["backend"]: r for r in rows}
    if "Ray, 2 workers" in by and "serial, 2 threads" in by:
        s = base["step_s"] / by["Ray, 2 workers"]["step_s"]
        faster = by["Ray, 2 workers"]["step_s"] < by["serial, 2 threads"]["step_s"]
        lines += ["", f"Target: Ray with 2 workers >= 1.6x serial 1-thread (**{s:.2f}x**, "
                  f"{'met' if s >= 1.6 else 'not met'}) and faster than serial 2-thread "
                  f"(**{'yes' if faster else 'no'}**)."]
    lines += ["", "Dispatch / candidate = worker time per candidate not spent in surgery or evaluation, "
              "`(workers x wall - busy) / candidates` over a batch of 10 (load imbalance included); dispatch / state "
              "= extra wall time of a batch whose state (the pruner: model, groups, importance) must first go "
              "through the object store to the workers. Main-process threads = torch threads of the process that "
              "runs the env (each Ray worker uses one); with Ray it plans while the workers score and computes the "
              "next state's importance while they idle. Driver planning = action to kept channels (budget "
              "bisection on the analytic cost) and plan, done in the main process for every backend. Look-ahead "
              "batch / bare evals (GPU runs) = `env.evaluate_actions` of 10 new candidates against plain "
              "`evaluate` passes of the very same models (target for the overlapped serial path: <= 1.15)."]
    if paper:
        lines += ["", "## The authors' setting on paper: VGG-19 / CIFAR-100", "",
                  f"Measured on {paper['device']} (a `--paper` run): one full-width VGG-19 candidate on "
                  f"{PAPER['reward_images']:,} images (batch {PAPER['eval_batch_size']}): plain "
                  f"{paper['candidate_plain_s'] * 1e3:.1f} ms, overlapped {paper['candidate_overlapped_s'] * 1e3:.1f}"
                  f" ms, bare evaluation {paper['bare_eval_s'] * 1e3:.1f} ms (look-ahead / bare: plain "
                  f"{paper['lookahead_over_bare_plain']:.3f}, overlapped {paper['lookahead_over_bare_overlapped']:.3f}"
                  f"); driver planning {paper['planning_per_candidate_s'] * 1e3:.1f} ms per candidate; env.step "
                  f"{paper['env_step_s']:.2f} s; state {paper['state_bytes'] / 1e6:.0f} MB.", ""]
    if projection:
        lines += ["| setting | GPUs | search s per pruning step | speed-up | search h for 95 steps |",
                  "|---|---|---|---|---|"]
        for p in projection:
            lines.append(f"| {p['setting']} | {p['gpus']} | {p['step_s']:.2f} | {p['speedup']:.2f}x | "
                         f"{p['run_search_h']:.2f} |")
        lines += ["", "Per step: `E x max(K x planning + c, planning + ceil(K / GPUs) x c) + state dispatch + "
                  "env.step`, c = candidate + dispatch, with E = 10 RL epochs and K = 10 candidates (the driver plans "
                  "candidates one after another and dispatches each at once; one GPU-actor per candidate; the epochs "
                  "run one after another because each updates the PD the next samples from, so at most K = 10 "
                  "GPUs are busy: 22 of 32 idle on 4 nodes, and 8 GPUs need 2 rounds per epoch). Candidate = the "
                  "measured plain GPU candidate; dispatch per candidate from this table's Ray row (CPU-measured), "
                  "per state scaled by the model's bytes, plus 10 Gb/s to the other nodes on 4 nodes (an "
                  "assumption). Search only: the authors' KD fine-tuning after every step is not included."]
    lines += ["", f"Command: `{meta['command']}`", ""]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    t_start = time.time()
    base, untrained = env_settings(args)
    rows = [run_setting(base, label, threads, parallel, args) for label, threads, parallel in backends(args)]
    paper = None
    tag = f"_{args.tag}" if args.tag else ""
    out = Path(args.out)
    if args.paper:
        paper = dict(device=machine_info()["cuda"] or "CPU", **paper_candidate(args.device))
    else:  # the projection's GPU parts from the last --paper run, when there is one
        for saved in sorted(out.glob("bench_parallel*.json")):
            data = json.loads(saved.read_text())
            if data.get("paper"):
                paper = data["paper"]
    ray_rows = [r for r in rows if r["parallel"]["backend"] == "ray"]
    ray_row = ray_rows[-1] if ray_rows else None
    # the projection needs both the GPU candidate (a --paper run) and the Ray dispatch costs (this run)
    projection = project(paper, ray_row, ray_row["state_bytes"]) if paper and ray_row else None
    weights = "an UNTRAINED model of the same shape (checkpoint missing)" if untrained else "pretrained"
    meta = dict(device=args.device, epochs=args.epochs, samples=args.samples, repeats=args.repeats,
                task=f"{base['model']} width {base['width']} on `{base['dataset']}`, {base['reward_samples']} reward "
                     f"images (vanilla reward: top-1), {weights}",
                untrained=untrained, machine=machine_info(), wall_s=time.time() - t_start,
                command="python benchmarks/bench_parallel.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    atomic_write_text(json.dumps(dict(meta=meta, results=rows, paper=paper, projection=projection), indent=2),
                      out / f"bench_parallel{tag}.json")
    atomic_write_text(render(meta, rows, paper, projection), out / f"bench_parallel{tag}.md")
    print(f"wrote {out / ('bench_parallel' + tag)}.md and .json", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
