"""The tests' one helper module: tiny nets, tiny data, a scripted env and shared checks (no tests of its own).

- env and agent tests: ``TinyNet`` (conv1 | conv2+conv3, closed by a residual add: one group of two layers | fc1 |
  classifier; a step costs a few ms), ``tiny_env`` / ``tiny_splits`` (16x16 generated images; the ``splits``
  fixture of conftest.py), ``tiny_patch_env`` (AgentViT's env on a tiny SimpleViT), ``ScriptedEnv`` (a stand-in
  PruneEnv with scripted accuracies), ``random_actions``, ``state_copy`` / ``same_state``, ``SB3_SMALL``;
- run-layer tests: ``TINY_RUN`` / ``tiny_run(...)``, the train_agent.py config of an untrained width-0.0625 VGG-11
  (a few seconds), ``tiny_run_config`` (a typed run config over TinyNet), ``KillAt`` (a kill after step k);
- pruning-engine tests: hand-written nets covering every construct the tracer must handle (16x16 inputs,
  <= 24 channels), tiny torchvision transformers, ``random_plan``, ``check_built``, ``randomise`` /
  ``random_batchnorm``, ``hooked_group_costs`` (reference costs by forward hooks), ``flop_counter_macs``,
  ``head_groups``, ``n_heads``, ``Attention`` (timm's fused-qkv attention, registered in FUSED_QKV_ATTENTION).
"""
import copy

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from stable_baselines3.common.callbacks import BaseCallback

from pruning_env.costs import attention_macs, count_costs, layer_macs
from pruning_env.costs.counting import FUSED_QKV_ATTENTION
from pruning_env.pruning import Pruner, zeroed_copy
from pruning_env.pruning.attention import attention_handler



class TinyNet(nn.Module):
    """conv-bn-relu x2 (the second pair closes a residual add), pool, fc hidden, classifier."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.conv2 = nn.Conv2d(12, 16, 3, padding=1, stride=2, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.fc1 = nn.Linear(16, 20)
        self.fc2 = nn.Linear(20, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(x + self.bn3(self.conv3(x)))
        x = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def tiny_env(splits, **kwargs):
    """A seeded PruneEnv over a fresh TinyNet with small reward and calibration sets; ``kwargs`` override."""
    from pruning_env.envs.prune_env import PruneEnv

    torch.manual_seed(0)
    defaults = dict(model=TinyNet(), dataset=splits, reward_samples=24, calibration_size=16, seed=0,
                    record_timings=False)
    defaults.update(kwargs)
    return PruneEnv(**defaults)


def tiny_patch_env(splits, **kwargs):
    """A seeded PatchSelectEnv (AgentViT) over a width-0.125, depth-1 SimpleViT: 2 epochs of batch 32, a reward
    every 2 batches, k* = 20, no wall-clock seconds in ``info``; ``kwargs`` override."""
    from pruning_env.envs.patch_env import PatchSelectEnv

    defaults = dict(dataset=splits, width=0.125, depth=1, batch_size=32, epochs=2, reward_every=2, n_keep=20, seed=0,
                    time_info=False)
    defaults.update(kwargs)
    return PatchSelectEnv(**defaults)


def tiny_run_config(splits, agent, budget, agent_kwargs=None, **env):
    """The typed run config (``rl_prune``) of ``agent`` over a fresh seeded TinyNet: small reward and calibration
    sets, a FLOPs budget, accuracy-only reward, ``budget`` evaluations; ``env`` overrides env settings."""
    from rl_prune.config import PruneRunConfig

    torch.manual_seed(0)
    settings = dict(model=TinyNet(), dataset=splits, reward_samples=16, calibration_size=16, record_timings=False,
                    budget="flops", alpha=0.0, beta=0.0)
    settings.update(env)
    return PruneRunConfig(agent=agent, seed=0, device="cpu", budget=budget, env=settings,
                          agents={agent: dict(agent_kwargs or {})})


def tiny_splits():
    """Generated 16x16 images, 10 classes: a quarter of the conftest set's compute."""
    from pruning_env.data import make_synthetic

    return make_synthetic(n_train=160, n_test=32, num_classes=10, image_size=16, seed=0)


