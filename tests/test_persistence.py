"""Tests of the one persistence format (pruning_env.persistence): model checkpoints, agent files, run checkpoints and
the pretraining resume file share it, one read_meta reads all of them, and every file of an earlier layout still
loads (each written here exactly as the earlier code wrote it).
"""
import contextlib
import io
import json
import time
import zipfile

import numpy as np
import pytest
import torch

from agents.common import save_util
from agents.common.base import BasePruningAgent
from agents.heuristics import UniformPruner
from pruning_env import checkpoint, persistence
from pruning_env.checkpoint import load_model, read_meta, save_checkpoint
from pruning_env.models import create_model
from pruning_env.persistence import load_parts, read_header, save_parts
from pruning_env.runtime import atomic_save
from rl_prune.run_folder import CHECKPOINT_KIND, CHECKPOINT_VERSION, RunFolder
from tiny import TinyNet, tiny_env


def _old_zip_writer(path, kind, version, data, files=None, info=None):
    """The writer of agents/common/save_util.py before the format moved to pruning_env (agent files, run
    checkpoints): a stored zip with meta.json, data.pt and files/*."""
    meta = {"format": "rl-prune", "kind": kind, "version": version, "saved_at": time.time(),
            "libraries": {"python": "3.11.7", "torch": torch.__version__}, "info": dict(info or {})}
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("meta.json", json.dumps(meta, indent=2))
        with archive.open("data.pt", "w", force_zip64=True) as f:
            torch.save(data, f)
        for name, blob in (files or {}).items():
            archive.writestr("files/" + name, bytes(blob))
    return path


def _same_outputs(a, b):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        return torch.allclose(a.eval()(x), b.eval()(x))


def test_one_read_meta():
    assert checkpoint.read_meta is persistence.read_meta is save_util.read_meta
    assert save_util.save_parts is persistence.save_parts and save_util.load_parts is persistence.load_parts


def test_model_checkpoint_is_in_the_format(tmp_path):
    model = create_model("vgg11", num_classes=10, width=0.0625)
    path = save_checkpoint(model, tmp_path / "m.pt", dataset="synthetic", val_top1=np.float32(0.5),
                           val_size=np.int64(26), recipe={"name": "small_data", "head": None})
    header = read_header(path)
    assert (header["format"], header["kind"], header["version"]) == ("rl-prune", "model", checkpoint.MODEL_VERSION)
    assert read_meta(path) == {"dataset": "synthetic", "val_top1": 0.5, "val_size": 26,
                               "recipe": {"name": "small_data", "head": None}}
    assert _same_outputs(model, load_model(path))
    with pytest.raises(TypeError, match="info.bad must be JSON-serialisable"):
        save_checkpoint(model, tmp_path / "x.pt", bad=object())


@pytest.mark.parametrize("layout", ["zoo", "module"])
def test_model_checkpoint_of_the_earlier_layout_loads(tmp_path, layout):
    """The torch dict tagged rl-prune/1 that pruning_env.checkpoint.save_checkpoint wrote before, byte for byte
    its code: ``atomic_save({"format": "rl-prune/1", "meta": meta, kind...}, path)``."""
    model = create_model("vgg11", num_classes=10, width=0.0625)
    meta = {"dataset": "digits", "epoch": 3, "val_top1": 0.9, "seed": 1, "val_size": 300}
    payload = {"format": "rl-prune/1", "meta": meta}
    if layout == "zoo":
        payload.update(kind="zoo", zoo_config=dict(model.zoo_config), state_dict=model.state_dict())
    else:
        payload.update(kind="module", module=model)
    path = atomic_save(payload, tmp_path / "old.pt")
    assert _same_outputs(model, load_model(path))
    assert read_meta(path) == meta
    header = read_header(path)
    assert header["kind"] == "model" and header["version"] == persistence.LEGACY_VERSION
    assert header["legacy"] == "rl-prune/1"


def test_whole_module_files_load_as_models(tmp_path):
    """Run folders keep torch.save(module) files (pruned_model.pt); TorchScript files load too."""
    model = TinyNet().eval()
    raw = atomic_save(model, tmp_path / "pruned_model.pt")
    assert _same_outputs(model, load_model(raw)) and read_meta(raw) == {}
    assert read_header(raw)["kind"] == "module"
    ts = tmp_path / "m.ts"
    torch.jit.save(torch.jit.script(model), str(ts))
    assert _same_outputs(model, load_model(ts))


