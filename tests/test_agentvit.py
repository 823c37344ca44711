"""AgentViT tests: SimpleViT masking, state and analytic FLOPs; the patch env (checkers, reward); the agent's
replay, exploration, Polyak and double-DQN targets on hand-made numbers; a tiny offline joint run.
"""
import json
import math
import random
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from gymnasium.utils.env_checker import check_env
from torch.utils.flop_counter import FlopCounterMode

from agents.vit_ddqn import AllPatches, RandomPatches, ReplayBuffer, Transition, ViTDDQN, epsilon_at, polyak_update
from pruning_env.costs import count_costs, state_macs, vit_macs
from pruning_env.costs.counting import matmul_term
from pruning_env.envs.patch_env import (PatchSelectEnv, mean_threshold_mask, random_topk_mask, register_patch_envs,
                                        topk_mask)
from pruning_env.models import create_model
from pruning_env.models.vit import SimpleViT, posemb_sincos_2d
from rl_prune.cli import vit_main
from rl_prune.config import ViTRunConfig, load_config
from rl_prune.vit_run import needs_same_batch_state, run_training

ROOT = Path(__file__).resolve().parents[1]


def tiny_vit(**kw) -> SimpleViT:
    torch.manual_seed(0)
    return create_model("vit_tiny_patch4", num_classes=10, width=0.125, depth=kw.pop("depth", 1), **kw)


def tiny_env(splits, **kw) -> PatchSelectEnv:
    args = dict(dataset=splits, width=0.125, depth=1, batch_size=32, epochs=2, reward_every=2, n_keep=20, seed=0,
                time_info=False)
    args.update(kw)
    return PatchSelectEnv(**args)


# ------------------------------------------------------------------------------------------------ model
def test_notebook_config_has_the_notebook_parameter_count_and_macs():
    model = create_model("vit_tiny_patch4", num_classes=10, width=1.0, depth=6)
    assert (model.dim, model.heads, model.dim_head, model.mlp_dim, model.num_patches) == (128, 16, 64, 512, 64)
    assert sum(p.numel() for p in model.parameters()) == 3_947_242  # spec §1.1
    assert model.zoo_config == {"name": "vit_tiny_patch4", "num_classes": 10, "width": 1.0, "depth": 6}
    assert vit_macs(model) == 302_384_384  # spec: 302.4 MMACs for 64 tokens
    assert round(state_macs(model) / 1e6, 1) == 42.3  # spec: state pass 42.3 MMACs


def test_vit_count_is_the_counters_convention_plus_the_matmuls_hooks_cannot_see():
    # one convention: the hook counter sees every linear layer (LayerNorm counts 0 in both); the analytic count adds
    # only the functional QK^T and AV products, by the counter's own matmul formula
    model = tiny_vit(depth=2)
    inner, n = model.heads * model.dim_head, model.num_patches
    assert vit_macs(model) == count_costs(model).macs + model.depth * matmul_term(n, n, inner).macs
    assert count_costs(model).macs == count_costs(model, include_norm=False).macs  # no BatchNorm in the ViT


def test_width_knob_scales_dim_mlp_and_heads():
    model = create_model("vit_tiny_patch4", num_classes=10, width=0.25, depth=2)
    assert (model.dim, model.mlp_dim, model.heads, model.depth) == (32, 128, 4, 2)


def test_sincos_positions_follow_the_formula():
    pe = posemb_sincos_2d(8, 8, 16)
    omega = 1.0 / 10000 ** (torch.arange(4, dtype=torch.float64) / 3)
    y, x = 2, 5  # token 2*8+5
    expected = torch.cat([torch.sin(x * omega), torch.cos(x * omega), torch.sin(y * omega), torch.cos(y * omega)])
    assert torch.allclose(pe[2 * 8 + 5], expected.float(), atol=1e-6)


def test_shared_keep_mask_feeds_exactly_the_kept_tokens_to_block_one():
    model = tiny_vit().eval()
    x = torch.randn(3, 3, 32, 32)
    keep = torch.zeros(64, dtype=torch.bool)
    keep[[0, 5, 17, 63]] = True
    seen = {}
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.setdefault("tokens", args[0]))
    model(x, keep=keep)
    assert torch.allclose(seen["tokens"], model.embed(x)[:, [0, 5, 17, 63]])