def random_actions(n_groups: int, count: int, seed: int = 0):
    """``count`` seeded sparsity actions, each group's value uniform in [0.05, 1)."""
    rng = np.random.default_rng(seed)
    return [rng.uniform(0.05, 1.0, n_groups).astype(np.float32) for _ in range(count)]


def assert_stepped_model_is_the_candidate(env, fresh_env, action, source_state: dict) -> None:
    """After ``env`` stepped ``action``: its model is the pruned candidate itself, bit for bit what a fresh env's
    pruner cuts for that action (an estimator's fine-tune trained a copy), and its source model still holds
    ``source_state``."""
    fresh_env.reset(seed=0)
    built = fresh_env.pruner.apply(fresh_env.pruner.plan(keep=fresh_env.keep_for_action(action)))
    x = env.task.reward_data[0][:8]
    with torch.no_grad():
        torch.testing.assert_close(env.model(x), built.eval()(x), rtol=0, atol=0)
    assert all(torch.equal(v, env.original_model.state_dict()[k]) for k, v in source_state.items())


def state_copy(model: nn.Module) -> dict:
    """A detached copy of ``model``'s state dict (to check later that nothing changed it)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a: dict, b: dict) -> bool:
    """Two state dicts with the same keys and bit-identical tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


#: tiny overrides of the SB3 zoo files so that a couple of dozen timesteps include gradient updates
SB3_SMALL = {
    "ppo": dict(n_steps=8, batch_size=8, n_epochs=2),
    "a2c": dict(n_steps=4),
    "trpo": dict(n_steps=8, batch_size=8),
    "sac": dict(learning_starts=8, batch_size=8, buffer_size=100),
    "td3": dict(learning_starts=8, batch_size=8, buffer_size=100, noise_type="normal", noise_std=0.2),
    "ddpg": dict(learning_starts=8, batch_size=8, buffer_size=100, noise_type="normal", noise_std=0.2),
    # AMC (keyed by agent name: its noise is its own); a warm-up of 2 episodes, then DDPG updates
    "amc": dict(batch_size=8, buffer_episodes=20, warmup=2),
}


class ScriptedEnv(gym.Env):
    """A stand-in PruneEnv whose candidate accuracy comes from ``acc(step, call_in_step, action)``."""

    action_mode = "distribution"
    min_channels = 1
    lookahead_cache = 8

    def __init__(self, acc, n_steps=2):
        self.acc, self.n_steps = acc, n_steps
        self.n_groups = 3
        self.original_channels = np.array([4, 8, 8])
        self.layer_counts = np.array([1, 1, 2])
        self.original_accuracy = 1.0
        self._step, self._evals, self._cache, self._calls = None, 0, {}, 0
        self.model = nn.Identity()

    @property
    def unwrapped(self):
        return self

    @property
    def current_channels(self):
        if self._step is None:
            raise RuntimeError("reset first")
        return self.original_channels.copy()

    @property
    def n_evaluations(self):
        return self._evals

    @property
    def step_index(self):
        return self._step

    def reset(self, seed=None, options=None):
        self._step, self._evals, self._cache, self._calls = 0, 0, {}, 0
        return np.zeros(3, dtype=np.float32), {}

    def _info(self, action):
        key = np.asarray(action, dtype=np.float32).tobytes()
        if key not in self._cache:
            self._calls += 1
            self._evals += 1
            self._cache[key] = float(self.acc(self._step, self._calls, np.asarray(action)))
        acc = self._cache[key]
        return {"accuracy": acc, "reward": acc, "step": self._step + 1, "kept_channels": self.original_channels}

    def evaluate_action(self, action):
        info = self._info(action)
        return info["reward"], info

    def evaluate_actions(self, actions):
        scored = [self.evaluate_action(a) for a in actions]
        return [r for r, _ in scored], [i for _, i in scored]

    def step(self, action):
        info = self._info(action)
        self._step += 1
        self._cache, self._calls = {}, 0
        return np.zeros(3, dtype=np.float32), info["reward"], self._step >= self.n_steps, False, info


