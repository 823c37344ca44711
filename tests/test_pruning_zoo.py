"""Every CNN of the model zoo prunes consistently (costs, shapes, prune == zero); the ViT's MLP hidden widths too.

Zoo models are built at width 0.125 so the whole file runs in seconds.
"""
import numpy as np
import pytest
import torch
import torch.nn as nn

from pruning_env.pruning import Pruner, UnsupportedModelError, zeroed_copy
from tiny import check_built, hooked_group_costs, random_plan


def _zoo_names():
    from pruning_env.models import list_models

    return [n for n in list_models() if not n.startswith("vit")]


@pytest.mark.parametrize("name", _zoo_names())
def test_zoo_models_prune_consistently(name):
    from pruning_env.models import create_model

    torch.manual_seed(0)
    model = create_model(name, num_classes=10, width=0.125).eval()
    x = torch.randn(2, 3, 32, 32)
    pruner = Pruner(model, x[:1])
    assert pruner.n_groups > 0
    pruner.compute_importance(criterion="l1")
    for seed in range(2):
        plan = random_plan(pruner, seed, 0.9)
        new = check_built(model, pruner, x, plan)
        with torch.no_grad():
            assert torch.allclose(new(x), zeroed_copy(model, pruner, plan)(x), atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        assert torch.equal(pruner.apply(pruner.plan(sparsity=0.0))(x), model(x))


def test_vit_prunes_its_mlp_hidden_width_only():
    """Issue 15: the ViT's MLP hidden widths are groups; attention (opaque) and the LayerNorm-ed embedding stay."""
    from pruning_env.models import create_model, list_models
    names = list_models("vit*")
    if not names:
        pytest.skip("no ViT registered in the zoo")
    torch.manual_seed(0)
    model = create_model(names[0], num_classes=10, width=0.125).eval()
    x = torch.randn(2, 3, 32, 32)
    pruner = Pruner(model, x[:1])
    assert [(g.members, g.consumers) for g in pruner.groups] == [
        ((f"blocks.{i}.ff.net.1",), (f"blocks.{i}.ff.net.3",)) for i in range(len(model.blocks))]
    pruner.compute_importance(criterion="l1")
    plan = random_plan(pruner, 0, 0.9)
    new = check_built(model, pruner, x, plan)
    with torch.no_grad():
        assert torch.allclose(new(x), zeroed_copy(model, pruner, plan)(x), atol=1e-5, rtol=1e-5)


def test_a_model_without_prunable_channels_is_refused_with_a_clear_error():
    net = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 3))
    with pytest.raises(UnsupportedModelError, match="no prunable channel group.*LayerNorm"):
        Pruner(net, torch.randn(1, 8))

@pytest.mark.parametrize("name", ["vgg11", "resnet56", "googlenet", "densenet121", "mobilenetv3_small"])
def test_group_costs_equal_a_hook_count(name):
    """Pruner.group_costs (analytic) equals hooks on the group's layers, before and after pruning."""
    from pruning_env.models import create_model

    torch.manual_seed(0)
    model = create_model(name, num_classes=10, width=0.125).eval()
    pruner = Pruner(model, torch.randn(1, 3, 32, 32))
    macs, params = pruner.group_costs()
    assert macs.dtype == params.dtype == np.float64 and macs.shape == params.shape == (pruner.n_groups,)
    ref_macs, ref_params = hooked_group_costs(model, pruner, (3, 32, 32))
    np.testing.assert_array_equal(macs, ref_macs)
    np.testing.assert_array_equal(params, ref_params)
    assert np.all(macs > 0) and np.all(params > 0)
    pruner.compute_importance(criterion="l1")
    plan = random_plan(pruner, 0, 0.9)
    pruned = pruner.apply(plan)
    child = pruner.child(pruned, plan)
    np.testing.assert_array_equal(np.stack(child.group_costs()),
                                  np.stack(hooked_group_costs(pruned, child, (3, 32, 32))))


def test_group_importance_is_the_mean_absolute_score():
    from pruning_env.models import create_model

    torch.manual_seed(0)
    pruner = Pruner(create_model("vgg11", num_classes=10, width=0.125).eval(), torch.randn(1, 3, 32, 32))
    np.testing.assert_array_equal(pruner.group_importance(), np.zeros(pruner.n_groups))
    scores = pruner.compute_importance(criterion="l1")
    expected = np.array([np.abs(s).mean() for s in scores])
    np.testing.assert_allclose(pruner.group_importance(), expected, rtol=1e-12)
    pruner.importance[0][0] = np.nan  # non-finite scores are skipped, not propagated
    assert pruner.group_importance()[0] == pytest.approx(np.abs(scores[0][1:]).mean())