def test_per_image_keep_masks_select_each_rows_tokens():
    model = tiny_vit().eval()
    x = torch.randn(2, 3, 32, 32)
    keep = torch.zeros(2, 64, dtype=torch.bool)
    keep[0, [1, 2, 3]] = True
    keep[1, [10, 40, 60]] = True
    out = model(x, keep=keep)
    assert torch.allclose(out[0], model(x[:1], keep=keep[0])[0], atol=1e-5)
    assert torch.allclose(out[1], model(x[1:], keep=keep[1])[0], atol=1e-5)
    with pytest.raises(ValueError, match="same, non-zero number"):
        bad = keep.clone()
        bad[1, 0] = True
        model(x, keep=bad)


def test_dropped_patches_do_not_influence_the_output():
    model = tiny_vit().eval()
    x = torch.randn(1, 3, 32, 32)
    keep = torch.zeros(64, dtype=torch.bool)
    keep[:32] = True  # top half of the image (rows 0-3 of the 8x8 grid)
    x2 = x.clone()
    x2[..., 16:, :] = torch.randn(1, 3, 16, 32)  # change only dropped patches
    assert torch.allclose(model(x, keep), model(x2, keep), atol=1e-6)
    x3 = x.clone()
    x3[..., :4, :4] = torch.randn(1, 3, 4, 4)  # change kept patch 0 (not by a constant: LayerNorm removes it)
    assert not torch.allclose(model(x, keep), model(x3, keep), atol=1e-6)
    with pytest.raises(ValueError, match="keeps no patch"):
        model(x, torch.zeros(64, dtype=torch.bool))


def test_patch_state_is_the_mean_of_block_one_attention_output():
    model = tiny_vit(depth=2)
    x = torch.randn(4, 3, 32, 32)
    expected = model.blocks[0].attn(model.embed(x)).mean(-1)
    state = model.patch_state(x)
    assert state.shape == (4, 64) and not state.requires_grad
    assert torch.allclose(state, expected, atol=1e-6)


@pytest.mark.parametrize("k", [64, 30, 7, 1])
def test_analytic_macs_match_flop_counter(k):
    model = create_model("vit_tiny_patch4", num_classes=10, width=0.25, depth=2).eval()
    keep = topk_mask(torch.randn(64), k)
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(2, 3, 32, 32), keep=keep)
    assert counter.get_total_flops() == 2 * 2 * vit_macs(model, k)  # 2 images, FLOPs = 2 x MACs


# ------------------------------------------------------------------------------------------------ masks
def test_mask_rules():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.3])
    assert mean_threshold_mask(scores).tolist() == [False, True, True, False]
    assert mean_threshold_mask(torch.full((5,), 2.0)).all()  # never empty: max >= mean
    assert topk_mask(scores, 3).tolist() == [False, True, True, True]
    g = torch.Generator().manual_seed(0)
    assert all(int(random_topk_mask(64, 30, g).sum()) == 30 for _ in range(5))
    with pytest.raises(ValueError, match="k must be in 1..4"):
        topk_mask(scores, 0)


# ------------------------------------------------------------------------------------------------ env
@pytest.mark.filterwarnings("ignore:.*(infinity|symmetric|render modes).*:UserWarning")
def test_env_passes_gymnasium_checker_in_both_action_modes(synthetic_splits):
    check_env(tiny_env(synthetic_splits))
    check_env(tiny_env(synthetic_splits, action_mode="mask", binarize="topk"))


def test_env_reward_follows_spec_and_info_has_counts_loss_and_time(synthetic_splits):
    env = tiny_env(synthetic_splits, action_mode="mask", reward_every=2, n_keep=20, patch_weight=20.0,
                   loss_weight=1.0, time_info=True)
    env.reset(seed=0)
    mask = np.zeros(64, dtype=np.int8)
    mask[:24] = 1  # k = 24, k* = 20, z* = 44
    _, r1, _, _, info1 = env.step(mask)
    assert r1 == 0.0 and not info1["reward_step"]
    assert info1["kept"] == 24 and info1["step_time"] > 0 and "state_time" in info1 and info1["loss"] > 0
    _, r2, _, _, info2 = env.step(mask)  # first reward step: L0 = L2, r_loss = 1
    assert info2["reward_step"] and info2["r_loss"] == pytest.approx(1.0)
    assert r2 == pytest.approx(1.0 + 20.0 * (-4 / 44))
    assert info2["next_state_same_batch"].shape == (32, 64)
    env.step(mask)
    _, r4, _, _, info4 = env.step(mask)
    assert r4 == pytest.approx(info2["loss"] / info4["loss"] - 20.0 * 4 / 44)


