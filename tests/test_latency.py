"""The latency cost model: table interpolation, the op fit, the on-disk cache and its key, prediction from kept counts
without building a model, and clear errors for settings that cannot be measured. No timing is ever asserted.
"""
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

from pruning_env.costs import latency as latency_mod
from pruning_env.costs.latency import LatencyModel, LatencySetting, interpolate_table, measure_latency
from pruning_env.pruning import Pruner, PrunePlan, UnsupportedModelError
from tiny import TinyNet

# the smallest build that still exercises every part: 3 points per width, one round, few calibration blocks
FAST = dict(grid=(0.5, 1.0), rounds=1, calibration=(1.0, 0.5), calibration_random=1, calibration_rounds=1,
            progress=False)


def _pruner(seed: int = 0) -> Pruner:
    torch.manual_seed(seed)
    return Pruner(TinyNet().eval(), torch.randn(1, 3, 16, 16))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A TinyNet pruner, its latency model at batch 1 and the cache folder it was written to."""
    cache = tmp_path_factory.mktemp("latency_cache")
    pruner = _pruner()
    model = LatencyModel.build(pruner, LatencySetting(batch_size=1), cache=cache, **FAST)
    return pruner, model, cache


# ---- interpolation ---------------------------------------------------------------------------------------------
def test_interpolation_is_exact_at_grid_points_and_between_neighbours():
    rng = np.random.default_rng(0)
    ga, gb = np.array([1.0, 4.0, 9.0, 16.0]), np.array([2.0, 3.0, 8.0])
    table = rng.uniform(0.1, 1.0, (4, 3))
    for i, a in enumerate(ga):
        for j, b in enumerate(gb):
            assert interpolate_table(ga, gb, table, np.array(a), np.array(b)) == pytest.approx(table[i, j])
    # anywhere inside a cell the value lies within the cell's four corners
    ua, ub = rng.uniform(1, 16, 200), rng.uniform(2, 8, 200)
    values = interpolate_table(ga, gb, table, ua, ub)
    ia = np.searchsorted(ga, ua, side="right") - 1
    ib = np.searchsorted(gb, ub, side="right") - 1
    for v, i, j in zip(values, np.minimum(ia, 2), np.minimum(ib, 1)):
        corners = table[i:i + 2, j:j + 2]
        assert corners.min() - 1e-12 <= v <= corners.max() + 1e-12
    # a table increasing along both axes gives values increasing along each axis
    mono = np.cumsum(np.cumsum(rng.uniform(0.01, 1.0, (4, 3)), 0), 1)
    line = np.linspace(1, 16, 300)
    assert np.all(np.diff(interpolate_table(ga, gb, mono, line, np.full(300, 5.0))) >= -1e-12)
    assert np.all(np.diff(interpolate_table(ga, gb, mono, np.full(300, 7.0), np.linspace(2, 8, 300))) >= -1e-12)
    # one-point axis: constant along it; outside the grid: clamped to the edge
    one = interpolate_table(ga, np.array([0.0]), table[:, :1], np.array([4.0, 4.0]), np.array([0.0, 99.0]))
    assert one[0] == one[1] == pytest.approx(table[1, 0])
    assert interpolate_table(ga, gb, table, np.array(0.0), np.array(2.0)) == pytest.approx(table[0, 0])


def test_model_predictions_equal_the_tables_at_grid_points(built):
    pruner, model, _ = built
    widths = pruner.num_channels
    checked = 0
    for i, table in enumerate(model.tables):
        if len(table.axes) != 2 or any(len(ax) != 1 for ax in table.axes):
            continue
        (ga_group, wa), = table.axes[0].items()
        (gb_group, wb), = table.axes[1].items()
        for a, ua in enumerate(table.grid_a):
            for b, ub in enumerate(table.grid_b):
                keep = widths.copy()
                keep[ga_group], keep[gb_group] = int(round(ua / wa)), int(round(ub / wb))
                assert model.op_latencies(keep)[i] == pytest.approx(table.table[a, b], rel=1e-12)
                checked += 1
    assert checked >= 9  # TinyNet's conv2 and fc1 read one group and write another
    # the vectorised path equals the public one-table interpolation for random kept counts
    rng = np.random.default_rng(1)
    keeps = np.stack([rng.integers(1, widths + 1) for _ in range(20)])
    ops = model.op_latencies(keeps)
    for i, t in enumerate(model.tables):
        ua = keeps @ model._w[0][i]
        ub = keeps @ model._w[1][i]
        np.testing.assert_allclose(ops[:, i], interpolate_table(t.grid_a, t.grid_b, t.table, ua, ub), rtol=1e-12)


# ---- the op fit ------------------------------------------------------------------------------------------------
def test_every_op_of_the_forward_pass_is_modelled(built):
    pruner, model, _ = built
    names = [t.name for t in model.tables]
    # convs, norms, activations, the residual add, pooling, flatten and the linears: the whole forward pass
    for fragment in ("conv2d", "batch_norm", "relu", "add", "adaptive_avg_pool2d", "flatten", "linear"):
        assert any(fragment in n for n in names), fragment
    conv2 = [t for t in model.tables if "conv2d" in t.name][1]
    assert [sorted(ax) for ax in conv2.axes] == [[0], [1]]  # reads group 0, writes the residual group 1
    # the classifier's output width never changes: its table follows its input only
    assert len(model.tables[-1].axes) == 1


class _ConcatNet(nn.Module):
    """Two branches concatenated and read by one conv: that conv's input axis holds two groups."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 1)
        self.c = nn.Conv2d(10, 8, 3, padding=1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1)
        return self.fc(torch.relu(self.c(x)).mean((2, 3)))


