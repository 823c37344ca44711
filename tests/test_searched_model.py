"""The run folder keeps every agent's searched model (issue 20 item 3, issue 24 item 6): kept-channel indices per
group in the source model's numbering plus structure / weight hashes (``searched_model.zip``), rebuilt from the
source model and checked by ``RunFolder.read_searched_model``; ``finetune_searched`` fine-tunes it as the run did.

The env tests use the tiny net (tests/tiny.py); the pipeline runs use the untrained width-0.0625 VGG-11 on
generated images with a two-batch fine-tune (seconds each).
"""
import copy

import numpy as np
import pytest
import torch
import yaml

from pruning_env.persistence import load_parts, save_parts
from rl_prune.config import load_config
from rl_prune.pipeline import finetune_searched, run
from rl_prune.run_folder import (SEARCHED_KIND, SEARCHED_VERSION, RunFolder, rebuild_pruned, structure_hash,
                                 weights_hash)
from tiny import SB3_SMALL, tiny_env, tiny_run

SETTINGS = {"ignore": [], "prune_normalized": False}


def episode(env, actions):
    env.reset(seed=0)
    for a in actions:
        env.step(np.asarray(a, dtype=np.float32))
    return env


@pytest.fixture(scope="module")
def searched(splits):
    """A finished two-step episode of the tiny env: (env, searched model, its kept indices)."""
    env = tiny_env(splits, n_steps=2, target=0.5, budget="flops", action_mode="sparsity")
    episode(env, [[0.2, 0.5, 0.1], [0.6, 0.1, 0.4]])
    yield env, copy.deepcopy(env.model), env.kept_indices
    env.close()


def test_kept_indices_compose_the_steps_plans_in_the_original_numbering(searched):
    env, model, kept = searched
    assert [len(k) for k in kept] == [int(c) for c in env.current_channels]
    assert all(np.all(np.diff(k) > 0) and k.min() >= 0 and k.max() < n for k, n in zip(kept, env.original_channels))
    assert any(len(k) < n for k, n in zip(kept, env.original_channels))
    rebuilt, names = rebuild_pruned(env.original_model, kept, env.input_size, SETTINGS)
    assert names == env.group_names
    assert weights_hash(rebuilt) == weights_hash(model)  # bit-exact: the two steps' slices are one slice
    x = torch.randn(4, *env.input_size)
    torch.testing.assert_close(rebuilt.eval()(x), model.eval()(x), rtol=0, atol=0)


def test_a_fresh_episode_starts_from_every_channel(splits):
    env = tiny_env(splits, n_steps=2, target=0.5, budget="flops")
    env.reset(seed=0)
    assert [k.tolist() for k in env.kept_indices] == [list(range(n)) for n in env.original_channels]
    env.close()


def test_the_run_folder_round_trip_is_bit_exact_and_leaves_the_source_alone(searched, tmp_path):
    env, model, kept = searched
    folder = RunFolder(tmp_path / "run")
    source_before = weights_hash(env.original_model)
    record = folder.write_searched_model(model, env.original_model, kept, env.input_size, SETTINGS, "tiny.pt")
    assert folder.has_searched_model and record.state_dict is None  # slicing the source gives the weights
    assert record.structure_hash == structure_hash(model) and record.source == "tiny.pt"
    loaded = folder.read_searched_model(env.original_model)
    assert weights_hash(loaded) == weights_hash(model) and not loaded.training
    assert weights_hash(env.original_model) == source_before
    assert [len(k) for k in folder.read_searched_record().kept_indices] == [len(k) for k in kept]


def test_a_searched_model_with_trained_weights_keeps_them(searched, tmp_path):
    env, model, kept = searched
    trained = copy.deepcopy(model)
    with torch.no_grad():  # as a recovery between steps would have changed it
        next(trained.parameters()).add_(0.5)
    folder = RunFolder(tmp_path / "run")
    record = folder.write_searched_model(trained, env.original_model, kept, env.input_size, SETTINGS)
    assert record.state_dict is not None
    assert weights_hash(folder.read_searched_model(env.original_model)) == weights_hash(trained)


def test_another_source_model_is_refused(searched, tmp_path):
    env, model, kept = searched
    folder = RunFolder(tmp_path / "run")
    folder.write_searched_model(model, env.original_model, kept, env.input_size, SETTINGS, "tiny.pt")
    other = copy.deepcopy(env.original_model)
    with torch.no_grad():
        next(other.parameters()).mul_(2.0)
    with pytest.raises(ValueError, match=r"searched_model\.zip: the source model given is not the one .*tiny\.pt"):
        folder.read_searched_model(other)


