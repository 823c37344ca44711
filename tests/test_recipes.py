"""Pretraining recipes: selected by name, overridden per value, recorded in the checkpoint, and VGG's head
option rebuilt by load_model.
"""
import json

import pytest
import torch
from torchvision.transforms import v2

from pruning_env.checkpoint import load_model, read_meta
from pruning_env.data import make_synthetic
from pruning_env.models import create_model
from pruning_env.pretrain import RECIPES, _without_rotation, get_recipe, main


def test_recipes_by_name_with_overrides():
    assert get_recipe("authors") == RECIPES["authors"]
    small = get_recipe("small_data", epochs=3, lr=None)
    assert small.epochs == 3 and small.lr == RECIPES["small_data"].lr and small.head == "linear"
    with pytest.raises(ValueError, match="unknown recipe 'fast'"):
        get_recipe("fast")
    with pytest.raises(ValueError, match="no field"):
        get_recipe("authors", momentum=0.8)


def test_small_data_cli_records_the_recipe_and_the_linear_head(tmp_path):
    out = tmp_path / "ck.pt"
    args = ["--model", "vgg11", "--width", "0.0625", "--dataset", "synthetic", "--recipe", "small_data",
            "--epochs", "1", "--batch-size", "32", "--device", "cpu", "--out", str(out)]
    assert main(args) == 0
    model = load_model(out)
    assert model.zoo_config["head"] == "linear" and len(model.classifier) == 1
    recipe = read_meta(out)["recipe"]
    assert recipe["name"] == "small_data" and recipe["epochs"] == 1 and recipe["batch_size"] == 32
    assert recipe["rotation"] is False
    assert json.loads(out.with_suffix(".json").read_text())["recipe"] == recipe


def test_recipe_head_is_skipped_for_models_without_the_option(tmp_path):
    out = tmp_path / "r.pt"
    assert main(["--model", "resnet20", "--width", "0.25", "--dataset", "synthetic", "--recipe", "small_data",
                 "--epochs", "1", "--batch-size", "64", "--device", "cpu", "--out", str(out)]) == 0
    assert "head" not in load_model(out).zoo_config


def test_without_rotation_keeps_crop_and_flip():
    splits = make_synthetic(n_train=32, n_test=8, augment=True)
    _without_rotation(splits.train)
    kinds = [type(t) for t in splits.train.transform.transforms]
    assert v2.RandomRotation not in kinds and v2.RandomCrop in kinds and v2.RandomHorizontalFlip in kinds


def test_vgg_head_option():
    linear = create_model("vgg11", num_classes=7, width=0.125, head="linear")
    assert linear(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert len(create_model("vgg11", width=0.125).classifier) == 7
    with pytest.raises(ValueError, match="head must be 'mlp' or 'linear'"):
        create_model("vgg11", head="conv")
