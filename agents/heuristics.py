"""Non-RL baselines through the same PruneEnv: uniform sparsity, global Taylor ranking (Torch-Pruning's global
pruning) and random search with a fixed number of evaluations. Any RL agent has to beat these.

Each works in both action modes: in ``"sparsity"`` mode it sends per-group sparsities, in ``"distribution"``
mode the distribution whose count matching removes the same per-group fractions.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np

from agents.common.base import BasePruningAgent
from pruning_env.envs.budget import bisect_increasing


def _to_action(env: Any, removed_fraction: np.ndarray) -> np.ndarray:
    """The env action that removes ``removed_fraction`` of each group's current channels (up to the budget)."""
    frac = np.clip(np.asarray(removed_fraction, dtype=np.float64), 0.0, 1.0)
    if env.action_mode == "sparsity":
        return frac
    # distribution mode: the budget is charged per member layer, so group g's share is k_g * removed_g
    removed = frac * np.asarray(env.current_channels, dtype=np.float64) * np.asarray(env.layer_counts)
    total = removed.sum()
    return removed / total if total > 0 else np.full(env.n_groups, 1.0 / env.n_groups)


class UniformPruner(BasePruningAgent):
    """The same sparsity for every group; the env's budget scales it to the step's FLOPs (or other) goal.

    :param env: a ``PruneEnv`` with a budget (``budget="flops"`` etc., or any distribution-mode env).
    """

    def _choose_action(self, obs: np.ndarray) -> Tuple[np.ndarray, Dict[str, Any]]:
        return self.predict(obs)[0], {}

    def predict(self, observation: Any = None, state: Any = None, episode_start: Any = None,
                deterministic: bool = True) -> Tuple[np.ndarray, Any]:
        """The uniform action for the env's current state."""
        env = self.penv
        if env.action_mode == "sparsity" and env.budget is None:
            raise ValueError("UniformPruner needs an env with a budget (budget='flops', 'channels' or 'params') "
                             "so that the uniform sparsity is scaled to the target")
        return _to_action(env, np.full(env.n_groups, 0.5)), state


class GlobalTaylorPruner(BasePruningAgent):
    """Prune the globally least important channels: one threshold over importances normalised per group.

    As Torch-Pruning's global pruning (``global_pruning=True`` with the mean normaliser), each group's
    channel scores are divided by the group mean, so groups of different size and depth compete on one
    scale; the threshold is bisected so that the plan meets the step's cumulative goal in the env's metric,
    and at most ``max_sparsity`` of a group goes in one step.

    :param env: a ``PruneEnv`` with a budget; its importance criterion (Taylor by default) is used.
    :param max_sparsity: cap on the fraction of a group removed in one step (Torch-Pruning's
        ``max_pruning_ratio``).
    """

    _init_keys = BasePruningAgent._init_keys + ("max_sparsity",)

    def __init__(self, env: Any = None, max_sparsity: float = 0.9, seed: Optional[int] = None, verbose: int = 0,
                 tensorboard_log: Optional[Union[str, Path]] = None) -> None:
        if not 0.0 < max_sparsity < 1.0:
            raise ValueError(f"max_sparsity must be in (0, 1), got {max_sparsity}")
        self.max_sparsity = float(max_sparsity)
        super().__init__(env, seed=seed, verbose=verbose, tensorboard_log=tensorboard_log)

    def _choose_action(self, obs: np.ndarray) -> Tuple[np.ndarray, Dict[str, Any]]:
        action, _ = self.predict(obs)
        return action, {"threshold": self._threshold}

    def removed_fractions(self, threshold: float, scores) -> np.ndarray:
        """Fraction of each group whose normalised importance is below ``threshold`` (capped)."""
        frac = np.array([(s < threshold).mean() if s.size else 0.0 for s in scores])
        return np.minimum(frac, self.max_sparsity)

    def predict(self, observation: Any = None, state: Any = None, episode_start: Any = None,
                deterministic: bool = True) -> Tuple[np.ndarray, Any]:
        """The global-threshold action for the env's current state."""
        env, pruner, goal = self._next_step()
        if pruner.importance is None:
            raise RuntimeError("the env's pruner has no importance scores for this state")
        scores = [np.asarray(s, dtype=np.float64) / max(float(np.mean(s)), 1e-12) for s in pruner.importance]

        def reduction(threshold: float) -> float:
            # the engine's rounding and floor turn fractions into kept channels, as in the env's own steps
            return env.reduction(pruner.keep_counts(self.removed_fractions(threshold, scores)))

        top = max(float(np.max(s)) for s in scores if s.size) + 1.0
        # reduction grows with the threshold: the threshold whose plan is closest to the step's goal
        self._threshold, _ = bisect_increasing(reduction, goal, 0.0, top, iters=50)
        return _to_action(env, self.removed_fractions(self._threshold, scores)), state

    _threshold = float("nan")


