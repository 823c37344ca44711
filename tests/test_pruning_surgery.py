"""Physical removal: random per-group sparsities build working models whose costs match the analytic plan,
pruning equals zeroing the same channels, the source is untouched, and Torch-Pruning agrees on the costs.
"""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pruning_env.costs import count_costs
from pruning_env.pruning import Pruner, PrunePlan, zeroed_copy
from tiny import check_built, mixed_net, random_plan


def _torchvision(name):
    if name == "googlenet":
        return torchvision.models.googlenet(num_classes=10, aux_logits=False, init_weights=False)
    return getattr(torchvision.models, name)(num_classes=10)


BUILDERS = {
    "mixed": (lambda: mixed_net(), (3, 16, 16)),
    "resnet18": (lambda: _torchvision("resnet18"), (3, 32, 32)),
    "mobilenet_v3_small": (lambda: _torchvision("mobilenet_v3_small"), (3, 32, 32)),
    "densenet121": (lambda: _torchvision("densenet121"), (3, 32, 32)),
    "googlenet": (lambda: _torchvision("googlenet"), (3, 32, 32)),
}
_CACHE = {}


def _setup(name):
    """(model, pruner with l1 importance, input) built once per model for the whole module."""
    if name not in _CACHE:
        build, size = BUILDERS[name]
        torch.manual_seed(0)
        model = build().eval()
        x = torch.randn(2, *size)
        pruner = Pruner(model, x[:1])
        pruner.compute_importance(criterion="l1")
        _CACHE[name] = (model, pruner, x)
    return _CACHE[name]


@pytest.mark.parametrize("name", list(BUILDERS))
@settings(max_examples=4, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1), max_sparsity=st.floats(0.0, 1.0))
def test_random_sparsity_gives_consistent_model(name, seed, max_sparsity):
    model, pruner, x = _setup(name)
    check_built(model, pruner, x, random_plan(pruner, seed, max_sparsity))


@pytest.mark.parametrize("name", list(BUILDERS))
def test_pruning_equals_zeroing_the_same_channels(name):
    model, pruner, x = _setup(name)
    for seed in range(2):
        plan = random_plan(pruner, seed, 0.8)
        new = pruner.apply(plan)
        with torch.no_grad():
            expected = zeroed_copy(model, pruner, plan)(x)
            got = new(x)
        assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()


@pytest.mark.parametrize("name", list(BUILDERS))
def test_zero_sparsity_reproduces_the_source(name):
    model, pruner, x = _setup(name)
    plan = pruner.plan(sparsity=0.0)
    new = pruner.apply(plan)
    with torch.no_grad():
        assert torch.equal(new(x), model(x))
    assert pruner.plan_cost(plan) == count_costs(model, tuple(x.shape[1:]))


def test_source_untouched_and_no_shared_tensors():
    model, pruner, x = _setup("mixed")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    new = pruner.apply(random_plan(pruner, 3, 0.6))
    for p in new.parameters():
        p.data.add_(1.0)  # training the pruned model must never move the source
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    src = {t.data_ptr() for t in model.state_dict().values()}
    assert not src & {t.data_ptr() for t in new.state_dict().values()}
    assert type(new) is type(model) and type(new.se) is type(model.se)


def test_min_channels_and_round_to():
    model, _, x = _setup("mixed")
    p = Pruner(model, x[:1], min_channels=2, round_to=4)
    p.compute_importance(criterion="l2")
    counts = p.keep_counts(np.full(p.n_groups, 1.0))
    assert np.all(counts == np.minimum(4, p.num_channels))  # rounding to 4 beats the floor of 2
    p = Pruner(model, x[:1], min_channels=3)
    assert np.all(p.keep_counts(1.0) == np.minimum(3, p.num_channels))
    half = p.num_channels - np.floor(p.num_channels * 0.5 + 0.5)  # removed = round(s * width)
    assert np.array_equal(p.keep_counts(0.5), np.maximum(half, 3))
    p.compute_importance(criterion="l1")
    plan = p.plan(keep=np.full(p.n_groups, 5))
    assert np.array_equal(plan.num_kept, np.minimum(np.maximum(5, 3), p.num_channels))
    with pytest.raises(ValueError, match="one entry per group"):
        p.keep_counts([0.5, 0.5])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        p.keep_counts(1.5)


def test_plan_keeps_the_most_important_channels():
    model, pruner, x = _setup("mixed")
    plan = pruner.plan(sparsity=0.5)
    for imp, kept in zip(pruner.importance, plan.kept):
        removed = np.setdiff1d(np.arange(len(imp)), kept)
        if len(removed):
            assert imp[kept].min() >= imp[removed].max()


