"""Model zoo: every CIFAR CNN builds, maps 32x32 images to logits, scales with width and rebuilds from zoo_config;
the cost model agrees with torch's FlopCounterMode on each of them, and ResNet-56 has its published size.
"""
from collections import Counter

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from pruning_env.costs import Cost, Reductions, count_costs, reductions
from pruning_env.models import create_model, list_models
from pruning_env.models.mobilenetv3 import LARGE_CFG, SMALL_CFG

CNN_NAMES = [n for n in list_models() if not n.startswith("vit")]


def test_every_family_is_registered():
    expected = {"vgg11", "vgg13", "vgg16", "vgg19", "resnet20", "resnet32", "resnet56", "resnet110",
                "googlenet", "densenet121", "mobilenetv3_large", "mobilenetv3_small"}
    assert expected <= set(CNN_NAMES)


@pytest.mark.parametrize("name", CNN_NAMES)
def test_forward_gives_one_logit_row_per_image(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, width=0.0625)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)  # train mode: BatchNorm1d and dropout must cope with a batch of 2
    assert out.shape == (2, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    with torch.no_grad():
        assert torch.isfinite(model.eval()(x)).all()


@pytest.mark.parametrize("name", CNN_NAMES)
def test_every_leaf_module_runs_exactly_once(name):
    # the pruning tracer (spec §4.1) needs one call per module instance and no module built in forward
    model = create_model(name, num_classes=10, width=0.0625).eval()
    calls = Counter()
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    handles = [m.register_forward_hook(lambda mod, i, o, n=n: calls.update([n])) for n, m in leaves]
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    for h in handles:
        h.remove()
    counted = {n: calls[n] for n, m in leaves if not isinstance(m, nn.Identity)}
    assert all(c == 1 for c in counted.values()), {n: c for n, c in counted.items() if c != 1}


@pytest.mark.parametrize("name", CNN_NAMES)
def test_width_scales_every_hidden_layer(name):
    small = create_model(name, num_classes=10, width=0.0625)
    large = create_model(name, num_classes=10, width=0.125)
    n_small = sum(p.numel() for p in small.parameters())
    n_large = sum(p.numel() for p in large.parameters())
    # most weights are products of two hidden widths, so doubling the width roughly quadruples them
    assert 2.5 * n_small < n_large
    # width changes channel counts only, never the topology
    layers_small = [(n, type(m)) for n, m in small.named_modules()]
    assert layers_small == [(n, type(m)) for n, m in large.named_modules()]
    convs_large = dict(large.named_modules())
    for n, m in small.named_modules():
        if isinstance(m, nn.Conv2d):
            assert m.out_channels <= convs_large[n].out_channels, n


@pytest.mark.parametrize("name", ["vgg11", "resnet20", "googlenet", "densenet121", "mobilenetv3_small"])
def test_tiny_width_keeps_at_least_one_channel(name):
    model = create_model(name, num_classes=3, width=0.001).eval()
    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert min(widths) >= 1
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_unknown_model_name_lists_known_models():
    with pytest.raises(ValueError, match="unknown model 'resnet57'.*resnet56"):
        create_model("resnet57")


def test_unknown_kwarg_is_rejected_by_name():
    with pytest.raises(TypeError, match="no_such_option"):
        create_model("vgg11", width=0.0625, no_such_option=1)


def test_resnet_depth_must_be_6n_plus_2():
    from pruning_env.models.resnet import CifarResNet

    with pytest.raises(ValueError, match="6n\\+2.*got 57"):
        CifarResNet(57)


@pytest.mark.parametrize("name,kwargs", [("vgg13", {"dropout": 0.1}), ("resnet32", {}),
                                         ("mobilenetv3_large", {"original_strides": True})])
def test_zoo_config_rebuilds_the_same_architecture(name, kwargs):
    model = create_model(name, num_classes=5, width=0.125, **kwargs)
    assert model.zoo_config == {"name": name, "num_classes": 5, "width": 0.125, **kwargs}
    again = create_model(**model.zoo_config)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert shapes == {k: v.shape for k, v in again.state_dict().items()}
    again.load_state_dict(model.state_dict())


def test_resnet56_cifar100_has_published_size():
    # He et al. 2016 report 0.85 M for ResNet-56 (CIFAR-10, option A); option B and 100 classes give 0.862 M
    model = create_model("resnet56", num_classes=100)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(0.862e6, rel=0.005)
    cost = count_costs(model)
    assert cost.macs == pytest.approx(126.8e6, rel=0.01)
    assert cost.params == pytest.approx(0.862e6, rel=0.005)


@pytest.mark.parametrize("name", CNN_NAMES)
def test_cost_model_matches_flop_counter(name):
    model = create_model(name, num_classes=10, width=0.125).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    flops = counter.get_total_flops()
    assert flops > 0
    assert 2 * count_costs(model, include_norm=False).macs == pytest.approx(flops, rel=1e-9)
    # BatchNorm (2 MACs per output element) is the only extra the default count adds
    bn_elements = []
    hooks = [m.register_forward_hook(lambda mod, i, o: bn_elements.append(o[0].numel()))
             for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert count_costs(model).macs == flops // 2 + 2 * sum(bn_elements)


def test_reductions_are_fractions_removed():
    original = Cost(macs=1000, params=400)
    assert reductions(Cost(macs=250, params=300), original) == Reductions(flops=0.75, params=0.25)
    assert reductions(original, original) == Reductions(flops=0.0, params=0.0)
    assert Cost(macs=3, params=1).flops == 6
    with pytest.raises(TypeError, match="two Cost values"):
        reductions((250, 300), original)


def test_mobilenetv3_tables_chain_and_cifar_strides_end_at_4x4():
    for cfg in (LARGE_CFG, SMALL_CFG):
        assert cfg[0][1] == 16  # the stem's width
        assert all(row[1] == prev[3] for prev, row in zip(cfg, cfg[1:]))
    for name in ("mobilenetv3_large", "mobilenetv3_small"):
        for original, side in ((False, 4), (True, 1)):
            model = create_model(name, width=0.125, original_strides=original).eval()
            seen = []
            model.conv2.register_forward_hook(lambda mod, i, o: seen.append(o.shape[-1]))
            with torch.no_grad():
                model(torch.zeros(1, 3, 32, 32))
            assert seen == [side]