class RandomSearch(BasePruningAgent):
    """``n_candidates`` random actions per step scored with the env's look-ahead; the best one is taken.

    With the same total of evaluations as an RL agent this is the bar for "learning" anything.

    :param env: a ``PruneEnv``.
    :param n_candidates: look-ahead evaluations per pruning step (the total budget is
        ``n_candidates * n_steps``; the final steps reuse the built candidates).
    :param concentration: Dirichlet concentration of random distributions (distribution mode); sparsity
        mode draws each group's sparsity uniformly in [0, 1] (the env's budget rescales it).
    :param seed: seeds the random actions.
    """

    _init_keys = BasePruningAgent._init_keys + ("n_candidates", "concentration")

    def __init__(self, env: Any = None, n_candidates: int = 100, concentration: float = 1.0,
                 seed: Optional[int] = None, verbose: int = 0,
                 tensorboard_log: Optional[Union[str, Path]] = None) -> None:
        if int(n_candidates) < 1:
            raise ValueError(f"n_candidates must be >= 1, got {n_candidates}")
        self.n_candidates = int(n_candidates)
        self.concentration = float(concentration)
        super().__init__(env, seed=seed, verbose=verbose, tensorboard_log=tensorboard_log)
        self._best_action: Optional[np.ndarray] = None

    def _random_action(self) -> np.ndarray:
        env = self.penv
        if env.action_mode == "sparsity":
            return self.rng.random(env.n_groups)
        return self.rng.dirichlet(np.full(env.n_groups, self.concentration))

    def _choose_action(self, obs: np.ndarray) -> Tuple[np.ndarray, Dict[str, Any]]:
        cache = int(getattr(self.penv, "lookahead_cache", 0))
        # batched look-aheads (serial, or on Ray workers: the env's ``parallel`` setting), each batch small
        # enough that the best candidate so far stays in the env's LRU cache beside it, so that stepping it
        # reuses the built model instead of evaluating it again (the budget stays n_candidates)
        size = max(1, cache - 1)
        best_reward, best_action = -np.inf, None
        # the step spends ``n_candidates`` evaluations, a multi-fidelity estimator's refinements included (the
        # env refines fewer candidates to fit ``max_evaluations``), and never more than the monitor has left
        start = self.env.n_evaluations
        refine = int(getattr(getattr(self.penv, "scorer", None), "refine_top", 0) or 0)
        while True:
            todo = self.n_candidates - (self.env.n_evaluations - start)
            left = self.env.evaluations_left
            if left is not None:
                todo = min(todo, left)
            if todo <= 0:
                break
            # leave room for the batch's refinements (2 evaluations each) when the step can afford them
            room = todo - 2 * refine if todo - 2 * refine >= 1 else todo
            actions = [self._random_action() for _ in range(min(size, room))]
            rewards, _ = self.env.evaluate_actions(actions, max_evaluations=todo)
            for action, reward in zip(actions, rewards):
                if reward > best_reward:
                    best_reward, best_action = reward, action
            if cache >= 2:
                self.env.evaluate_action(best_action)  # a free look-up: the best becomes the most recent
        if best_action is None:  # no evaluation left for this step: a random action, stepped unscored
            best_action = self._random_action()
        self._best_action = best_action
        return best_action, {"best_candidate_reward": float(best_reward)}

    def _extra_state(self) -> Dict[str, Any]:
        return {"best_action": None if self._best_action is None else self._best_action.copy()}

    def _load_extra_state(self, state: Dict[str, Any]) -> None:
        best = state.get("best_action")  # files of earlier versions did not keep it: predict() draws at random
        self._best_action = None if best is None else np.asarray(best, dtype=np.float64)

    def predict(self, observation: Any = None, state: Any = None, episode_start: Any = None,
                deterministic: bool = True) -> Tuple[np.ndarray, Any]:
        """The best action found so far (a fresh random one before any search)."""
        if deterministic and self._best_action is not None:
            return self._best_action.copy(), state
        return self._random_action(), state


__all__ = ["UniformPruner", "GlobalTaylorPruner", "RandomSearch"]
