"""Tests of evaluate.py (rl_prune.evaluation, rl_prune.cli) and pruning_env.export on a tiny run folder built here
(VGG-11 width 0.0625 on the generated ``synthetic`` set, half its channels pruned): report contents, exports checked
against the module, errors.
"""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pruning_env.checkpoint import save_checkpoint
from pruning_env.costs import count_costs
from pruning_env.data import make_synthetic
from pruning_env.export import EXPORT_HINT, export_onnx, export_torchscript, max_abs_diff, quiet_jit
from pruning_env.models import create_model
from pruning_env.pruning import Pruner
from pruning_env.runtime import atomic_save
from rl_prune import evaluation
from rl_prune.cli import evaluate_main

FAST = ["--repeats", "2", "--warmup", "1", "--max-test", "64", "--batch-size", "32", "--no-progress"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder laid out as train_agent.py writes it (whole modules, metrics.json with the data settings)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("runs") / "tiny"
    original = create_model("vgg11", num_classes=10, width=0.0625).eval()
    pruner = Pruner(original, torch.randn(1, 3, 32, 32))
    pruner.compute_importance(criterion="l1")
    pruned = pruner.apply(pruner.plan(sparsity=np.full(len(pruner.groups), 0.5))).eval()
    atomic_save(original, folder / "original_model.pt")
    atomic_save(pruned, folder / "pruned_model.pt")
    metrics = {"name": "tiny", "seed": 0, "dataset": "synthetic", "input_size": [3, 32, 32],
               "data": {"dataset": "synthetic", "data_root": "data", "val_size": 26, "split_seed": 0}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


@pytest.fixture(scope="module")
def report(run_dir):
    assert evaluate_main([str(run_dir), *FAST, "--export", "torchscript", "--device", "cpu"]) == 0
    return json.loads((run_dir / "evaluation.json").read_text())


def test_run_folder_report(run_dir, report):
    original = torch.load(run_dir / "original_model.pt", weights_only=False)
    pruned = torch.load(run_dir / "pruned_model.pt", weights_only=False)
    o, p, r = report["original"], report["pruned"], report["ratios"]
    assert o["macs"] == count_costs(original).macs and p["macs"] == count_costs(pruned).macs
    assert o["params"] == count_costs(original).params and p["params"] == count_costs(pruned).params
    assert p["macs"] < o["macs"] and p["params"] < o["params"]
    assert r["macs"] == pytest.approx(p["macs"] / o["macs"])
    assert r["speedup_theoretical"] == pytest.approx(o["macs"] / p["macs"])
    assert r["top1_delta"] == pytest.approx(p["top1"] - o["top1"])
    for entry, name in ((o, "original_model.pt"), (p, "pruned_model.pt")):
        assert 0.0 <= entry["top1"] <= entry["top5"] <= 1.0
        assert entry["n_test"] == 64 and report["data"]["n_test"] == 64
        assert entry["file_mb"] == pytest.approx((run_dir / name).stat().st_size / 1e6) and entry["file_mb"] > 0
        speed = entry["speed"]["cpu"]
        assert speed["latency_ms_median"] > 0 and speed["latency_ms_p90"] >= speed["latency_ms_median"]
        assert speed["throughput_ips"] > 0 and speed["batch_size"] == 32 and speed["repeats"] == 2
        assert speed["clock"] == ("thread" if speed["threads"] == 1 else "wall") and speed["warmup"] == 1
    assert p["file_mb"] < o["file_mb"]
    assert set(r["speedup"]) == {"cpu"} and r["speedup"]["cpu"]["latency"] > 0
    assert report["data"]["dataset"] == "synthetic" and report["input_size"] == [3, 32, 32]
    assert report["machine"]["torch"] == torch.__version__
    md = (run_dir / "evaluation.md").read_text()
    assert "| test top-1 |" in md and "CPU latency, batch 1, median" in md and "TorchScript (script)" in md
    assert "torch.utils.benchmark.Timer" in md and "interleaved in 2 rounds" in md


def test_speed_rows_come_from_the_projects_interleaved_timer(monkeypatch):
    """Both models are timed in one ``measure_latency_rounds`` call per batch size (interleaved rounds, the
    setting's clock); the rows are the statistics of its per-round samples."""
    calls = []
    samples = {1: np.array([[2e-3, 1e-3], [4e-3, 3e-3], [3e-3, 2e-3]]),
               8: np.array([[0.2, 0.1], [0.1, 0.05], [0.3, 0.2]])}

    def fake(models, input_size, setting, rounds=10, seed=0, warmup=0, **kw):
        calls.append((len(models), setting.batch_size, setting.threads, rounds, warmup))
        return samples[setting.batch_size]

    monkeypatch.setattr(evaluation, "measure_latency_rounds", fake)
    models = [create_model("vgg11", num_classes=10, width=0.0625) for _ in range(2)]
    o, p = evaluation.measure_speed(models, (3, 32, 32), torch.device("cpu"), batch_size=8, repeats=3, warmup=4,
                                    threads=1, progress=False)
    assert calls == [(2, 1, 1, 3, 4), (2, 8, 1, 3, 4)]
    assert o["latency_ms_median"] == pytest.approx(3.0) and p["latency_ms_median"] == pytest.approx(2.0)
    assert o["latency_ms_p90"] == pytest.approx(np.percentile([2.0, 4.0, 3.0], 90))
    assert o["latency_ms_mean"] == pytest.approx(3.0) and o["clock"] == "thread"
    assert o["batch_ms_median"] == pytest.approx(200.0) and o["throughput_ips"] == pytest.approx(8 / 0.2)
    assert p["throughput_ips"] == pytest.approx(8 / 0.1) and p["repeats"] == 3 and p["batch_size"] == 8


def test_timing_with_more_threads_than_cores_is_a_clear_error():
    import os

    model = create_model("vgg11", num_classes=10, width=0.0625)
    with pytest.raises(evaluation.EvaluationError, match="cannot time the models on cpu.*exceeds"):
        evaluation.measure_speed([model], (3, 32, 32), torch.device("cpu"), batch_size=2, repeats=1,
                                 threads=(os.cpu_count() or 1) + 1, progress=False)


def test_accuracy_matches_training_evaluate(run_dir, report):
    """The test-split numbers are pruning_env.training.evaluate on the run's split, repeatably."""
    from pruning_env.data import preload
    from pruning_env.training import evaluate as evaluate_model

    splits = make_synthetic(val_size=26, seed=0)
    x, y = preload(splits.test, n=64, seed=0)
    pruned = torch.load(run_dir / "pruned_model.pt", weights_only=False)
    assert report["pruned"]["top1"] == pytest.approx(evaluate_model(pruned, (x, y))["top1"])


def test_torchscript_export_in_report(run_dir, report):
    ts = report["exports"]["torchscript"]
    assert Path(ts["path"]) == run_dir / "pruned_model.ts" and ts["method"] == "script" and ts["file_mb"] > 0
    assert ts["max_abs_diff"] <= 1e-4
    pruned = torch.load(run_dir / "pruned_model.pt", weights_only=False)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad(), quiet_jit():
        torch.testing.assert_close(torch.jit.load(ts["path"])(x), pruned(x), atol=1e-4, rtol=1e-4)


def test_explicit_models_onnx_export(run_dir, tmp_path):
    """--original/--pruned/--dataset mode (a zoo checkpoint as the original) with an ONNX export."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    original = torch.load(run_dir / "original_model.pt", weights_only=False)
    save_checkpoint(original, tmp_path / "zoo.pt")
    out = tmp_path / "eval"
    assert evaluate_main(["--original", str(tmp_path / "zoo.pt"), "--pruned", str(run_dir / "pruned_model.pt"),
                          "--dataset", "synthetic", "--out", str(out), "--no-latency", "--export", "onnx",
                          *FAST]) == 0
    report = json.loads((out / "evaluation.json").read_text())
    assert report["run_dir"] is None and report["original"]["speed"] == {} and report["ratios"]["speedup"] == {}
    onnx_entry = report["exports"]["onnx"]
    assert Path(onnx_entry["path"]) == out / "pruned_model.onnx" and onnx_entry["max_abs_diff"] <= 1e-4
    assert sorted(p.name for p in out.iterdir()) == ["evaluation.json", "evaluation.md", "pruned_model.onnx"]

    from pruning_env.export import onnx_session

    pruned = torch.load(run_dir / "pruned_model.pt", weights_only=False)
    x = torch.randn(5, 3, 32, 32)  # a batch size the export never saw: the batch dim is dynamic
    with torch.no_grad():
        np.testing.assert_allclose(onnx_session(onnx_entry["path"])(x), pruned(x).numpy(), atol=1e-4, rtol=1e-4)


def test_onnx_legacy_fallback(run_dir, tmp_path, monkeypatch):
    """When the dynamo exporter fails, the legacy exporter is used and still checked."""
    pytest.importorskip("onnxruntime")
    real_export = torch.onnx.export

    def dynamo_fails(*args, **kwargs):
        if kwargs.get("dynamo", True):
            raise RuntimeError("simulated torch.export failure")
        return real_export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_fails)
    pruned = torch.load(run_dir / "pruned_model.pt", weights_only=False)
    outcome = export_onnx(pruned, torch.randn(4, 3, 32, 32), tmp_path / "m.onnx")
    assert outcome.exporter == "legacy" and outcome.max_abs_diff <= 1e-4
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_onnx_missing_dependency_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` raise ImportError
    with pytest.raises(ImportError, match="onnxruntime") as err:
        export_onnx(create_model("vgg11", num_classes=10, width=0.0625), torch.randn(2, 3, 32, 32),
                    tmp_path / "m.onnx")
    assert EXPORT_HINT in str(err.value) and not (tmp_path / "m.onnx").exists()


def test_export_torchscript_checks_and_leaves_model(tmp_path):
    model = create_model("vgg11", num_classes=10, width=0.0625).train()
    x = torch.randn(2, 3, 32, 32)
    assert export_torchscript(model, x, tmp_path / "m.ts") == "script"
    assert model.training  # a copy was exported
    with quiet_jit():
        assert max_abs_diff(model, torch.jit.load(str(tmp_path / "m.ts")), x) <= 1e-5
    assert [p.name for p in tmp_path.iterdir()] == ["m.ts"]


def test_unfaithful_export_is_rejected(tmp_path, monkeypatch):
    """A file whose outputs differ from the module's is not kept."""
    model = create_model("vgg11", num_classes=10, width=0.0625).eval()
    real_load = torch.jit.load

    def corrupted_load(*args, **kwargs):
        loaded = real_load(*args, **kwargs)
        with torch.no_grad():
            next(iter(loaded.parameters())).add_(1.0)
        return loaded

    monkeypatch.setattr(torch.jit, "load", corrupted_load)
    with pytest.raises(RuntimeError, match="differ"):
        export_torchscript(model, torch.randn(2, 3, 32, 32), tmp_path / "m.ts")
    assert list(tmp_path.iterdir()) == []


def test_errors_name_the_path_and_the_fix(tmp_path, run_dir):
    with pytest.raises(SystemExit, match=r"run folder not found: .*nope.*python train_agent.py"):
        evaluate_main([str(tmp_path / "nope")])
    half = tmp_path / "half"
    half.mkdir()
    (half / "original_model.pt").write_bytes((run_dir / "original_model.pt").read_bytes())
    with pytest.raises(SystemExit, match=r"pruned model not found: .*pruned_model.pt.*--resume"):
        evaluate_main([str(half)])
    with pytest.raises(SystemExit, match=r"--pruned model not found: .*missing.pt"):
        evaluate_main(["--original", str(run_dir / "original_model.pt"), "--pruned", str(tmp_path / "missing.pt"),
                       "--dataset", "synthetic"])
    with pytest.raises(SystemExit, match=r"npz.*not found.*--data-root"):
        evaluate_main([str(run_dir), "--dataset", f"npz:{tmp_path / 'absent.npz'}", "--out", str(tmp_path)])


def test_wrong_dataset_is_named(run_dir, tmp_path, monkeypatch):
    """Models with 10 outputs evaluated on a 3-class dataset: the error names the model file and --dataset."""
    monkeypatch.setattr(evaluation, "make_datasets",
                        lambda name, **kw: make_synthetic(num_classes=3, val_size=kw["val_size"], seed=kw["seed"]))
    with pytest.raises(SystemExit, match=r"original_model.pt predicts 10 classes .* has 3.*--dataset"):
        evaluate_main([str(run_dir), "--out", str(tmp_path), *FAST])