# --------------------------------------------------------------------------------------- run layer
class KillAt(BaseCallback):
    """Simulates a kill (Ctrl-C) right after pruning step ``k`` (after that step's checkpoint)."""

    def __init__(self, k):
        super().__init__()
        self.k = k

    def _on_step(self):
        if self.model.num_timesteps == self.k:
            raise KeyboardInterrupt
        return True


#: the train_agent.py config of the run-layer tests (untrained width-0.0625 VGG-11, two-batch fine-tune)
TINY_RUN = {
    "name": "tiny",
    "seed": 0,
    "device": "cpu",
    "agent": "rl_pruner",
    "env": {"model": "vgg11", "dataset": "synthetic", "width": 0.0625, "pretrained": False, "val_size": 32,
            "reward_samples": 32, "calibration_size": 16, "n_steps": 3, "target": 0.4, "budget": "flops",
            "alpha": 0.0, "beta": 0.0, "record_timings": False},
    "agents": {"rl_pruner": {"sample_num": 2, "lr_epoch": 2},
               "random_search": {"n_candidates": 2},
               "ppo": {"n_steps": 4, "batch_size": 4, "n_epochs": 1, "policy_kwargs": {"net_arch": [8]}}},
    "finetune": {"epochs": 1, "max_batches": 2, "batch_size": 16},
    "run": {"progress": False, "export_torchscript": False, "checkpoint_every": 1},
}


def tiny_run(env=None, agents=None, **changes):
    """A fresh copy of :data:`TINY_RUN`: top-level ``changes`` replace keys, ``env`` updates the env section,
    ``agents`` replaces the agents section."""
    cfg = copy.deepcopy(TINY_RUN)
    cfg.update(copy.deepcopy(changes))
    cfg["env"].update(env or {})
    if agents is not None:
        cfg["agents"] = copy.deepcopy(agents)
    return cfg