def test_a_tampered_structure_hash_is_refused(searched, tmp_path):
    env, model, kept = searched
    folder = RunFolder(tmp_path / "run")
    folder.write_searched_model(model, env.original_model, kept, env.input_size, SETTINGS)
    path = folder.file(RunFolder.SEARCHED_MODEL)
    data = load_parts(path, SEARCHED_KIND, SEARCHED_VERSION).data
    data["kept_indices"][0] = data["kept_indices"][0][:-1]  # one channel fewer than the searched model
    save_parts(path, SEARCHED_KIND, SEARCHED_VERSION, data)
    with pytest.raises(ValueError, match="does not have the searched model's structure"):
        folder.read_searched_model(env.original_model)


def test_indices_that_do_not_rebuild_the_model_are_not_written(searched, tmp_path):
    env, model, kept = searched
    wrong = [k[:-1] if i == 0 else k for i, k in enumerate(kept)]
    folder = RunFolder(tmp_path / "run")
    with pytest.raises(RuntimeError, match="do not rebuild the searched model's structure"):
        folder.write_searched_model(model, env.original_model, wrong, env.input_size, SETTINGS)
    assert not folder.has_searched_model


def test_a_run_without_a_search_has_no_searched_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="searched_model.zip not found"):
        RunFolder(tmp_path).read_searched_record()


# ------------------------------------------------------------------------------------------ through the pipeline
TINY = tiny_run(agent="uniform", budget=6, env={"n_steps": 2},
                agents={"rl_pruner_improved": {"sample_num": 2},
                        "ppo": {**SB3_SMALL["ppo"], "policy_kwargs": {"net_arch": [8]}}})


@pytest.mark.parametrize("agent", ["uniform", "random_search", "rl_pruner_improved", "ppo"])
def test_every_agent_keeps_its_searched_model_and_its_fine_tune_repeats(agent, tmp_path):
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(yaml.safe_dump({**TINY, "run": {**TINY["run"], "out_dir": str(tmp_path / "runs")}}))
    cfg = load_config(cfg_file, {"agent": agent})
    metrics = run(cfg, agent, tmp_path / "runs" / agent)
    folder = RunFolder(tmp_path / "runs" / agent)
    record = folder.read_searched_record()
    assert [len(k) for k in record.kept_indices] == metrics["kept_channels"]
    assert record.group_names == metrics["group_names"]
    again = finetune_searched(cfg, folder)  # the run's own fine-tune, from the rebuilt model
    assert again["seed"] == cfg.seed and again["report"] == metrics["pruned"]
    other = finetune_searched(cfg, folder, seed=cfg.seed + 1)
    assert other["seed"] == cfg.seed + 1
    assert other["report"]["macs"] == metrics["pruned"]["macs"]


def _finished(folder, env, model, kept, trained=False):
    if trained:
        model = copy.deepcopy(model)
        with torch.no_grad():
            next(model.parameters()).add_(0.5)
    folder.write_searched_model(model, env.original_model, kept, env.input_size, SETTINGS, "tiny.pt")
    folder.file(RunFolder.METRICS).write_text('{"name": "run", "n_evaluations": 7}')  # what export reads back


def test_a_search_carried_as_json_restores_bit_exactly_and_checks_its_source(searched, tmp_path, monkeypatch):
    import json

    from rl_prune.run_folder import RunFolderError, indices_to_mask, mask_to_indices

    assert mask_to_indices(indices_to_mask([0, 3, 9])) == [0, 3, 9] and indices_to_mask([0, 3]) == "9"
    env, model, kept = searched
    _finished(RunFolder(tmp_path / "a"), env, model, kept)
    carried = json.loads(json.dumps(RunFolder(tmp_path / "a").export_search()))  # plain JSON, no tensors
    assert carried["metrics"]["n_evaluations"] == 7
    assert [len(mask_to_indices(m)) for m in carried["searched_model"]["kept_masks"]] == [len(k) for k in kept]
    restored = RunFolder(tmp_path / "b")
    # these metrics are a stub (the full schema is the pipeline's: test_compare_agents restores real runs)
    monkeypatch.setattr(RunFolder, "write_metrics", lambda self, m: self.file(self.METRICS).write_text(json.dumps(m)))
    restored.restore_search(carried, env.original_model)
    with pytest.raises(RunFolderError, match="already holds a finished run"):
        restored.restore_search(carried, env.original_model)
    other = copy.deepcopy(env.original_model)
    with torch.no_grad():
        next(other.parameters()).mul_(2.0)
    with pytest.raises(ValueError, match="not the one the carried search started from"):
        RunFolder(tmp_path / "c").restore_search(carried, other)
    assert not RunFolder(tmp_path / "c").is_finished
    assert weights_hash(restored.read_searched_model(env.original_model)) == weights_hash(model)
    assert restored.read_metrics()["n_evaluations"] == 7
    # a search that trained its model cannot be carried as indices: its metrics only
    _finished(RunFolder(tmp_path / "d"), env, model, kept, trained=True)
    assert RunFolder(tmp_path / "d").export_search()["searched_model"] is None
