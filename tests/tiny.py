"""The three-group network and the 16x16 generated dataset that the env and agent tests share.

conv1 | conv2+conv3 (closed by a residual add: one group of two layers) | fc1 | classifier; a step costs a few ms.
"""
import torch
import torch.nn as nn


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


def tiny_splits():
    """Generated 16x16 images, 10 classes: a quarter of the conftest set's compute."""
    from pruning_env.data import make_synthetic

    return make_synthetic(n_train=160, n_test=32, num_classes=10, image_size=16, seed=0)


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