# ---------------------------------------------------------------------------------- pruning engine
class SqueezeExcite(nn.Module):
    """x * sigmoid(fc2(relu(fc1(avgpool(x)))))."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(reduced, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))


class ConvBN(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: bool = True):
        layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        if act:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class MixedNet(nn.Module):
    """Residual (projection and identity), inverted residual with depthwise + SE, concat, flatten 4x4 -> FC."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = ConvBN(3, 8)
        self.block1_a = ConvBN(8, 12, stride=2)
        self.block1_b = ConvBN(12, 12, act=False)
        self.block1_short = ConvBN(8, 12, k=1, stride=2, act=False)
        self.block2_a = ConvBN(12, 12)
        self.block2_b = ConvBN(12, 12, act=False)
        self.expand = ConvBN(12, 16, k=1)
        self.dw = ConvBN(16, 16, groups=16)
        self.se = SqueezeExcite(16, 4)
        self.project = ConvBN(16, 12, k=1, act=False)
        self.branch1 = nn.Conv2d(12, 6, 1)
        self.branch2 = nn.Conv2d(12, 5, 3, padding=1)
        self.cat_bn = nn.BatchNorm2d(23)
        self.pool = nn.MaxPool2d(2)
        self.head_conv = ConvBN(23, 10)
        self.fc1 = nn.Linear(10 * 4 * 4, 20)
        self.fc_act = nn.ReLU()
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(20, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(self.block1_b(self.block1_a(x)) + self.block1_short(x))
        y = self.block2_b(self.block2_a(x))
        y += x
        x = F.relu(y)
        x = x + self.project(self.se(self.dw(self.expand(x))))
        x = torch.cat([self.branch1(x), self.branch2(x), x], dim=1)
        x = self.pool(F.relu(self.cat_bn(x)))
        x = self.head_conv(x)
        x = torch.flatten(x, 1)  # 10 x 4 x 4: spatial size > 1 before the linear layer
        return self.fc2(self.drop(self.fc_act(self.fc1(x))))


class ChannelShuffleNet(nn.Module):
    """Channel shuffle (view + transpose of the channel dim): the shuffled channels are kept, never mis-pruned."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.conv1(x)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.fc(self.conv2(x).mean((2, 3)))


class ChannelGroupSumNet(nn.Module):
    """Splits a conv's channels into two groups with a view and adds the groups: must be refused."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.conv1(x)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).sum(1)
        return self.fc(self.conv2(x).mean((2, 3)))


class ChannelSliceNet(nn.Module):
    """Takes a slice ``[:, :4]`` of a conv's channels with a literal bound: the channels before it are kept, those
    after it stay prunable (``tests/test_pruning_partitions.py``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.conv1(x)[:, :4]
        return self.fc(self.conv2(x).mean((2, 3)))


def mixed_net(num_classes: int = 10, seed: int = 0) -> MixedNet:
    """A MixedNet in eval mode with non-trivial BatchNorm statistics (so BN slicing errors show)."""
    torch.manual_seed(seed)
    return random_batchnorm(MixedNet(num_classes))


def random_batchnorm(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with BatchNorm statistics and affine parameters drawn from torch's global RNG."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def random_plan(pruner, seed, max_sparsity):
    """A plan from per-group sparsities drawn uniformly in [0, max_sparsity)."""
    rng = np.random.default_rng(seed)
    return pruner.plan(sparsity=rng.uniform(0.0, max_sparsity, pruner.n_groups))


def check_built(model, pruner, x, plan):
    """Build ``plan`` and check shapes, widths, costs (analytic == count_costs) and the re-traced groups."""
    new = pruner.apply(plan)
    size = tuple(x.shape[1:])
    with torch.no_grad():
        y = new(x)
    assert y.shape == model(x).shape
    assert count_costs(new, size) == pruner.plan_cost(plan)
    modules = dict(new.named_modules())
    for g, kept in zip(pruner.groups, plan.kept):
        for member in g.members:
            m = modules[member]
            if attention_handler(m) is not None:  # a head group: its width is the number of heads
                width = attention_handler(m).heads(m)[0]
            else:
                width = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
            assert width == len(kept), member
    # iterative pruning: the child pruner has the same groups with the planned widths and costs ...
    child = pruner.child(new, plan)
    assert child.group_names == pruner.group_names
    assert np.array_equal(child.num_channels, plan.num_kept)
    assert child.plan_cost(keep=child.num_channels) == pruner.plan_cost(plan)
    # ... and so does a fresh trace, unless a depthwise conv is down to one channel or a grouped conv to one
    # conv group (then it looks like a plain conv, which is why child() derives the groups instead of re-tracing)
    if np.all(plan.num_kept > pruner.granularity):
        fresh = Pruner(new, x[:1], prune_normalized=pruner.prune_normalized)
        assert fresh.group_names == pruner.group_names
        assert np.array_equal(fresh.num_channels, plan.num_kept)
    return new


def randomise(model: nn.Module) -> nn.Module:
    """Non-zero biases and BatchNorm statistics, so that a wrong cut shows in the logits."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
            for p in m.parameters(recurse=False):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def hooked_group_costs(model, pruner, input_size):
    """Reference per-group costs by forward hooks on each group's members and followers (one batch-1 pass)."""
    modules = dict(model.named_modules())
    layers = [list(g.members) + list(g.followers) for g in pruner.groups]
    macs = {}
    called = set()  # layers whose forward ran (an attention's projections may be called as modules or not)

    def count(m, args, kwargs, out, n):
        if attention_handler(m) is None:
            called.add(n)
            macs[n] = macs.get(n, 0) + layer_macs(m, out)
            return
        proj_name = attention_handler(m).projections(m)[1]
        if f"{n}.{proj_name}" in called:  # MaxViT: q/k/v and output projections have their own hooks
            macs[n] = macs.get(n, 0) + attention_macs(m, args, kwargs)
            return
        # its output projection (not called as a module) gets its own share, the module the rest (q/k/v, matmuls)
        result = out[0] if isinstance(out, tuple) else out
        if isinstance(m, nn.MultiheadAttention) and not m.batch_first:
            result = result.transpose(0, 1)  # layer_macs reads dim 0 as the batch
        proj_macs = layer_macs(m.get_submodule(proj_name), result)
        macs[f"{n}.{proj_name}"] = macs.get(f"{n}.{proj_name}", 0) + proj_macs
        macs[n] = macs.get(n, 0) + attention_macs(m, args, kwargs) - proj_macs

    attention = {n: m for n, m in modules.items() if attention_handler(m)}
    hooked = ({n for group in layers for n in group if n in modules} | set(attention)
              | {f"{n}.{attention_handler(m).projections(m)[1]}" for n, m in attention.items()})
    handles = [modules[n].register_forward_hook(
        lambda m, args, kwargs, out, n=n: count(m, args, kwargs, out, n), with_kwargs=True) for n in hooked]
    with torch.no_grad():
        model(torch.zeros((1, *input_size)))
    for h in handles:
        h.remove()
    g_macs = np.array([sum(macs.get(n, 0) for n in group) for group in layers], dtype=np.float64)
    # a follower that is no module is a parameter used outside any layer (prune_normalized)
    g_params = np.array([sum(sum(p.numel() for p in modules[n].parameters(recurse=False)) if n in modules
                             else model.get_parameter(n).numel() for n in group)
                         for group in layers], dtype=np.float64)
    return g_macs, g_params


def tiny_swin(v2: bool = False) -> nn.Module:
    from torchvision.models import swin_transformer as swin

    extra = dict(block=swin.SwinTransformerBlockV2, downsample_layer=swin.PatchMergingV2) if v2 else {}
    return swin.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 4],
                                window_size=[2, 2], num_classes=3, **extra)


