"""The AgentViT agent in two modes: ``faithful`` (the notebook's "DDQN", spec §2) and ``double_dqn``
(a real double DQN over per-patch keep/drop values with top-k masks, spec §6.1-6.2).

faithful: the action is not stored; every one of the N outputs regresses r + gamma * Q_target(s')
element-wise (no max, no gather, no done mask); masks are the batch-mean Q-vector thresholded at its mean, so
the kept count is not controlled. double_dqn: Q(s, j, a_j) for a_j in {drop, keep}; the stored action is the
applied mask; the greedy action is the top-k of mean_b [Q(s_b, j, keep) - Q(s_b, j, drop)]; the target is
r + gamma * (1 - done) * mean_j Q_target(s', j, a*_j) with a* the online network's greedy top-k mask.
"""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from agents.vit_ddqn.base import PatchAgent
from agents.vit_ddqn.buffers import ReplayBuffer, Transition
from agents.vit_ddqn.policies import QNetwork
from pruning_env.envs.patch_env import mean_threshold_mask, random_topk_mask, topk_mask
from pruning_env.runtime import TorchRNG

MODES = ("faithful", "double_dqn")


def epsilon_at(t: float, start: float = 1.0, end: float = 0.01, decay: float = 20000.0) -> float:
    """Exponential exploration schedule ``end + (start - end) * exp(-t / decay)`` (the notebook's).

    :param t: steps (or epochs) completed.
    :param start: value at t = 0.
    :param end: asymptote.
    :param decay: time constant in the same unit as ``t``.
    """
    if decay <= 0:
        raise ValueError(f"decay must be > 0, got {decay}")
    return end + (start - end) * math.exp(-t / decay)


@torch.no_grad()
def polyak_update(online: torch.nn.Module, target: torch.nn.Module, tau: float) -> None:
    """theta_target <- tau * theta_online + (1 - tau) * theta_target over every state-dict entry.

    :param online: source network.
    :param target: network updated in place.
    :param tau: interpolation weight of the online network (the notebook: 0.1).
    """
    for t, o in zip(target.state_dict().values(), online.state_dict().values()):
        if t.dtype.is_floating_point:
            t.mul_(1.0 - tau).add_(o, alpha=tau)
        else:
            t.copy_(o)


