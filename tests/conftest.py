"""Shared test fixtures: tiny generated data, single-threaded torch, and ``forbid`` (calls that must not happen).

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


@pytest.fixture(scope="module")
def splits():
    """The 16x16 generated dataset of the tiny env and agent tests (``tests/tiny.py``), built once per module."""
    from tiny import tiny_splits

    return tiny_splits()


@pytest.fixture
def forbid(monkeypatch):
    """``forbid("pruning_env.pretrain.pretrain", ...)``: calling any of these functions fails the test (e.g. work that
    must not start before a bad input is refused)."""
    import importlib

    def forbid_calls(*targets: str) -> None:
        for target in targets:
            module, name = target.rsplit(".", 1)

            def refuse(*args, _target=target, **kwargs):
                raise AssertionError(f"{_target} was called before the bad input was refused")

            monkeypatch.setattr(importlib.import_module(module), name, refuse)

    return forbid_calls