def tiny_vit() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64,
                             num_classes=3)


def tiny_maxvit() -> nn.Module:
    from torchvision.models.maxvit import MaxVit

    return MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[16, 32],
                  block_layers=[1, 1], head_dim=8, stochastic_depth_prob=0.0, num_classes=3)


def flop_counter_macs(model: nn.Module, x: torch.Tensor) -> int:
    """FlopCounterMode / 2 with autograd on (no fused MHA fast path) and the math attention kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel([SDPBackend.MATH]):
        model(x)
    return counter.get_total_flops() // 2


def n_heads(module: nn.Module) -> int:
    """The head count of an attention module (its handler's view)."""
    return attention_handler(module).heads(module)[0]


def head_groups(pruner):
    """The pruner's groups whose members are attention modules (pruned by whole heads)."""
    return [g for g in pruner.groups if attention_handler(pruner.graph.specs[g.members[0]].module) is not None]


class Attention(nn.Module):
    """timm's ``Attention`` (timm.layers.attention), its forward as written there."""

    def __init__(self, dim, num_heads=4, head_dim=None, qkv_bias=True, qk_norm=False, scale_norm=False,
                 gated=False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim or dim // num_heads
        self.attn_dim = num_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.norm = nn.LayerNorm(self.attn_dim) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim) if gated else None
        self.proj = nn.Linear(self.attn_dim, dim)

    def forward(self, x, attn_mask=None):
        B, N, C = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj(x)


# registered through the extension point, as a user registers their own fused-qkv module
FUSED_QKV_ATTENTION.add(f"{Attention.__module__}.{Attention.__qualname__}")


def check_prunes_like_zeroed(model, pruner, x, build=None):
    """The pruner's 50 % plan and two random plans (up to 90 %) built with ``build`` (default :func:`check_built`)
    give the zeroed original's logits, and those differ from the unpruned model's (the check has teeth)."""
    build = check_built if build is None else build
    for seed in range(3):
        plan = pruner.plan(sparsity=0.5) if seed == 0 else random_plan(pruner, seed, 0.9)
        new = build(model, pruner, x, plan)
        with torch.no_grad():
            ref = zeroed_copy(model, pruner, plan)(x)
            assert torch.allclose(new(x), ref, atol=1e-5, rtol=1e-4), (new(x) - ref).abs().max()
            assert not torch.allclose(ref, model(x), atol=1e-5)