class ViTDDQN(PatchAgent):
    """AgentViT patch-selection agent (SB3-like surface; see the module docstring for the two modes).

    :param env: a :class:`~pruning_env.envs.patch_env.PatchSelectEnv` (Box scores or MultiBinary masks).
    :param mode: ``"faithful"`` or ``"double_dqn"``.
    :param learning_rate: AdamW learning rate (the notebook: 0.01).
    :param buffer_size: replay capacity in transitions (the notebook: 64).
    :param batch_size: transitions per update (the notebook: 8); each holds B image rows.
    :param gamma: discount (0.95).
    :param tau: Polyak coefficient (0.1).
    :param target_update_interval: soft update after every this many optimisation steps (2).
    :param exploration_initial_eps: epsilon at step 0 (1.0).
    :param exploration_final_eps: epsilon asymptote (0.01).
    :param exploration_decay: time constant of the exponential decay (20,000 batches in the notebook).
    :param eps_per: ``"step"`` (per ViT batch, the notebook) or ``"epoch"``.
    :param hidden: Q-network hidden widths (1024, 256).
    :param weight_decay: AdamW weight decay (PyTorch's default 0.01, as the notebook).
    :param amsgrad: AdamW amsgrad (True).
    :param max_grad_value: gradient clipping by value (100).
    :param eviction: replay eviction, ``"random"`` (notebook) or ``"fifo"``.
    :param skip_first_epoch: push no transition during epoch 1 (the notebook).
    :param next_state: ``"same_batch"`` (the notebook's s': the same batch after the ViT step, from
        ``info["next_state_same_batch"]``) or ``"observation"`` (the next batch's state); default by mode.
    :param normalize_state: standardise each state row before the Q-network; default False (faithful),
        True (double_dqn).
    :param n_keep: kept count of top-k masks (double_dqn; default: the env's n_keep).
    :param n_patches: N when there is no env.
    :param device: agent device (default: the env's).
    :param seed: seeds network init, exploration and replay.
    :param exploration_fraction: when set, the decay's time constant is this fraction of the env's run
        (``env.total_steps`` batches, or ``env.epochs`` with ``eps_per="epoch"``; at least 1), replacing
        ``exploration_decay``: a short run's epsilon then falls as a long run's does. Needs an env (without one,
        e.g. on ``load``, ``exploration_decay`` is kept as saved).
    """

    _init_keys = ("n_patches", "n_keep", "seed", "mode", "learning_rate", "buffer_size", "batch_size", "gamma",
                  "tau", "target_update_interval", "exploration_initial_eps", "exploration_final_eps",
                  "exploration_decay", "eps_per", "hidden", "weight_decay", "amsgrad", "max_grad_value",
                  "eviction", "skip_first_epoch", "next_state", "normalize_state", "exploration_fraction")

    @staticmethod
    def next_state_for(mode: str, next_state: Optional[str] = None) -> str:
        """The s' an agent of ``mode`` learns from: ``next_state`` if given, else ``"same_batch"`` (faithful) or
        ``"observation"`` (double_dqn). Only ``"same_batch"`` needs the env's ``same_batch_next_state``."""
        next_state = next_state or ("same_batch" if mode == "faithful" else "observation")
        if next_state not in ("same_batch", "observation"):
            raise ValueError(f"next_state={next_state!r}; expected 'same_batch' or 'observation'")
        return next_state

    def __init__(self, env=None, mode: str = "faithful", learning_rate: float = 0.01, buffer_size: int = 64,
                 batch_size: int = 8, gamma: float = 0.95, tau: float = 0.1, target_update_interval: int = 2,
                 exploration_initial_eps: float = 1.0, exploration_final_eps: float = 0.01,
                 exploration_decay: float = 20000.0, eps_per: str = "step", hidden: Sequence[int] = (1024, 256),
                 weight_decay: float = 0.01, amsgrad: bool = True, max_grad_value: Optional[float] = 100.0,
                 eviction: str = "random", skip_first_epoch: bool = True, next_state: Optional[str] = None,
                 normalize_state: Optional[bool] = None, n_keep: Optional[int] = None,
                 n_patches: Optional[int] = None, device: Union[str, torch.device, None] = None,
                 seed: Optional[int] = None, exploration_fraction: Optional[float] = None):
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; expected one of {MODES}")
        if eps_per not in ("step", "epoch"):
            raise ValueError(f"eps_per={eps_per!r}; expected 'step' or 'epoch'")
        next_state = self.next_state_for(mode, next_state)
        super().__init__(env=env, n_patches=n_patches, n_keep=n_keep, device=device, seed=seed)
        self.mode = mode
        self.learning_rate = float(learning_rate)
        self.buffer_size = int(buffer_size)
        self.batch_size = int(batch_size)
        self.gamma = float(gamma)
        self.tau = float(tau)
        self.target_update_interval = int(target_update_interval)
        self.exploration_initial_eps = float(exploration_initial_eps)
        self.exploration_final_eps = float(exploration_final_eps)
        self.exploration_decay = float(exploration_decay)
        self.exploration_fraction = None if exploration_fraction is None else float(exploration_fraction)
        if self.exploration_fraction is not None:
            if not self.exploration_fraction > 0:
                raise ValueError(f"exploration_fraction must be > 0, got {exploration_fraction}")
            base = getattr(env, "unwrapped", env)
            if base is not None:
                run = base.total_steps if eps_per == "step" else base.epochs
                self.exploration_decay = max(1.0, self.exploration_fraction * run)
        self.eps_per = eps_per
        self.hidden = tuple(int(h) for h in hidden)
        self.weight_decay = float(weight_decay)
        self.amsgrad = bool(amsgrad)
        self.max_grad_value = max_grad_value
        self.eviction = eviction
        self.skip_first_epoch = bool(skip_first_epoch)
        self.next_state = next_state
        self.normalize_state = (mode == "double_dqn") if normalize_state is None else bool(normalize_state)
        base_env = getattr(env, "unwrapped", env)
        if env is not None and next_state == "same_batch" and not getattr(base_env, "same_batch_next_state", True):
            raise ValueError("next_state='same_batch' needs the env's same_batch_next_state=True")

        values = 1 if mode == "faithful" else 2
        # the initial weights follow the seed, drawn from a private stream: the program's RNG is not reseeded
        with TorchRNG(seed) if seed is not None else contextlib.nullcontext():
            self.q_net = QNetwork(self.n_patches, self.hidden, values).to(self.device)
        self.q_target = copy.deepcopy(self.q_net)
        self.q_target.requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.q_net.parameters(), lr=self.learning_rate,
                                           weight_decay=self.weight_decay, amsgrad=self.amsgrad)
        self.replay = ReplayBuffer(self.buffer_size, eviction=eviction, seed=seed)
        self.n_updates = 0
        self.epochs_done = 0
        self.exploration_rate = self.exploration_initial_eps
        self.losses: List[float] = []
        self.rewards: List[float] = []

    # ---------------------------------------------------------------- acting
    def _prep(self, states: torch.Tensor) -> torch.Tensor:
        if not self.normalize_state:
            return states
        mean = states.mean(dim=-1, keepdim=True)
        std = states.std(dim=-1, keepdim=True).clamp_min(1e-6)
        return (states - mean) / std

    def patch_scores(self, states: torch.Tensor) -> torch.Tensor:
        """Greedy per-patch scores of a batch (N,): mean_b Q(s_b) (faithful) or mean_b [Q_keep - Q_drop]."""
        q = self.q_net(self._prep(states.to(self.device)))
        if self.mode == "faithful":
            return q.mean(dim=0)
        return (q[..., 1] - q[..., 0]).mean(dim=0)

    def _explore(self) -> bool:
        return float(self.rng.random()) <= self.exploration_rate

    def _faithful_scores(self, states: torch.Tensor, deterministic: bool) -> torch.Tensor:
        if not deterministic and self._explore():
            # the notebook's MultiContinue sample: U[0, 1)^N, ignoring the state
            return torch.rand(self.n_patches, generator=self.generator).to(self.device)
        return self.patch_scores(states)

    def _scores_for_states(self, states: torch.Tensor, deterministic: bool) -> torch.Tensor:
        if self.mode == "faithful":
            return self._faithful_scores(states, deterministic)
        return self.mask_for_states(states, deterministic).float()

    def mask_for_states(self, states: torch.Tensor, deterministic: bool = True) -> torch.Tensor:
        """The batch-shared keep-mask (N,) for per-image states (B, N): mean-threshold of the (possibly random)
        scores (faithful) or top-``n_keep`` of the keep advantage / a random k-subset (double_dqn)."""
        if self.mode == "faithful":
            return mean_threshold_mask(self._faithful_scores(states, deterministic))
        if not deterministic and self._explore():
            return random_topk_mask(self.n_patches, self.n_keep, self.generator, self.device)
        return topk_mask(self.patch_scores(states), self.n_keep)

    # ---------------------------------------------------------------- learning
    def _update_exploration(self, info: Dict[str, Any]) -> None:
        if info.get("epoch_end"):
            self.epochs_done += 1
        t = self.num_timesteps if self.eps_per == "step" else self.epochs_done
        self.exploration_rate = epsilon_at(t, self.exploration_initial_eps, self.exploration_final_eps,
                                           self.exploration_decay)

    def _on_step(self, obs: torch.Tensor, reward: float, next_obs: torch.Tensor, terminated: bool,
                 info: Dict[str, Any]) -> None:
        if info.get("reward_step", True) and not (self.skip_first_epoch and info.get("epoch", 1) == 0):
            if self.next_state == "same_batch":
                if "next_state_same_batch" not in info:
                    raise KeyError("info lacks 'next_state_same_batch'; build the env with same_batch_next_state=True")
                nxt = self._as_states(info["next_state_same_batch"])
            else:
                nxt = next_obs
            # the notebook does not store the action; the double DQN must (its target indexes by it)
            action = (torch.as_tensor(info["mask"], dtype=torch.bool, device=self.device)
                      if self.mode == "double_dqn" else None)
            self.replay.push(Transition(obs.detach(), nxt.detach(), float(reward), action,
                                        bool(terminated) and self.mode == "double_dqn"))
            self.rewards.append(float(reward))
            if len(self.replay) >= self.batch_size:
                self.train_step()
        self._update_exploration(info)

    @torch.no_grad()
    def compute_targets(self, batch: List[Transition]) -> torch.Tensor:
        """TD targets of a sampled batch, one row per image row of the concatenated states.

        faithful: (M, N) = r + gamma * Q_target(s') element-wise. double_dqn: (M,) = r + gamma * (1 - done) *
        mean_j Q_target(s', j, a*_j), where a* = top-k of the online network's keep advantage on s' (one
        batch-shared mask per transition, as actions are chosen).
        """
        rows = [t.next_state.shape[0] for t in batch]
        rewards = torch.cat([torch.full((n,), t.reward, device=self.device) for n, t in zip(rows, batch)])
        next_states = self._prep(torch.cat([t.next_state for t in batch]).to(self.device))
        if self.mode == "faithful":
            return rewards[:, None] + self.gamma * self.q_target(next_states)
        q_online = self.q_net(next_states)
        q_target = self.q_target(next_states)
        values, start = [], 0
        for n in rows:
            adv = (q_online[start:start + n, :, 1] - q_online[start:start + n, :, 0]).mean(dim=0)
            greedy = topk_mask(adv, self.n_keep).long()  # online argmax under the top-k constraint
            chosen = q_target[start:start + n].gather(2, greedy.view(1, -1, 1).expand(n, -1, 1)).squeeze(-1)
            values.append(chosen.mean(dim=1))  # target network evaluates the online choice
            start += n
        dones = torch.cat([torch.full((n,), float(t.done), device=self.device) for n, t in zip(rows, batch)])
        return rewards + self.gamma * (1.0 - dones) * torch.cat(values)

    def train_step(self) -> float:
        """One gradient step on ``batch_size`` sampled transitions; Polyak update every
        ``target_update_interval`` steps. Returns the Huber loss."""
        batch = self.replay.sample(self.batch_size)
        states = self._prep(torch.cat([t.state for t in batch]).to(self.device))
        targets = self.compute_targets(batch)
        q = self.q_net(states)
        if self.mode == "faithful":
            loss = F.smooth_l1_loss(q, targets)
        else:
            actions = torch.cat([t.action.view(1, -1).expand(t.state.shape[0], -1) for t in batch]).long()
            taken = q.gather(2, actions.to(self.device).unsqueeze(-1)).squeeze(-1)  # Q(s, j, a_j)
            loss = F.smooth_l1_loss(taken, targets[:, None].expand_as(taken))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.max_grad_value is not None:
            torch.nn.utils.clip_grad_value_(self.q_net.parameters(), self.max_grad_value)
        self.optimizer.step()
        self.n_updates += 1
        if self.n_updates % self.target_update_interval == 0:
            polyak_update(self.q_net, self.q_target, self.tau)
        value = float(loss.detach())
        self.losses.append(value)
        return value

    def _postfix(self, info: Dict[str, Any]) -> Dict[str, str]:
        out = super()._postfix(info)
        out.update(eps=f"{self.exploration_rate:.3f}", updates=str(self.n_updates))
        return out

    # ---------------------------------------------------------------- persistence
    def _extra_state(self) -> Dict[str, Any]:
        return {"q_net": self.q_net.state_dict(), "q_target": self.q_target.state_dict(),
                "optimizer": self.optimizer.state_dict(), "n_updates": self.n_updates,
                "epochs_done": self.epochs_done, "exploration_rate": self.exploration_rate}

    def _load_extra_state(self, state: Dict[str, Any]) -> None:
        self.q_net.load_state_dict(state["q_net"])
        self.q_target.load_state_dict(state["q_target"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.n_updates = int(state["n_updates"])
        self.epochs_done = int(state["epochs_done"])
        self.exploration_rate = float(state["exploration_rate"])