def test_wrong_kind_and_version_are_named(tmp_path):
    model = create_model("vgg11", num_classes=10, width=0.0625)
    future = save_parts(tmp_path / "future.pt", "model", checkpoint.MODEL_VERSION + 1,
                        {"kind": "zoo", "zoo_config": dict(model.zoo_config), "state_dict": model.state_dict()})
    with pytest.raises(ValueError, match=r"future.pt is a model checkpoint of version 2; this code reads version 1"):
        load_model(future)
    agent_file = save_parts(tmp_path / "agent.pt", "agent", 1, {"class": "x:Y"})
    with pytest.raises(ValueError, match=r"agent.pt holds a 'agent' file, not a model"):
        load_model(agent_file)
    ckpt = save_checkpoint(model, tmp_path / "model.pt")
    with pytest.raises(ValueError, match=r"model.pt holds a 'model' file, expected a 'agent' file"):
        BasePruningAgent.load(ckpt)
    old = atomic_save({"a": 1}, tmp_path / "dict.pt")
    with pytest.raises(ValueError, match=r"dict.pt is not an 'rl-prune' file"):
        load_parts(old, "agent", 1)
    with pytest.raises(ValueError, match=r"dict.pt holds a dict that is no file of this project"):
        load_model(old)
    with pytest.raises(FileNotFoundError, match="nope.pt not found"):
        read_meta(tmp_path / "nope.pt")


def test_agent_file_of_the_earlier_writer_loads(splits, tmp_path):
    env = tiny_env(splits, action_mode="sparsity", budget="flops", target=0.3, n_steps=1)
    agent = UniformPruner(env)
    agent.learn()
    saved = agent.save(tmp_path / "new.pt")
    parts = load_parts(saved, save_util.AGENT_KIND, save_util.AGENT_VERSION)
    old = _old_zip_writer(tmp_path / "old.pt", "agent", 1, parts.data, info={"class": parts.data["class"]})
    loaded = BasePruningAgent.load(old)
    assert isinstance(loaded, UniformPruner) and loaded.history == agent.history
    assert read_meta(old) == {"class": "agents.heuristics:UniformPruner"}


def test_run_checkpoint_of_the_earlier_writer_loads(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    data = {"phase": "search", "agent_name": "uniform", "config": {"seed": 0}, "timesteps": 2,
            "agent_state": {"x": np.arange(3)}, "rng": {}}
    _old_zip_writer(folder.file(RunFolder.CHECKPOINT), CHECKPOINT_KIND, CHECKPOINT_VERSION, data,
                    info={"phase": "search", "agent": "uniform", "timesteps": 2})
    ckpt = folder.read_checkpoint()
    assert ckpt.phase == "search" and ckpt.timesteps == 2 and ckpt.agent_state["x"].tolist() == [0, 1, 2]


@pytest.mark.parametrize("layout", ["current", "earlier"])
def test_pretraining_resumes_from_its_state_file(tmp_path, layout, monkeypatch):
    """A pretraining killed after epoch 1 resumes to the uninterrupted result, from a resume file in the format
    or in the earlier layout (a plain ``atomic_save`` of the same dict)."""
    import pruning_env.pretrain as pt

    common = dict(model="vgg11", width=0.0625, dataset="synthetic", batch_size=64, lr=0.05, device="cpu",
                  progress=False, seed=0, epochs=2)
    full = pt.pretrain(out=tmp_path / "full.pt", **common)
    part = tmp_path / "part.pt"
    calls = {"n": 0}
    original = pt.evaluate

    def dying_evaluate(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the validation pass of epoch 2
            raise KeyboardInterrupt
        return original(*a, **k)

    monkeypatch.setattr(pt, "evaluate", dying_evaluate)
    with pytest.raises(KeyboardInterrupt):
        pt.pretrain(out=part, **common)
    monkeypatch.setattr(pt, "evaluate", original)
    state = part.with_name(part.name + ".state")
    header = read_header(state)
    assert (header["kind"], header["version"], header["info"]["epoch"]) == (pt.RESUME_KIND, pt.RESUME_VERSION, 1)
    if layout == "earlier":
        atomic_save(load_parts(state, pt.RESUME_KIND, pt.RESUME_VERSION).data, state)
        assert read_header(state)["version"] == persistence.LEGACY_VERSION
    pt.pretrain(out=part, resume=True, **common)
    a, b = load_model(full).state_dict(), load_model(part).state_dict()
    assert list(a) == list(b) and all(torch.allclose(a[k].float(), b[k].float()) for k in a)


def test_a_damaged_resume_file_is_named(tmp_path):
    from pruning_env.pretrain import main

    out = tmp_path / "ck.pt"
    state = out.with_name(out.name + ".state")
    save_parts(state, "agent", 1, {})
    args = ["--model", "vgg11", "--width", "0.0625", "--dataset", "synthetic", "--epochs", "1", "--device", "cpu",
            "--out", str(out), "--resume"]
    buffer = io.StringIO()
    with contextlib.redirect_stderr(buffer):
        assert main(args) == 2
    assert f"{state} holds a 'agent' file, expected a 'pretrain-state' file" in buffer.getvalue()
