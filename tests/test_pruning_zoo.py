"""Every CNN of the model zoo prunes consistently (costs, shapes, prune == zero); the ViT is refused clearly.

Zoo models are built at width 0.125 so the whole file runs in seconds.
"""
import pytest
import torch

from pruning_env.pruning import Pruner, UnsupportedModelError
from test_pruning_nets import check_built, random_plan, zeroed_copy


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


def test_vit_is_refused_with_a_clear_error():
    from pruning_env.models import create_model, list_models
    names = list_models("vit*")
    if not names:
        pytest.skip("no ViT registered in the zoo")
    model = create_model(names[0], num_classes=10, width=0.125).eval()
    with pytest.raises(UnsupportedModelError, match="no prunable channel group.*token-wise linear"):
        Pruner(model, torch.randn(1, 3, 32, 32))