def test_an_op_reading_several_groups_gets_a_multi_group_axis():
    torch.manual_seed(0)
    pruner = Pruner(_ConcatNet().eval(), torch.randn(1, 3, 8, 8))
    model = LatencyModel.build(pruner, LatencySetting(), cache=False, **FAST)
    conv_c = [t for t in model.tables if "conv2d" in t.name][2]
    assert sorted(conv_c.axes[0]) == [0, 1] and list(conv_c.axes[1]) == [2]
    i = model.tables.index(conv_c)
    full = pruner.num_channels
    assert model.op_latencies(full)[i] == pytest.approx(conv_c.table[-1, -1])
    narrow = np.ones_like(full)
    assert model.op_latencies(narrow)[i] == pytest.approx(conv_c.table[0, 0])
    assert np.all(np.isfinite(model.predict(np.stack([full, narrow]))))


class _ItemNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        scale = float(x.abs().max())  # data-dependent (of the input image): cannot run on shapes alone
        x = torch.relu(self.conv(x * scale))
        return self.fc(x.mean((2, 3)))


def test_a_data_dependent_forward_is_refused_clearly(tmp_path):
    pruner = Pruner(_ItemNet().eval(), torch.randn(1, 3, 8, 8))
    with pytest.raises(UnsupportedModelError, match="meta tensors"):
        LatencyModel.build(pruner, LatencySetting(), cache=tmp_path, **FAST)