def test_env_episode_is_one_training_run_and_reset_restores_the_vit(synthetic_splits):
    env = tiny_env(synthetic_splits, epochs=1)
    obs, _ = env.reset(seed=3)
    start = {k: v.clone() for k, v in env.model.state_dict().items()}
    terminated, steps = False, 0
    while not terminated:
        obs, _, terminated, truncated, info = env.step(np.random.rand(64).astype(np.float32))
        steps += 1
    assert steps == env.total_steps == len(env.splits.train) // 32 and info["epoch_end"]
    with pytest.raises(RuntimeError, match="call reset"):
        env.step(np.zeros(64, dtype=np.float32))
    assert not torch.equal(env.model.state_dict()["linear_head.1.weight"], start["linear_head.1.weight"])
    env.reset()
    assert all(torch.equal(v, start[k]) for k, v in env.model.state_dict().items())


def test_registered_ids_make_envs():
    register_patch_envs()
    assert "RLPatch-vit-cifar10" in gym.registry and "RLPatch-quickstart" in gym.registry
    env = gym.make("RLPatch-quickstart", dataset="synthetic", epochs=1, time_info=False)
    obs, _ = env.reset(seed=0)
    assert obs.shape == env.observation_space.shape == (64, 64)
    agent = ViTDDQN(env, mode="faithful", hidden=(8,), batch_size=1, skip_first_epoch=False).learn(3)
    assert agent.num_timesteps == 3 and agent.n_updates == 3  # wrapped env, reward every batch


# ------------------------------------------------------------------------------------------------ agent parts
def test_replay_random_eviction_and_fifo_on_hand_made_items():
    buf = ReplayBuffer(capacity=3, eviction="random", seed=7)
    items = [Transition(torch.zeros(1, 2), torch.zeros(1, 2), float(i)) for i in range(5)]
    for t in items[:3]:
        assert buf.push(t) is None
    mirror = random.Random(7)
    expected = [0.0, 1.0, 2.0]
    for t in items[3:]:
        idx = mirror.randrange(3)
        evicted = buf.push(t)
        assert evicted.reward == expected.pop(idx)
        expected.append(t.reward)
    assert [t.reward for t in buf.memory] == expected
    assert len(buf.sample(2)) == 2 and len({id(t) for t in buf.sample(3)}) == 3
    with pytest.raises(ValueError, match="cannot sample 4"):
        buf.sample(4)
    fifo = ReplayBuffer(capacity=2, eviction="fifo")
    for t in items[:3]:
        fifo.push(t)
    assert [t.reward for t in fifo.memory] == [1.0, 2.0]


def test_epsilon_schedule_matches_the_notebook():
    assert epsilon_at(0) == pytest.approx(1.0)
    assert epsilon_at(20000) == pytest.approx(0.01 + 0.99 / math.e)
    assert epsilon_at(391 * 100) == pytest.approx(0.150, abs=1e-3)  # spec §2.3: 0.150 after 100 CIFAR epochs


def test_polyak_update_on_hand_made_numbers():
    online, target = nn.Linear(2, 1), nn.Linear(2, 1)
    with torch.no_grad():
        online.weight.fill_(1.0), online.bias.fill_(1.0), target.weight.zero_(), target.bias.zero_()
    polyak_update(online, target, 0.1)
    assert torch.allclose(target.weight, torch.full((1, 2), 0.1))
    polyak_update(online, target, 0.1)
    assert torch.allclose(target.bias, torch.tensor([0.19]))


class FixedQ(nn.Module):
    """Returns fixed per-row values, whatever the input."""

    def __init__(self, values: torch.Tensor):
        super().__init__()
        self.values = values
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, states):
        return self.values.expand(states.shape[0], *self.values.shape[1:]) + 0 * self.w


def test_double_dqn_target_uses_online_argmax_and_target_values():
    agent = ViTDDQN(None, mode="double_dqn", n_patches=3, n_keep=1, gamma=0.5, hidden=(4,), normalize_state=False)
    # online prefers keeping patch 2 (advantage 5); the target network would prefer patch 0
    agent.q_net = FixedQ(torch.tensor([[[0.0, 1.0], [0.0, 0.0], [0.0, 5.0]]]))
    agent.q_target = FixedQ(torch.tensor([[[1.0, 9.0], [2.0, 0.0], [3.0, 4.0]]]))
    t = Transition(torch.zeros(2, 3), torch.zeros(2, 3), reward=1.0, action=torch.tensor([True, False, False]))
    y = agent.compute_targets([t])
    # a* = keep patch 2 only -> Q_target(s', j, a*_j) = [1 (drop), 2 (drop), 4 (keep)], mean 7/3
    assert torch.allclose(y, torch.full((2,), 1.0 + 0.5 * 7 / 3))
    done = Transition(torch.zeros(2, 3), torch.zeros(2, 3), 1.0, torch.tensor([True, False, False]), done=True)
    assert torch.allclose(agent.compute_targets([done]), torch.ones(2))


