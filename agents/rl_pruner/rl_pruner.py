"""RL-Pruner (Wang & Kindratenko, 2024) as the authors coded it (spec §2): the policy is a pruning distribution
over groups, improved within every pruning step from look-ahead samples, and carried across steps.

Read top to bottom it is the spec: §2.2 init, §2.3 noise, §2.5 Q, §2.6 buffer, §2.7 RL epochs, §2.8 update,
§2.9 epsilon-greedy selection, §2.10 collapse guard; the count matching (§2.4) is done by the env.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from agents.common.base import BasePruningAgent
from agents.rl_pruner.policies import (EXPLORE_STRATEGIES, PROBABILITY_LOWER_BOUND, BufferEntry, TopKBuffer,
                                       epsilon_at, initial_distribution, sample_action, update_distribution)

#: values of ``RLPrunerAgent(collapse_reference=...)``: the authors' reference and the improved one
COLLAPSE_REFERENCES = ("previous", "reset_candidate")


class RLPrunerAgent(BasePruningAgent):
    """The RL-Pruner agent, Stable-Baselines-like (``learn`` / ``predict`` / ``save`` / ``load``).

    Drives a ``PruneEnv(action_mode="distribution")``: every pruning step it

    1. runs ``lr_epoch`` RL epochs, each scoring ``sample_num`` noisy copies of the PD with the env's
       look-ahead (``Q = R``; with ``sample_step > 1``, ``Q = R + γ max Q(children)`` through
       ``snapshot``/``restore``), keeps the best ``sample_num`` in a buffer, and moves the PD toward the
       buffer's best action (λ step, then the PPO ratio clip) whenever the epoch beat the step's best Q;
    2. picks a buffered candidate, ε-greedily (ε decays over the first 10 % of steps);
    3. if that candidate lost more than ``collapse_threshold`` (relative) of the current accuracy, resets the
       PD to width-proportional and samples the step again, once (the collapse guard);
    4. steps the env with the chosen action (the env reuses the candidate it already built).

    Deviations from the authors (all documented in docs/agents.md): the PD has one entry per group (coupled
    layers share one value, as the authors' cluster equalisation makes them anyway) and the noise is drawn per
    group with the per-layer variance (``layer_noise``; the floor applies per group); the buffer fills empty
    rows first; the collapse guard compares with the accuracy of the model the candidates were pruned from
    and, after a resample, remembers the new model's accuracy (``faithful_collapse_guard=True`` restores the
    authors' stale-accuracy bug).

    :param env: ``PruneEnv`` in ``action_mode="distribution"`` (None only to ``load``/``predict``).
    :param sample_num: candidates per RL epoch, and the replay-buffer size (authors: 10).
    :param lr_epoch: RL epochs per pruning step (authors: 10).
    :param sample_step: look-ahead depth; each level samples ``sample_num`` children (authors: 1).
    :param noise_var: σ, standard-deviation multiplier of the action noise (authors: 0.04).
    :param step_length: λ of the PD update (authors: 0.1).
    :param ppo: apply the PPO-style ratio clip (authors: always on).
    :param ppo_clip: ε of the ratio clip (authors' code 0.25; the seed notes say 0.2).
    :param discount_factor: γ of the look-ahead Q (authors: 0.9).
    :param greedy_epsilon: ε0, probability of picking a random buffered candidate (authors: 0.4).
    :param explore_strategy: ``"cosine"`` (authors), ``"linear"`` or ``"constant"``.
    :param explore_fraction: share of the pruning steps with exploration (authors: 0.1).
    :param collapse_threshold: relative accuracy drop that triggers the collapse guard (authors: 0.1).
    :param faithful_collapse_guard: reproduce the authors' guard exactly, bug included (spec §9.17).
    :param min_keep_fraction: improved mode (0 = off, the authors): a sampled action that would leave a group
        with fewer than this fraction of its original channels has that group's share halved until it does not
        (AMC bounds every layer's kept ratio the same way); checked with ``env.keep_for_action``, no evaluation.
    :param collapse_reference: what the chosen candidate's accuracy is compared with: ``"previous"`` (authors:
        the model the candidates were pruned from; fires at every step when one step costs more than
        ``collapse_threshold`` of the accuracy anyway, e.g. a few large steps without recovery) or
        ``"reset_candidate"`` (improved mode: the candidate of the width-proportional PD the guard would
        reset to, one extra evaluation per step that also enters the buffer; the guard fires only when the
        learned PD does worse than that reset point by more than ``collapse_threshold``, and then resets the
        PD and takes that candidate instead of sampling the step again).
    :param probability_lower_bound: floor of PD entries (authors: 1e-5).
    :param layer_noise: draw the noise per member layer as the authors do, so a group of ``k`` coupled layers
        moves by ``σ·u·√k·ξ``; False draws one ``ξ`` per group (same for single-layer groups, e.g. VGG).
    :param seed: seeds the noise and the ε-greedy draws.
    :param verbose: 1 prints a line per pruning step.
    :param tensorboard_log: TensorBoard folder.
    """

    action_mode = "distribution"
    _init_keys = BasePruningAgent._init_keys + (
        "sample_num", "lr_epoch", "sample_step", "noise_var", "step_length", "ppo", "ppo_clip",
        "discount_factor", "greedy_epsilon", "explore_strategy", "explore_fraction", "collapse_threshold",
        "faithful_collapse_guard", "collapse_reference", "min_keep_fraction", "probability_lower_bound",
        "layer_noise")

    def __init__(self, env: Any = None, sample_num: int = 10, lr_epoch: int = 10, sample_step: int = 1,
                 noise_var: float = 0.04, step_length: float = 0.1, ppo: bool = True, ppo_clip: float = 0.25,
                 discount_factor: float = 0.9, greedy_epsilon: float = 0.4, explore_strategy: str = "cosine",
                 explore_fraction: float = 0.1, collapse_threshold: float = 0.1,
                 faithful_collapse_guard: bool = False, collapse_reference: str = "previous",
                 min_keep_fraction: float = 0.0,
                 probability_lower_bound: float = PROBABILITY_LOWER_BOUND, layer_noise: bool = True,
                 seed: Optional[int] = None,
                 verbose: int = 0, tensorboard_log: Optional[Union[str, Path]] = None) -> None:
        for name, value in (("sample_num", sample_num), ("lr_epoch", lr_epoch), ("sample_step", sample_step)):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if explore_strategy not in EXPLORE_STRATEGIES:
            raise ValueError(f"explore_strategy must be one of {EXPLORE_STRATEGIES}, got {explore_strategy!r}")
        if not 0.0 <= ppo_clip < 1.0:
            raise ValueError(f"ppo_clip must be in [0, 1), got {ppo_clip}")
        if not 0.0 < step_length <= 1.0:
            raise ValueError(f"step_length must be in (0, 1], got {step_length}")
        if collapse_reference not in COLLAPSE_REFERENCES:
            raise ValueError(f"collapse_reference must be one of {COLLAPSE_REFERENCES}, got {collapse_reference!r}")
        if faithful_collapse_guard and collapse_reference != "previous":
            raise ValueError("faithful_collapse_guard=True is the authors' guard: it needs "
                             "collapse_reference='previous'")
        self.sample_num, self.lr_epoch, self.sample_step = int(sample_num), int(lr_epoch), int(sample_step)
        self.noise_var, self.step_length = float(noise_var), float(step_length)
        self.layer_noise = bool(layer_noise)
        self.ppo, self.ppo_clip = bool(ppo), float(ppo_clip)
        self.discount_factor = float(discount_factor)
        self.greedy_epsilon, self.explore_strategy = float(greedy_epsilon), explore_strategy
        self.explore_fraction = float(explore_fraction)
        self.collapse_threshold = float(collapse_threshold)
        self.faithful_collapse_guard = bool(faithful_collapse_guard)
        self.collapse_reference = collapse_reference
        if not 0.0 <= min_keep_fraction < 1.0:
            raise ValueError(f"min_keep_fraction must be in [0, 1), got {min_keep_fraction}")
        self.min_keep_fraction = float(min_keep_fraction)
        self.probability_lower_bound = float(probability_lower_bound)
        super().__init__(env, seed=seed, verbose=verbose, tensorboard_log=tensorboard_log)
        self.buffer = TopKBuffer(self.sample_num)
        self.pd: Optional[np.ndarray] = None
        self.epsilon = self.greedy_epsilon
        self.t = 0  # pruning steps completed (drives the ε schedule)
        self.prev_accuracy: Optional[float] = None
        self.pd_history: List[List[float]] = []
        if env is not None:
            self.pd = self._width_proportional(self.penv.original_channels)

    # ---------------------------------------------------------------- §2.2 the policy
    def _eligible(self) -> Optional[np.ndarray]:
        """Groups that can still lose a channel (the authors zero conv layers with one filter left); None
        before the first ``reset``."""
        env = self.penv
        try:
            current = env.current_channels
        except RuntimeError:  # no episode yet: every group is eligible
            return None
        return np.asarray(current) > int(getattr(env, "min_channels", 1))

    def _width_proportional(self, channels: np.ndarray) -> np.ndarray:
        return initial_distribution(channels, self.penv.layer_counts, self._eligible())

    # ---------------------------------------------------------------- §2.3 the action noise
    def _sample(self, eligible: Optional[np.ndarray]) -> np.ndarray:
        scale = None
        if self.layer_noise and self.env is not None:
            scale = np.sqrt(np.asarray(self.penv.layer_counts, dtype=np.float64))
        action = sample_action(self.pd, self.rng, self.noise_var, eligible, self.probability_lower_bound, scale)
        if self.min_keep_fraction > 0 and self.env is not None and self.env.episode_active:
            action = self._within_floor(action)
        return action

    def _within_floor(self, action: np.ndarray) -> np.ndarray:
        """Improved mode (``min_keep_fraction``): halve the entries of groups the action would leave below
        ``min_keep_fraction`` of their original width (``env.keep_for_action``: no evaluation) and renormalise,
        until none is (at most 20 times); groups already below the floor are left at what they have."""
        env = self.penv
        floor = np.minimum(np.ceil(self.min_keep_fraction * env.original_channels), env.current_channels)
        for _ in range(20):
            low = env.keep_for_action(action) < floor
            if not low.any():
                break
            action = action.copy()
            action[low] *= 0.5
            action = action / action.sum()
        return action

    # ---------------------------------------------------------------- §2.5 Q of one action
    def _q_value(self, action: np.ndarray, depth: int) -> Tuple[float, Dict[str, Any]]:
        """``Q = R`` at the last level; otherwise ``R + γ max_j Q(child_j)`` with fresh noise per child."""
        reward, info = self.env.evaluate_action(action)
        if depth <= 1:
            return reward, info
        # a deeper look-ahead steps the bare env (never fine-tuning: lookahead_step skips recovery) and restores
        # it: the monitor counts its evaluations (the env's counter) but records no history row for it
        env = self.penv
        snap = env.snapshot()
        _, _, terminated, truncated, _ = env.lookahead_step(action)
        best_child = None
        if not (terminated or truncated):
            eligible = self._eligible()
            for _ in range(self.sample_num):
                child = self._sample(eligible)
                q_child, _ = self._q_value(child, depth - 1)
                best_child = q_child if best_child is None else max(best_child, q_child)
        env.restore(snap)
        return reward + (self.discount_factor * best_child if best_child is not None else 0.0), info

    # ---------------------------------------------------------------- §2.7 + §2.8 the RL epochs of one step
    def _sampling_phase(self) -> float:
        """Fill the buffer with the step's best candidates and update the PD; returns the best Q. Stops early
        when the monitor's evaluation budget is spent (:meth:`_budget_allows`)."""
        self.buffer.clear()
        best_q = 0.0
        for _ in range(self.lr_epoch):
            eligible = self._eligible()
            epoch_best = -np.inf
            if self.sample_step == 1:
                # an epoch's samples are independent: one batched look-ahead (in this process or on Ray workers,
                # the env's ``parallel`` setting) scores as many as the budget allows, with the loop's rewards
                n = 0
                while n < self.sample_num and self._budget_allows(self._reserve + n):
                    n += 1
                actions = [self._sample(eligible) for _ in range(n)]
                # a multi-fidelity estimator's refinements come out of the same evaluations: the batch may use
                # what the budget has left beyond the later steps' and the guard's reserve, no more
                rewards, infos = self.env.evaluate_actions(actions, max_evaluations=self._spendable(n))
                scored = list(zip(actions, rewards, infos))
            else:
                scored = []
                for _ in range(self.sample_num):
                    if not self._budget_allows(self._reserve):
                        break
                    action = self._sample(eligible)
                    scored.append((action, *self._q_value(action, self.sample_step)))
            for action, q, info in scored:
                self.buffer.offer(q, action, {"accuracy": float(info["accuracy"]), "reward": float(info["reward"])})
                epoch_best = max(epoch_best, q)
            self._keep_buffer_cached()
            if epoch_best > best_q:
                best_q = epoch_best
                self.pd = update_distribution(self.pd, self.buffer.best().action, self.step_length, self.ppo,
                                              self.ppo_clip, eligible, self.probability_lower_bound)
            if not self._budget_allows(self._reserve):
                break
        return best_q

    @property
    def _reserve(self) -> int:
        """Q values the sampling keeps for the improved guard's reset point (one per step)."""
        return int(self.collapse_reference == "reset_candidate")

    def _budget_allows(self, reserve: int = 0) -> bool:
        """Whether one more Q value (``1 + K + ... + K^(sample_step-1)`` evaluations) fits the monitor's
        evaluation budget, keeping one evaluation for each later pruning step (its fallback step may need it)
        and ``reserve`` Q values more.

        :param reserve: Q values to keep for later in this step (the improved guard's reset point).
        """
        left = self.env.evaluations_left
        if left is None:
            return True
        cost = sum(self.sample_num ** d for d in range(self.sample_step))
        later = max(0, int(self.penv.n_steps) - int(self.penv.step_index) - 1)
        return left - later >= cost * (1 + reserve)

    def _spendable(self, n: int) -> Optional[int]:
        """Evaluations a batch of ``n`` one-step look-aheads may use (refinements included): what the budget has
        left, less one per later pruning step and the guard's reserve; ``None`` without a budget."""
        left = self.env.evaluations_left
        if left is None:
            return None
        later = max(0, int(self.penv.n_steps) - int(self.penv.step_index) - 1)
        return max(int(n), left - later - self._reserve)

    def _ensure_cache(self) -> None:
        """Make the env keep at least ``2 * sample_num`` look-ahead candidates (an epoch's batch plus the
        buffered ones), so that the buffered ones (see :meth:`_keep_buffer_cached`) are never evicted."""
        env = self.penv
        if self.sample_step == 1 and hasattr(env, "lookahead_cache"):
            env.lookahead_cache = max(int(env.lookahead_cache), 2 * self.sample_num)

    def _keep_buffer_cached(self) -> None:
        """Touch the buffered candidates (free look-ups of already built models) so that the env's LRU cache
        still holds them when one is stepped: the authors step the pruned copy they kept in the buffer, so the
        chosen candidate must not cost a second evaluation. A deeper look-ahead (``sample_step > 1``) steps
        its candidates, which takes them out of the cache; there the chosen one is rebuilt once per step."""
        if self.sample_step != 1:
            return
        if int(getattr(self.penv, "lookahead_cache", 0)) <= len(self.buffer):
            return  # too small to hold them all: touching could only evict and rebuild
        for entry in self.buffer.entries:
            self.env.evaluate_action(entry.action)

    # ---------------------------------------------------------------- §2.9 ε-greedy over the buffer
    def _select(self):
        if self.rng.random() < self.epsilon:
            return self.buffer.entries[int(self.rng.integers(len(self.buffer)))], True
        return self.buffer.best(), False

    # ---------------------------------------------------------------- one pruning step (§2.11.3.1)
    def _choose_action(self, obs: np.ndarray) -> Tuple[np.ndarray, Dict[str, Any]]:
        if self.pd is None:
            self.pd = self._width_proportional(self.penv.original_channels)
        self._ensure_cache()
        best_q = self._sampling_phase()
        reference = self._offer_reset_candidate() if self.collapse_reference == "reset_candidate" else None
        if not len(self.buffer):
            # the evaluation budget is spent: step with the PD as it is (the step's one evaluation was kept)
            self._chosen_accuracy = float("nan")
            return self.pd.copy(), {"epsilon": self.epsilon, "best_q": float("nan"), "chosen_q": float("nan"),
                                    "explored": 0, "collapse_reset": 0, "budget_stopped": 1,
                                    "pd": [float(p) for p in self.pd]}
        chosen, explored = self._select()
        accuracy = chosen.payload["accuracy"]
        collapsed = False
        # §2.10 collapse guard: a relative drop of more than collapse_threshold resets the PD; the authors
        # compare with the previous model and sample the step again, the improved mode with the reset point
        if self.collapse_reference == "reset_candidate":
            prev = None if reference is None else reference.payload["accuracy"]
        else:
            prev = self.prev_accuracy
        if prev is not None and prev > 0 and (prev - accuracy) / prev > self.collapse_threshold:
            collapsed = True
            self.pd = self._width_proportional(self.penv.current_channels)
            if reference is not None:
                chosen, explored = reference, False
            elif self._budget_allows():
                best_q = self._sampling_phase()
                chosen, explored = self._select()
            # else: the budget leaves no room to sample again; the chosen candidate (already built) is stepped
            stale = accuracy
            accuracy = stale if self.faithful_collapse_guard else chosen.payload["accuracy"]
        self._chosen_accuracy = accuracy
        extra = {"epsilon": self.epsilon, "best_q": float(best_q), "chosen_q": float(chosen.q),
                 "explored": int(explored), "collapse_reset": int(collapsed),
                 "collapse_reference_accuracy": float(prev) if prev is not None else float("nan"),
                 "budget_stopped": int(not self._budget_allows()), "pd": [float(p) for p in self.pd]}
        return chosen.action.copy(), extra

    def _offer_reset_candidate(self) -> Optional[BufferEntry]:
        """Improved collapse guard: score the width-proportional PD of the current widths (the point a reset
        returns to) and offer it to the buffer; None when the budget has no room for it."""
        if not self._budget_allows():
            return None
        action = self._width_proportional(self.penv.current_channels)
        q, info = self._q_value(action, self.sample_step)
        entry = BufferEntry(float(q), action, {"accuracy": float(info["accuracy"]), "reward": float(info["reward"])})
        self.buffer.offer(entry.q, entry.action, entry.payload)
        self._keep_buffer_cached()
        return entry

    def _on_reset(self, obs: np.ndarray, info: Dict[str, Any]) -> None:
        env = self.penv
        self.t = 0
        self.epsilon = epsilon_at(0, env.n_steps, self.greedy_epsilon, self.explore_strategy, self.explore_fraction)
        self.pd = self._width_proportional(env.original_channels)
        # the teacher's accuracy is the reference of the first step's collapse guard
        self.prev_accuracy = float(env.original_accuracy)
        self.pd_history = []

    def _on_step(self, action: np.ndarray, info: Dict[str, Any]) -> None:
        if self.faithful_collapse_guard:
            self.prev_accuracy = self._chosen_accuracy  # pre-fine-tuning, stale after a resample
        else:
            # the model the next candidates are pruned from, after the env's recovery when it has one
            self.prev_accuracy = float(info.get("accuracy_recovered", info["accuracy"]))
        self.pd_history.append([float(p) for p in self.pd])
        self.buffer.clear()
        self.t += 1
        self.epsilon = epsilon_at(self.t, self.penv.n_steps, self.greedy_epsilon, self.explore_strategy,
                                  self.explore_fraction)
        if self.verbose:
            print(f"step {self.t}: accuracy {info['accuracy']:.4f}, FLOPs -{info['flops_reduction']:.3f}, "
                  f"evaluations {self.n_evaluations}, epsilon {self.epsilon:.3f}")

    # ---------------------------------------------------------------- SB3-like surface
    def predict(self, observation: Any = None, state: Any = None, episode_start: Any = None,
                deterministic: bool = True) -> Tuple[np.ndarray, Any]:
        """The current PD as a distribution-mode action (``deterministic=False`` adds the action noise).

        :param observation: unused: the policy is a single distribution, not a function of the state.
        """
        if self.pd is None:
            raise RuntimeError("the agent has no pruning distribution yet: give it an env or load a saved agent")
        if deterministic:
            return self.pd.copy(), state
        return self._sample(None), state

    def _extra_state(self) -> Dict[str, Any]:
        return {"pd": None if self.pd is None else self.pd.copy(), "epsilon": self.epsilon, "t": self.t,
                "prev_accuracy": self.prev_accuracy, "pd_history": list(self.pd_history)}

    def _load_extra_state(self, state: Dict[str, Any]) -> None:
        self.pd = None if state["pd"] is None else np.asarray(state["pd"], dtype=np.float64)
        self.epsilon, self.t = float(state["epsilon"]), int(state["t"])
        self.prev_accuracy = state["prev_accuracy"]
        self.pd_history = list(state["pd_history"])


__all__ = ["RLPrunerAgent", "COLLAPSE_REFERENCES"]
