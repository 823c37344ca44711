"""evaluate.py's latency in the run's setting: the run folder records the env's latency device setting (and the
predicted latencies when the env built a latency model), evaluate reads it back and reports the predicted latency
beside the latency measured in that same setting (threads, batch size, dtype, memory format). Timings are never
asserted, only that they exist and that the predictions are the run's table's.

Each run is an untrained width-0.0625 VGG-11 on generated images, a tiny table grid and a two-batch fine-tune.
"""
import copy
import json
import shutil

import numpy as np
import pytest
import torch

from pruning_env.costs import LatencyModel, LatencySetting
from pruning_env.pruning import Pruner
from rl_prune.cli import evaluate_main
from rl_prune.config import load_config
from rl_prune.pipeline import run
from rl_prune.run_folder import RunFolder

FAST = ["--repeats", "2", "--warmup", "1", "--max-test", "32", "--batch-size", "32", "--no-progress",
        "--device", "cpu", "--latency-rounds", "2"]
GRID = (0.5, 1.0)
TARGET = 0.1


def _config(tmp, cache, **env):
    return load_config(data={
        "name": "tiny", "seed": 0, "device": "cpu", "agent": "uniform",
        "env": {"model": "vgg11", "dataset": "synthetic", "width": 0.0625, "pretrained": False, "val_size": 32,
                "reward_samples": 32, "calibration_size": 16, "n_steps": 1, "target": 0.3, "alpha": 0.0,
                "beta": 0.0, "record_timings": False, "latency_grid": list(GRID), "latency_cache": str(cache),
                **env},
        "finetune": {"epochs": 1, "max_batches": 2, "batch_size": 16},
        "run": {"progress": False, "export_torchscript": False, "out_dir": str(tmp / "runs")},
    })


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("latency_cache")


@pytest.fixture(scope="module")
def latency_run(tmp_path_factory, cache):
    """A run whose budget is predicted latency, in a non-default setting (batch 2)."""
    tmp = tmp_path_factory.mktemp("latency_run")
    cfg = _config(tmp, cache, budget="latency", target_metric="latency", target=_target(cache),
                  latency_batch_size=2)
    run(cfg, run_dir=tmp / "runs" / "lat")
    return tmp / "runs" / "lat"


def _target(cache) -> float:
    """TARGET, or half of what every group at its floor removes on this machine when that is less: the tiny
    net's latency is mostly per-op overhead, and how much of it goes with the channels is the machine's (from
    about a quarter to under a tenth). The table measured here is the run's (the same cache key)."""
    from pruning_env.envs.budget import channel_floor
    from pruning_env.envs.prune_env import PruneEnv
    env = PruneEnv(**_config(cache, cache, budget="flops", target_metric="flops", gamma=1.0,
                             latency_batch_size=2).env_kwargs("uniform"))
    most = env.meter.latency_reduction(channel_floor(env._probe.keep_counts, env.original_channels))
    env.close()
    assert most > 0, "the tiny net's predicted latency does not fall when every group is at its floor"
    return min(TARGET, round(0.5 * most, 3))


@pytest.fixture(scope="module")
def flops_run(tmp_path_factory, cache):
    """A run with a FLOPs budget: the env builds no latency model, the default setting is still recorded."""
    tmp = tmp_path_factory.mktemp("flops_run")
    run(_config(tmp, cache, budget="flops", target_metric="flops"), run_dir=tmp / "runs" / "flops")
    return tmp / "runs" / "flops"


def _table(run_dir, metrics):
    """The run's latency table, rebuilt from its record (a cache hit: the run measured it)."""
    record = metrics["latency"]
    original = torch.load(run_dir / "original_model.pt", weights_only=False)
    pruner = Pruner(copy.deepcopy(original), torch.zeros(1, *metrics["input_size"]))
    return LatencyModel.build(pruner, LatencySetting(**record["setting"]), cache=record["cache"],
                              grid=tuple(record["grid"]), progress=False)


