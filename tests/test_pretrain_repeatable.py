"""Pretraining repeats bit for bit on the CPU: a benchmark's base checkpoint, lost with a machine, is rebuilt by its
documented command and checked against the weights hash its results record."""
import torch

from pruning_env.checkpoint import load_model
from pruning_env.pretrain import pretrain
from rl_prune.run_folder import weights_hash


def _train(tmp_path, name: str, seed: int) -> str:
    out = tmp_path / f"{name}.pt"
    with torch.random.fork_rng(devices=[]):
        pretrain("vgg11", "synthetic", width=0.125, epochs=2, val_size=64, seed=seed, device="cpu",
                 recipe="small_data", out=out, progress=False)
    return weights_hash(load_model(out))


def test_the_same_command_gives_the_same_bytes_and_another_seed_does_not(tmp_path):
    first = _train(tmp_path, "a", seed=3)
    assert _train(tmp_path, "b", seed=3) == first
    assert _train(tmp_path, "c", seed=4) != first
