"""Scratch-E (``rl_prune/scratch.py``): a pruned architecture freshly initialised (same structure and MACs, new
weights, seeded), built from a pruned model or from per-group widths, the epoch rule, and one run folder's unit
trained end to end with the pretraining recipe's loop.
"""
import json

import pytest
import torch
import torch.nn as nn
import yaml

from pruning_env.costs import count_costs
from pruning_env.pruning import Pruner
from rl_prune.run_folder import RunFolder
from rl_prune.scratch import reinitialize, scratch_epochs, scratch_from_widths, scratch_model, train_scratch
from tiny import TinyNet

EXAMPLE = torch.zeros(1, 3, 16, 16)
KEEP = [6, 10, 8]


@pytest.fixture
def pruned():
    """TinyNet trained a few steps (BN statistics moved), then cut to KEEP channels by the engine."""
    torch.manual_seed(0)
    net = TinyNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(3):
        x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    pruner = Pruner(net.eval(), EXAMPLE)
    pruner.compute_importance(criterion="l1")
    return pruner.apply(pruner.plan(keep=KEEP)).eval()


def shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_the_scratch_model_has_the_pruned_architecture_and_fresh_weights(pruned):
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    scratch = scratch_model(pruned, seed=0)
    assert [type(m) for m in scratch.modules()] == [type(m) for m in pruned.modules()]
    assert shapes(scratch) == shapes(pruned)
    a, b = count_costs(scratch, (3, 16, 16)), count_costs(pruned, (3, 16, 16))
    assert (a.macs, a.params) == (b.macs, b.params)
    new = scratch.state_dict()
    for name, p in pruned.named_parameters():  # every weight and bias re-drawn (BN's affine reset to 1 / 0)
        assert not torch.equal(new[name], p), name
    for name, m in scratch.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.running_mean, torch.zeros_like(m.running_mean)), name
            assert torch.equal(m.running_var, torch.ones_like(m.running_var)), name
            assert int(m.num_batches_tracked) == 0
    assert all(torch.equal(before[k], v) for k, v in pruned.state_dict().items())  # the pruned model is untouched
    assert scratch.training and scratch.scratch_of["seed"] == 0
    assert scratch.eval()(EXAMPLE).shape == (1, 10)


def test_the_initialisation_is_seeded_and_leaves_the_global_rng_alone(pruned):
    state = torch.get_rng_state()
    a, b, c = scratch_model(pruned, 3), scratch_model(pruned, 3), scratch_model(pruned, 4)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    assert any(not torch.equal(a.state_dict()[k], v) for k, v in c.state_dict().items() if v.is_floating_point()
               and k.endswith("weight"))


def test_from_widths_builds_the_same_architecture_as_the_pruned_model(pruned):
    torch.manual_seed(1)
    scratch = scratch_from_widths(TinyNet(), KEEP, EXAMPLE, seed=0)
    assert shapes(scratch) == shapes(pruned)
    a, b = count_costs(scratch, (3, 16, 16)), count_costs(pruned, (3, 16, 16))
    assert (a.macs, a.params) == (b.macs, b.params)
    # the same seed gives the same weights whether built from the widths or from the pruned model
    ref = scratch_model(pruned, seed=0).state_dict()
    assert all(torch.equal(ref[k], v) for k, v in scratch.state_dict().items())


@pytest.mark.parametrize("keep", [[6, 10], [6, 17, 8], [0, 10, 8], [6, 9.5, 8]])
def test_from_widths_refuses_bad_widths(keep):
    with pytest.raises(ValueError, match="keep must give 1..width channels"):
        scratch_from_widths(TinyNet(), keep, EXAMPLE, seed=0)


def test_a_layer_without_an_initialiser_is_refused_before_anything_changes():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.gain = nn.Parameter(torch.full((4,), 2.0))

        def forward(self, x):
            return self.conv(x) * self.gain[:, None, None]

    net = Scaled()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=r"cannot re-initialise the model \(Scaled\).*no reset_parameters"):
        reinitialize(net, 0)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_the_epoch_rule():
    assert scratch_epochs(100, 15) == 115
    assert scratch_epochs(10, 0) == 10
    with pytest.raises(ValueError, match="0 epochs"):
        scratch_epochs(0, 0)
    with pytest.raises(ValueError, match="finetune_epochs must be a whole number"):
        scratch_epochs(100, 1.5)


# ------------------------------------------------------------------------------------------------ a run's unit

def test_a_run_folder_is_trained_from_scratch_for_pretraining_plus_finetune_epochs(tmp_path, forbid):
    from pruning_env.checkpoint import load_model
    from pruning_env.pretrain import main as pretrain_main
    from rl_prune.cli import train_main

    base = tmp_path / "vgg11_synthetic.pt"
    assert pretrain_main(["--model", "vgg11", "--width", "0.0625", "--dataset", "synthetic", "--recipe",
                          "small_data", "--epochs", "2", "--batch-size", "32", "--val-size", "32", "--seed", "0",
                          "--device", "cpu", "--out", str(base)]) == 0
    cfg = {"name": "tiny", "seed": 0, "device": "cpu", "agent": "uniform",
           "env": {"model": "vgg11", "dataset": "synthetic", "width": 0.0625, "checkpoint": str(base),
                   "reward_samples": 16, "calibration_size": 16, "n_steps": 1, "target": 0.5, "budget": "flops",
                   "record_timings": False},
           "finetune": {"epochs": 1, "max_batches": 2, "batch_size": 16},
           "run": {"progress": False, "export_torchscript": False, "out_dir": str(tmp_path / "runs")}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert train_main(["--config", str(path), "--name", "u"]) == 0
    run_dir = tmp_path / "runs" / "u"
    metrics = RunFolder(run_dir).read_metrics()

    summary = train_scratch(run_dir, seed=0, progress=False)
    sc = summary["scratch"]
    assert sc["epochs"] == 3 == len(summary["log"])  # 2 pretraining epochs (the base's recipe) + 1 fine-tune epoch
    assert sc["epoch_rule"].startswith("pretraining 2") and sc["epoch_rule"].endswith("= 3")
    assert summary["recipe"]["name"] == "small_data" and summary["recipe"]["epochs"] == 3
    assert sc["macs"] == metrics["pruned"]["macs"] and sc["params"] == metrics["pruned"]["params"]
    assert sc["kept_channels"] == metrics["kept_channels"]
    out = run_dir / "scratch_e_seed0.pt"
    model = load_model(out)
    pruned = torch.load(run_dir / "pruned_model.pt", weights_only=False)
    assert shapes(model) == shapes(pruned)
    assert 0.0 <= summary["test_top1"] <= 1.0 and json.loads(out.with_suffix(".json").read_text()) == summary
    # a finished unit is not trained again
    forbid("pruning_env.pretrain.train_recipe")
    assert train_scratch(run_dir, seed=0, progress=False) == summary


def test_an_unfinished_run_is_refused(tmp_path):
    (tmp_path / "r").mkdir()
    with pytest.raises(FileNotFoundError, match="did not finish"):
        train_scratch(tmp_path / "r", progress=False)