def test_run_folder_records_the_latency_setting_and_predictions(latency_run, cache):
    metrics = RunFolder(latency_run).read_metrics()
    record = metrics["latency"]
    assert record["setting"] == {"device": "cpu", "threads": 1, "batch_size": 2, "dtype": "float32",
                                 "channels_last": False}
    assert record["grid"] == list(GRID) and record["cache"] == str(cache)
    assert record["pruner"] == {"ignore_layers": [], "min_channels": 1, "round_to": 1, "prune_normalized": False}
    assert metrics["target_metric"] == "latency" and metrics["gamma"] == 0.0
    table = _table(latency_run, metrics)
    assert table.from_cache  # the run's own table: the same key
    predicted = record["predicted"]
    assert predicted["original_s"] == pytest.approx(table.original)
    assert predicted["pruned_s"] == pytest.approx(float(table.predict(np.asarray(metrics["kept_channels"]))))
    assert predicted["reduction"] == pytest.approx(1.0 - predicted["pruned_s"] / predicted["original_s"])
    # the budget was met in predicted latency (within 40 % of the target: 0.04 at the usual 0.1)
    assert predicted["reduction"] == pytest.approx(metrics["target"], abs=0.4 * metrics["target"])


def test_evaluate_reports_predicted_beside_measured_in_the_run_setting(latency_run):
    assert evaluate_main([str(latency_run), *FAST]) == 0
    report = json.loads((latency_run / "evaluation.json").read_text())
    lat = report["run_setting_latency"]
    metrics = RunFolder(latency_run).read_metrics()
    assert lat["setting"] == metrics["latency"]["setting"] and lat["tag"] == "cpu-t1-b2-float32"
    assert lat["clock"] == "thread" and lat["rounds"] == 2
    assert lat["measured_s"]["original"] > 0 and lat["measured_s"]["pruned"] > 0
    assert lat["measured_speedup"] == pytest.approx(lat["measured_s"]["original"] / lat["measured_s"]["pruned"])
    assert lat["predicted_s"] == {"original": pytest.approx(metrics["latency"]["predicted"]["original_s"]),
                                  "pruned": pytest.approx(metrics["latency"]["predicted"]["pruned_s"])}
    assert lat["table"]["from_cache"]
    for role in ("original", "pruned"):
        assert lat["error"][role] == pytest.approx(lat["predicted_s"][role] / lat["measured_s"][role] - 1.0)
    md = (latency_run / "evaluation.md").read_text()
    assert "Latency in the run's setting `cpu-t1-b2-float32`" in md
    assert "| predicted (latency model) |" in md and "| measured |" in md


def test_a_run_without_a_latency_model_is_measured_and_predicted_on_request(flops_run):
    metrics = RunFolder(flops_run).read_metrics()
    assert metrics["latency"]["predicted"] is None
    assert metrics["latency"]["setting"]["batch_size"] == 1  # the env's default setting, recorded all the same
    assert evaluate_main([str(flops_run), *FAST]) == 0
    lat = json.loads((flops_run / "evaluation.json").read_text())["run_setting_latency"]
    assert lat["measured_s"]["pruned"] > 0 and lat["predicted_s"] is None and "--latency-model build" in lat["note"]
    assert evaluate_main([str(flops_run), *FAST, "--latency-model", "build"]) == 0
    lat = json.loads((flops_run / "evaluation.json").read_text())["run_setting_latency"]
    table = _table(flops_run, metrics)
    assert lat["predicted_s"]["pruned"] == pytest.approx(float(table.predict(np.asarray(metrics["kept_channels"]))))
    assert evaluate_main([str(flops_run), *FAST, "--latency-model", "off"]) == 0
    assert json.loads((flops_run / "evaluation.json").read_text())["run_setting_latency"] is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_setting_this_machine_cannot_measure_is_named(flops_run, tmp_path):
    folder = tmp_path / "cuda_run"
    shutil.copytree(flops_run, folder)
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics["latency"]["setting"]["device"] = "cuda"
    (folder / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(SystemExit, match="CUDA is not available.*--latency-model off"):
        evaluate_main([str(folder), *FAST])
    assert evaluate_main([str(folder), *FAST, "--latency-model", "off"]) == 0


def test_groups_of_another_model_are_refused(flops_run, tmp_path):
    folder = tmp_path / "other_groups"
    shutil.copytree(flops_run, folder)
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics["group_names"] = ["a", "b"]
    (folder / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(SystemExit, match="channel groups .* are not the run's"):
        evaluate_main([str(folder), *FAST, "--latency-model", "build"])


def test_runs_written_before_the_record_have_no_latency_section(flops_run, tmp_path):
    folder = tmp_path / "old_run"
    shutil.copytree(flops_run, folder)
    metrics = json.loads((folder / "metrics.json").read_text())
    del metrics["latency"]
    (folder / "metrics.json").write_text(json.dumps(metrics))
    assert RunFolder(folder).latency_info() is None
    assert evaluate_main([str(folder), *FAST]) == 0
    assert json.loads((folder / "evaluation.json").read_text())["run_setting_latency"] is None
