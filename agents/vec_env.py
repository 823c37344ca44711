"""Several pruning envs in worker processes for Stable-Baselines3 (``n_envs > 1``): SB3's ``SubprocVecEnv``, each
process building its own env from the config behind its own :class:`~agents.common.monitor.PruneMonitor`.

The agent's record stays the one place for history, best episode and evaluation count: :class:`PruneVecEnv`
folds what the workers' monitors recorded into it, every evaluation counted once.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import gymnasium as gym
from stable_baselines3.common.vec_env import SubprocVecEnv

from agents.common.monitor import PruneMonitor, PruneRecord
from pruning_env.envs.config import PruneEnvConfig


class PruneEnvFactory:
    """Builds ``wrap(PruneMonitor(PruneEnv(config)))`` in a worker process (picklable: SB3 sends it there).

    :param config: the env's :class:`~pruning_env.envs.config.PruneEnvConfig`.
    :param wrap: the agent's action wrapper around the monitor (e.g. SB3's symmetric action box), or None.
    """

    def __init__(self, config: PruneEnvConfig, wrap: Optional[Callable[[gym.Env], gym.Env]] = None) -> None:
        self.config = config
        self.wrap = wrap

    def __call__(self) -> gym.Env:
        from pruning_env.envs.prune_env import PruneEnv

        env: gym.Env = PruneMonitor(PruneEnv(self.config))
        return self.wrap(env) if self.wrap is not None else env


class PruneVecEnv(SubprocVecEnv):
    """``n_envs`` pruning envs in worker processes, for SB3 algorithms.

    Each worker builds its env from the same config (so each holds its own model, data and candidate cache);
    :meth:`collect` folds what their monitors recorded since the last call into the agent's record.

    :param config: the env config every worker builds from.
    :param n_envs: worker processes (>= 2; one env needs no processes).
    :param wrap: action wrapper applied in the workers (see :class:`PruneEnvFactory`).
    :param start_method: multiprocessing start method (SB3's default when None).
    """

    def __init__(self, config: PruneEnvConfig, n_envs: int, wrap: Optional[Callable[[gym.Env], gym.Env]] = None,
                 start_method: Optional[str] = None) -> None:
        if not isinstance(n_envs, int) or isinstance(n_envs, bool) or n_envs < 2:
            raise ValueError(f"n_envs must be an integer >= 2 for worker processes, got {n_envs!r} (use the env "
                             f"itself for n_envs=1)")
        super().__init__([PruneEnvFactory(config, wrap) for _ in range(n_envs)], start_method=start_method)
        self._rows_seen = [0] * n_envs
        self._evals_seen = [0] * n_envs
        self._episodes_seen = [0] * n_envs

    def n_evaluations(self) -> List[int]:
        """Models each worker's env has evaluated so far (its monitor's count)."""
        return [int(n) for n in self.get_attr("n_evaluations")]

    def collect(self, record: PruneRecord) -> None:
        """Fold what the workers' monitors recorded since the last call into ``record``: their new history
        rows (with an ``env`` column; ``timestep`` renumbered, ``episode`` and ``n_evaluations`` the worker's
        own), finished episodes, evaluations, and their best episode (with ``env``) when it beats ``record``'s.

        :param record: the agent's record.
        """
        records: List[PruneRecord] = self.get_attr("record")
        counts = self.n_evaluations()
        for i, (worker, n_evals) in enumerate(zip(records, counts)):
            for row in worker.history[self._rows_seen[i]:]:  # episodes keep the worker's numbering
                record.history.append(dict(row, env=i, timestep=len(record.history) + 1))
            best = worker.best
            if best is not None and (record.best is None or best["reward"] > record.best["reward"]):
                record.best = dict(best, env=i)
            record.evaluations_done += n_evals - self._evals_seen[i]
            self._rows_seen[i], self._evals_seen[i] = len(worker.history), n_evals
        for i, worker in enumerate(records):
            record.episodes += worker.episodes - self._episodes_seen[i]
            self._episodes_seen[i] = worker.episodes


__all__ = ["PruneEnvFactory", "PruneVecEnv"]