def test_plan_needs_importance_and_validates_indices():
    model, _, x = _setup("mixed")
    p = Pruner(model, x[:1])
    with pytest.raises(RuntimeError, match="compute_importance"):
        p.plan(sparsity=0.5)
    bad = PrunePlan(tuple(np.array([0, 0]) for _ in range(p.n_groups)))
    with pytest.raises(ValueError, match="sorted, unique"):
        p.apply(bad)
    explicit = PrunePlan.from_indices([[n - 1] for n in p.num_channels])
    assert p.apply(explicit)(x).isfinite().all()


def test_pruned_model_saves_and_reloads_without_the_source(tmp_path):
    from pruning_env.checkpoint import load_model

    model, pruner, x = _setup("mixed")
    model.zoo_config = {"name": "mixed"}
    try:
        new = pruner.apply(random_plan(pruner, 5, 0.7))
    finally:
        del model.zoo_config
    assert not hasattr(new, "zoo_config") and new.pruned_from == {"name": "mixed"}
    path = tmp_path / "pruned.pt"
    torch.save(new, path)
    loaded = torch.load(path, weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(x), new(x))
        assert torch.equal(load_model(path)(x), new(x))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_pruned_torchvision_model_stays_scriptable():
    model, pruner, x = _setup("resnet18")
    new = pruner.apply(random_plan(pruner, 1, 0.5))
    scripted = torch.jit.script(new)
    with torch.no_grad():
        assert torch.allclose(scripted(x), new(x), atol=1e-5)


@pytest.mark.parametrize("name", ["mixed", "resnet18", "mobilenet_v3_small", "googlenet"])
def test_torch_pruning_agrees_on_costs(name):
    tp = pytest.importorskip("torch_pruning")
    model, pruner, x = _setup(name)
    plan = random_plan(pruner, 11, 0.7)
    ours = pruner.apply(plan)
    theirs = copy.deepcopy(model)
    dg = tp.DependencyGraph().build_dependency(theirs, example_inputs=x[:1])
    modules = dict(theirs.named_modules())
    for g, kept in zip(pruner.groups, plan.kept):
        removed = np.setdiff1d(np.arange(g.num_channels), kept).tolist()
        if not removed:
            continue
        layer = modules[g.members[0]]
        fn = tp.prune_linear_out_channels if isinstance(layer, nn.Linear) else tp.prune_conv_out_channels
        group = dg.get_pruning_group(layer, fn, idxs=removed)
        group.prune()
    size = tuple(x.shape[1:])
    assert count_costs(theirs, size) == count_costs(ours, size) == pruner.plan_cost(plan)
    with torch.no_grad():
        assert torch.allclose(theirs(x), ours(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["mixed", "mobilenet_v3_small"])
def test_one_channel_per_group_and_child_pruner(name):
    model, pruner, x = _setup(name)
    plan = pruner.plan(keep=np.ones(pruner.n_groups))
    new = check_built(model, pruner, x, plan)  # depthwise convs are down to one channel here
    child = pruner.child(new, plan)
    child.compute_importance(criterion="l1")
    assert count_costs(child.apply(child.plan(sparsity=0.5)), tuple(x.shape[1:])) == pruner.plan_cost(plan)
    with pytest.raises(ValueError, match="does not match"):
        pruner.child(model, plan)  # the unpruned model does not have the plan's widths


def test_a_forward_bound_in_init_runs_the_pruned_copy():
    """timm FasterNet's ``Partial_conv3`` binds ``self.forward = self.forward_split_cat`` in ``__init__``: the pruned
    copy must call its own (pruned) layers, not the source's (it crashed at the first forward)."""
    import torch.nn.functional as F
    from pruning_env.pruning import zeroed_copy

    class Partial(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.forward = self.forward_split_cat

        def forward_split_cat(self, x):
            a, b = torch.split(x, [4, 12], dim=1)
            return torch.cat([self.conv(a), b], 1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, padding=1)
            self.mix = Partial()
            self.fc1 = nn.Conv2d(16, 8, 1)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(F.relu(self.fc1(self.mix(self.stem(x)))).mean((2, 3)))

    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 3, 6, 6)
    pruner = Pruner(model, x[:1])
    assert "mix.conv" in pruner.group_names
    pruner.compute_importance(criterion="l1")
    plan = pruner.plan(sparsity=0.5)
    new = pruner.apply(plan)
    assert new.mix.forward.__self__ is new.mix and new.mix.conv.out_channels == 2
    with torch.no_grad():
        assert torch.allclose(new(x), zeroed_copy(model, pruner, plan)(x), atol=1e-5)