def test_double_dqn_loss_regresses_the_taken_keep_drop_values():
    agent = ViTDDQN(None, mode="double_dqn", n_patches=3, n_keep=1, gamma=0.5, hidden=(4,), batch_size=1,
                    normalize_state=False, max_grad_value=None)
    q = torch.tensor([[[0.0, 1.0], [0.0, 0.0], [0.0, 5.0]]])
    agent.q_net = FixedQ(q)
    agent.q_target = FixedQ(q.clone())
    agent.optimizer = torch.optim.SGD(agent.q_net.parameters(), lr=0.0)
    action = torch.tensor([True, False, True])
    agent.replay.push(Transition(torch.zeros(1, 3), torch.zeros(1, 3), 2.0, action))
    y = 2.0 + 0.5 * (0.0 + 0.0 + 5.0) / 3
    taken = torch.tensor([[1.0, 0.0, 5.0]])
    assert agent.train_step() == pytest.approx(float(F.smooth_l1_loss(taken, torch.full((1, 3), y))))


def test_faithful_target_is_elementwise_without_action():
    agent = ViTDDQN(None, mode="faithful", n_patches=3, gamma=0.95, hidden=(4,))
    agent.q_target = FixedQ(torch.tensor([[1.0, 2.0, 3.0]]))
    t = Transition(torch.zeros(2, 3), torch.zeros(2, 3), reward=0.5)
    assert torch.allclose(agent.compute_targets([t]), 0.5 + 0.95 * torch.tensor([[1.0, 2.0, 3.0]] * 2))


def test_agent_updates_on_reward_steps_with_schedules(synthetic_splits):
    env = tiny_env(synthetic_splits, reward_every=1)
    agent = ViTDDQN(env, mode="faithful", batch_size=2, target_update_interval=2, exploration_decay=3.0,
                    skip_first_epoch=True, hidden=(16,), seed=0)
    agent.learn(env.total_steps)
    per_epoch = env.batches_per_epoch
    assert len(agent.replay) == min(64, per_epoch)  # epoch 1 pushes nothing (notebook)
    assert agent.n_updates == per_epoch - 1  # an update once the buffer holds batch_size transitions
    assert agent.exploration_rate == pytest.approx(epsilon_at(env.total_steps, decay=3.0))
    ddqn_env = tiny_env(synthetic_splits, action_mode="mask", reward_every=1)
    ddqn = ViTDDQN(ddqn_env, mode="double_dqn", batch_size=2, hidden=(16,), seed=0, skip_first_epoch=False)
    ddqn.learn(ddqn_env.total_steps)
    assert set(ddqn.kept_history) == {ddqn_env.n_keep}  # top-k masks: the count follows k*
    assert all(t.action is not None and int(t.action.sum()) == 20 for t in ddqn.replay.memory)


def test_exploration_fraction_sets_the_decay_from_the_run_length(tmp_path, synthetic_splits):
    env = tiny_env(synthetic_splits)
    agent = ViTDDQN(env, mode="double_dqn", hidden=(16,), exploration_fraction=0.25, seed=0)
    assert agent.exploration_decay == max(1.0, 0.25 * env.total_steps)
    per_epoch = ViTDDQN(env, mode="double_dqn", hidden=(16,), eps_per="epoch", exploration_fraction=0.75, seed=0)
    assert per_epoch.exploration_decay == max(1.0, 0.75 * env.epochs)
    assert ViTDDQN(env, mode="double_dqn", hidden=(16,), exploration_fraction=1e-6).exploration_decay == 1.0
    loaded = ViTDDQN.load(agent.save(tmp_path / "agent.pt"))  # no env: the saved decay is kept
    assert loaded.exploration_fraction == 0.25 and loaded.exploration_decay == agent.exploration_decay
    with pytest.raises(ValueError, match="exploration_fraction must be > 0, got 0"):
        ViTDDQN(env, mode="double_dqn", hidden=(16,), exploration_fraction=0)


def test_only_an_agent_learning_from_the_same_batch_state_makes_the_env_compute_it():
    assert ViTDDQN.next_state_for("faithful") == "same_batch" and ViTDDQN.next_state_for("double_dqn") == "observation"
    assert needs_same_batch_state("faithful", {}) and not needs_same_batch_state("double_dqn", {})
    assert needs_same_batch_state("double_dqn", {"next_state": "same_batch"})
    assert not needs_same_batch_state("faithful", {"next_state": "observation"})
    assert not needs_same_batch_state("full", {}) and not needs_same_batch_state("random", {})
    with pytest.raises(ValueError, match="next_state='next'; expected 'same_batch' or 'observation'"):
        ViTDDQN.next_state_for("faithful", "next")


