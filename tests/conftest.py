"""Shared test fixtures: tiny generated data, single-threaded torch, and an isolated working folder.

Nothing here downloads anything; ../shared data is never required.
"""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def synthetic_splits():
    """A tiny learnable 10-class dataset (230 train / 26 val / 64 test images, 32x32x3)."""
    from pruning_env.data import make_synthetic

    return make_synthetic(n_train=256, n_test=64, num_classes=10, seed=0)