# ---- prediction without building a model ---------------------------------------------------------------------
def test_prediction_from_keep_builds_no_model(built, monkeypatch, tmp_path):
    pruner, model, _ = built

    def no_build(*args, **kwargs):
        raise AssertionError("a prediction must not build a model")

    monkeypatch.setattr(Pruner, "apply", no_build)
    monkeypatch.setattr(nn.Module, "__call__", no_build)
    widths = pruner.num_channels
    assert model.predict(widths) == pytest.approx(model.original)
    batch = np.stack([widths, np.maximum(1, widths // 2), np.ones_like(widths)])
    out = model.predict(batch)
    assert out.shape == (3,) and np.all(np.isfinite(out))
    plan = PrunePlan.from_indices([range(int(k)) for k in batch[1]])
    assert model.predict_plan(plan) == pytest.approx(out[1])
    # a saved model predicts the same without any pruner
    path = model.save(tmp_path / "table.json")
    again = LatencyModel.load(path)
    np.testing.assert_allclose(again.predict(batch), out, rtol=1e-12)
    assert again.setting == model.setting and again.scale == model.scale and again.offset == model.offset


def test_prediction_rejects_bad_keep(built):
    pruner, model, _ = built
    widths = pruner.num_channels
    with pytest.raises(ValueError, match="one entry per group"):
        model.predict(widths[:-1])
    with pytest.raises(ValueError, match=r"\[1, width\]"):
        model.predict(widths + 1)
    with pytest.raises(ValueError, match=r"\[1, width\]"):
        model.predict(np.zeros_like(widths))
    with pytest.raises(ValueError, match="whole channel counts"):
        model.predict(widths - 0.5)


# ---- the cache -------------------------------------------------------------------------------------------------
def _count_measurements(monkeypatch):
    calls = []
    real = latency_mod._measure_tables

    def counting(*args, **kwargs):
        calls.append(args[3])  # the setting
        return real(*args, **kwargs)

    monkeypatch.setattr(latency_mod, "_measure_tables", counting)
    return calls


def test_same_setting_is_a_cache_hit_without_measuring(built, monkeypatch):
    pruner, model, cache = built
    calls = _count_measurements(monkeypatch)
    again = LatencyModel.build(pruner, LatencySetting(batch_size=1), cache=cache, **FAST)
    assert again.from_cache and calls == []
    np.testing.assert_allclose(again.predict(pruner.num_channels), model.predict(pruner.num_channels))
    # the same architecture with other weights is the same table
    other = _pruner(seed=1)
    assert LatencyModel.build(other, LatencySetting(batch_size=1), cache=cache, **FAST).from_cache
    assert calls == []


def test_batch_size_or_threads_change_is_another_table(built, monkeypatch):
    pruner, model, cache = built
    key = model.meta["key"]
    assert LatencyModel.cache_key(pruner, LatencySetting(batch_size=1), **_key_args())["digest"] == key["digest"]
    assert LatencyModel.cache_key(pruner, LatencySetting(batch_size=4), **_key_args())["digest"] != key["digest"]
    if (os.cpu_count() or 1) >= 2:
        assert LatencyModel.cache_key(pruner, LatencySetting(threads=2), **_key_args())["digest"] != key["digest"]
    for other in (LatencySetting(channels_last=True), LatencySetting(dtype="bfloat16")):
        assert LatencyModel.cache_key(pruner, other, **_key_args())["digest"] != key["digest"]
    # another architecture (a narrower TinyNet) is another table too
    narrow = pruner.apply(PrunePlan.from_indices([range(int(k) // 2) for k in pruner.num_channels]))
    assert LatencyModel.cache_key(Pruner(narrow, pruner.example_input), LatencySetting(), **_key_args())[
        "digest"] != key["digest"]
    calls = _count_measurements(monkeypatch)
    bigger = LatencyModel.build(pruner, LatencySetting(batch_size=4), cache=cache, **FAST)
    assert not bigger.from_cache and [s.batch_size for s in calls] == [4]
    assert len(list(cache.glob("*.json"))) == 2
    assert LatencyModel.build(pruner, LatencySetting(batch_size=4), cache=cache, **FAST).from_cache
    assert len(calls) == 1


def _key_args():
    return dict(grid=FAST["grid"], rounds=FAST["rounds"],
                calibration=(*FAST["calibration"], FAST["calibration_random"]))


def test_channels_last_setting_builds(tmp_path):
    model = LatencyModel.build(_pruner(), LatencySetting(channels_last=True), cache=False, **FAST)
    assert np.isfinite(model.original) and model.setting.tag.endswith("-cl")


# ---- settings that cannot be measured --------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(threads=0), "threads must be an integer >= 1"),
    (dict(threads=1.5), "threads must be an integer >= 1"),
    (dict(threads=10_000), "exceeds the"),
    (dict(batch_size=0), "batch_size must be an integer >= 1"),
    (dict(dtype="int8"), "dtype='int8' is not supported"),
    (dict(device="tpu"), "device='tpu'"),
    (dict(device="mps"), "only 'cpu' and 'cuda"),
    (dict(channels_last="yes"), "channels_last must be true or false"),
])
def test_bad_settings_are_refused_clearly(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LatencySetting(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error(tmp_path):
    setting = LatencySetting(device="cuda")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        LatencyModel.build(_pruner(), setting, cache=tmp_path, **FAST)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        measure_latency([TinyNet()], (3, 16, 16), setting)


def test_thread_clock_needs_one_cpu_thread():
    assert LatencySetting().resolve_clock() == "thread"
    if (os.cpu_count() or 1) >= 2:
        assert LatencySetting(threads=2).resolve_clock() == "wall"
        with pytest.raises(ValueError, match="clock='thread'"):
            LatencySetting(threads=2).resolve_clock("thread")
    with pytest.raises(ValueError, match="clock must be one of"):
        LatencySetting().resolve_clock("tsc")


def test_measure_latency_times_every_model_and_restores_modes():
    models = [TinyNet().train(), TinyNet().eval()]
    out = measure_latency(models, (3, 16, 16), LatencySetting(batch_size=2), rounds=2, min_block_s=0.001,
                          progress=False)
    assert out.shape == (2,) and np.all(np.isfinite(out)) and np.all(out > 0)
    assert models[0].training and not models[1].training
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        measure_latency(models, (3, 16, 16), LatencySetting(), rounds=0)
    with pytest.raises(ValueError, match="warmup must be >= 0"):
        measure_latency(models, (3, 16, 16), LatencySetting(), warmup=-1)


def test_measure_latency_rounds_gives_every_rounds_sample():
    """The per-round samples that measure_latency takes the median of (evaluate.py's p90 comes from them)."""
    from pruning_env.costs.latency import measure_latency_rounds

    models = [TinyNet().eval(), TinyNet().eval()]
    samples = measure_latency_rounds(models, (3, 16, 16), LatencySetting(), rounds=3, min_block_s=0.001,
                                     progress=False, warmup=2)
    assert samples.shape == (3, 2) and np.all(np.isfinite(samples)) and np.all(samples > 0)