def test_agent_save_load_roundtrip_and_baselines(tmp_path, synthetic_splits):
    env = tiny_env(synthetic_splits)
    agent = ViTDDQN(env, mode="double_dqn", hidden=(16,), seed=1)
    obs, _ = env.reset(seed=0)
    path = agent.save(tmp_path / "agent.pt")
    loaded = ViTDDQN.load(path)
    assert np.array_equal(loaded.predict(obs)[0], agent.mask_for_states(torch.as_tensor(obs)).numpy().astype(np.int8))
    with pytest.raises(ValueError, match="not a RandomPatches"):
        RandomPatches.load(path)
    assert AllPatches(env).predict(obs)[0].sum() == 64
    assert RandomPatches(env, n_keep=12).predict(obs)[0].sum() > 0


# ------------------------------------------------------------------------------------------------ joint run
def test_tiny_joint_run_offline(tmp_path):
    config = {"policy": "double_dqn", "seed": 0, "device": "cpu", "out": str(tmp_path), "progress": False,
              "env": {"dataset": "synthetic", "width": 0.125, "depth": 1, "batch_size": 32, "epochs": 2,
                      "reward_every": 1, "n_keep": 16},
              "agent": {"exploration_decay": 5, "skip_first_epoch": False, "hidden": [16]},
              "eval": {"throughput": False}}
    seen = []
    res = run_training(config, on_epoch=seen.append)
    assert [h["epoch"] for h in res["history"]] == [1, 2] and seen == res["history"]
    first, second = res["history"]
    assert set(first) == {"epoch", "time_s", "val_top1", "val_loss", "train_loss", "train_loss_last", "kept", "lr"}
    assert 0 < first["time_s"] < second["time_s"] <= res["train_time_s"]
    assert first["kept"] == second["kept"] == 16  # top-k masks (double DQN): every batch keeps k*
    assert res["batches_per_epoch"] * res["epochs"] == res["total_steps"]
    assert res["train_mean_kept"] == 16 and res["agent_updates"] > 0 and res["train_time_s"] > 0
    assert set(res["test"]) == {"all", "agent", "random"} and res["eval_kept"] == 16
    assert 0.0 <= res["test"]["all"]["top1"] <= 1.0 and res["test"]["random"]["mean_kept"] == 16
    assert res["gflops_at_eval_kept"] < res["gflops_full"]
    assert (tmp_path / "results.json").is_file() and (tmp_path / "summary.md").is_file()
    from pruning_env.checkpoint import load_model

    assert isinstance(load_model(tmp_path / "vit.pt"), SimpleViT)
    full = run_training({**config, "policy": "full", "agent": {}, "out": None})
    assert full["train_mean_kept"] == 64 and full["state_gflops_per_image"] == 0.0


def test_config_errors_name_the_bad_key():
    with pytest.raises(ValueError, match="unknown key env.epochz"):
        load_config(data={"env": {"epochz": 3}}, schema=ViTRunConfig)
    with pytest.raises(ValueError, match="policy must be one of .*'ppo'"):
        load_config(data={"policy": "ppo"}, schema=ViTRunConfig)
    for path in sorted((ROOT / "configs" / "agentvit").glob("*.yaml")):
        load_config(path, schema=ViTRunConfig)


def test_vit_cli_flags_and_overrides_share_one_grammar(tmp_path, capsys):
    """The flags are shorthands for config keys; key=value sets any key; a bad one exits 2 with one line."""
    assert vit_main(["env.epochz=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "unknown key env.epochz" in err and err.count("\n") == 1
    assert vit_main(["--policy", "full", "eval.batch_size=0"]) == 2
    assert "eval.batch_size must be an integer >= 1, got 0" in capsys.readouterr().err
    assert vit_main(["eval.throughput_batch=2.5"]) == 2
    assert "eval.throughput_batch must be an integer" in capsys.readouterr().err
    out = tmp_path / "full"
    assert vit_main(["--policy", "full", "--dataset", "synthetic", "--width", "0.125", "--depth", "1",
                     "--batch-size", "32", "--epochs", "1", "--device", "cpu", "--out", str(out), "--no-progress",
                     "env.n_keep=16", "eval.throughput=false"]) == 0
    saved = json.loads((out / "results.json").read_text())["config"]
    assert saved["policy"] == "full" and saved["agent"] == {} and saved["progress"] is False
    assert saved["env"]["epochs"] == 1 and saved["env"]["n_keep"] == 16 and saved["eval"]["throughput"] is False
    assert saved["env"]["reward_every"] == 1  # merged over the quickstart's env
