"""Foundation tests: datasets and splits, preloading, training utilities, checkpoints and pretraining.

All offline, on generated data or the embedded digits set.
"""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from pruning_env.checkpoint import default_checkpoint_path, load_model, read_meta, save_checkpoint
from pruning_env.runtime import atomic_save, seed_everything
from pruning_env.data import make_datasets, make_synthetic, preload
from pruning_env.training import evaluate, finetune, kd_loss, warmup_cosine


def _tiny_net(num_classes=10):
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))


def test_synthetic_splits_are_disjoint_and_seeded():
    a = make_synthetic(n_train=100, n_test=20, val_size=10, seed=3)
    b = make_synthetic(n_train=100, n_test=20, val_size=10, seed=3)
    assert (len(a.train), len(a.val), len(a.test)) == (90, 10, 20)
    assert torch.equal(a.val.images, b.val.images)
    # validation images are held out of the training images, never taken from test
    train_set = {bytes(x.numpy()) for x in a.train.images}
    assert not any(bytes(x.numpy()) in train_set for x in a.val.images)


def test_val_split_changes_with_seed():
    a = make_synthetic(n_train=100, val_size=10, seed=1)
    b = make_synthetic(n_train=100, val_size=10, seed=2)
    assert not torch.equal(a.val.labels, b.val.labels) or not torch.equal(a.val.images, b.val.images)


def test_digits_embedded_dataset_loads_offline():
    s = make_datasets("digits", val_size=100, seed=0)
    assert s.num_classes == 10 and s.input_size == (3, 32, 32)
    assert len(s.train) + len(s.val) + len(s.test) == 1797
    x, y = s.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= y < 10


def test_train_is_augmented_val_is_not():
    s = make_synthetic(n_train=50, val_size=5, seed=0, augment=True)
    seed_everything(0)
    x1, _ = s.train[0]
    x2, _ = s.train[0]
    assert not torch.equal(x1, x2), "training augmentation should be random"
    assert torch.equal(s.val[0][0], s.val[0][0])


def test_npz_dataset(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, size=(60, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 4, size=60)
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=y)
    s = make_datasets(f"npz:{path}", val_size=6, seed=0)
    assert s.num_classes == 4
    assert len(s.train) + len(s.val) + len(s.test) == 60 and len(s.val) == 6
    with pytest.raises(FileNotFoundError, match="npz"):
        make_datasets(f"npz:{tmp_path / 'missing.npz'}")
    np.savez(tmp_path / "bad.npz", images=x)
    with pytest.raises(ValueError, match="'x'"):
        make_datasets(f"npz:{tmp_path / 'bad.npz'}")


def test_imagefolder_dataset(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(6):
                Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(d / f"{i}.png")
    s = make_datasets(f"imagefolder:{tmp_path}", val_size=2)
    assert s.classes == ["cat", "dog"] and len(s.test) == 12 and s.input_size == (3, 32, 32)


def test_missing_cifar_names_the_folder_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        make_datasets("cifar100", root=tmp_path)
    msg = str(err.value)
    assert "cifar-100-python" in msg and "--download" in msg and "--data-root" in msg


def test_unknown_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        make_datasets("mnist")


def test_preload_is_a_fixed_subset():
    s = make_synthetic(n_train=100, val_size=40, seed=0)
    x1, y1 = preload(s.val, n=16, seed=5)
    x2, y2 = preload(s.val, n=16, seed=5)
    assert x1.shape == (16, 3, 32, 32) and torch.equal(x1, x2) and torch.equal(y1, y2)
    # same values as going item by item through the dataset
    full_x, _ = preload(s.val)
    assert torch.allclose(full_x[0], s.val[0][0])


def test_preload_augments_each_image_on_its_own():
    # 32 copies of one image: a crop/flip/rotation shared by the batch would give 32 equal tensors
    s = make_synthetic(n_train=50, val_size=5, seed=0, augment=True)
    copies = s.train.images[:1].repeat(32, 1, 1, 1)
    same = type(s.train)(copies, torch.zeros(32, dtype=torch.long), s.train.transform, augmented=True)
    seed_everything(0)
    x, _ = preload(same)
    assert x.shape == (32, 3, 32, 32)
    assert sum(not torch.equal(x[0], x[i]) for i in range(1, 32)) >= 16
    # seeded: the same draws again
    seed_everything(0)
    assert torch.equal(preload(same)[0], x)


def test_evaluate_counts_correct_predictions():
    class Oracle(nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot(x[:, 0, 0, 0].long(), 3).float()

    x = torch.zeros(6, 3, 2, 2)
    x[:, 0, 0, 0] = torch.tensor([0, 1, 2, 0, 1, 2])
    y = torch.tensor([0, 1, 2, 1, 1, 0])
    res = evaluate(Oracle(), (x, y), batch_size=4)
    assert res["top1"] == pytest.approx(4 / 6) and res["top5"] == 1.0 and res["n"] == 6


def test_kd_loss_matches_formula():
    torch.manual_seed(0)
    s, t, y = torch.randn(5, 4), torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 0])
    T, w = 2.0, 0.75
    p_t = torch.softmax(t / T, 1)
    kl = (p_t * (p_t.log() - torch.log_softmax(s / T, 1))).sum() / 5
    expected = w * T * T * kl + (1 - w) * torch.nn.functional.cross_entropy(s, y)
    assert kd_loss(s, t, y, T=T, soft_weight=w).item() == pytest.approx(expected.item(), rel=1e-5)
    assert kd_loss(t, t, y, T=T, soft_weight=1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_warmup_cosine_shape():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = warmup_cosine(opt, total_steps=100, warmup_steps=10, min_lr=1e-4)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.01) and lrs[9] == pytest.approx(0.1)
    assert all(a >= b - 1e-12 for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 0.01


def test_finetune_improves_and_restores_best(synthetic_splits):
    torch.manual_seed(0)
    net = _tiny_net()
    before = evaluate(net, synthetic_splits.val)["top1"]
    res = finetune(net, synthetic_splits.train, synthetic_splits.val, epochs=3, lr=0.05, batch_size=32,
                   progress=False)
    assert res["val_top1"] >= before
    assert evaluate(net, synthetic_splits.val)["top1"] == pytest.approx(res["val_top1"])


def test_atomic_save_and_checkpoint_roundtrip(tmp_path):
    from pruning_env.models import create_model

    atomic_save({"a": 1}, tmp_path / "x" / "f.pt")
    assert torch.load(tmp_path / "x" / "f.pt")["a"] == 1
    assert not [p for p in (tmp_path / "x").iterdir() if p.name.endswith(".tmp")]
    model = create_model("resnet20", num_classes=7, width=0.25).eval()
    path = save_checkpoint(model, tmp_path / "m.pt", val_top1=0.5)
    again = load_model(path).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(model(x), again(x))
    assert read_meta(path)["val_top1"] == 0.5
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_model(tmp_path / "nope.pt")


def test_default_checkpoint_path():
    assert str(default_checkpoint_path("vgg19", "cifar100")) == "checkpoints/vgg19_cifar100.pt"
    assert str(default_checkpoint_path("vgg19", "npz:/x/cifar10_5k.npz", 0.25)) == "checkpoints/vgg19_w0.25_npz-cifar10_5k.pt"


def test_pretrain_cli_writes_reloadable_checkpoint_and_resumes(tmp_path, capsys):
    from pruning_env.pretrain import main

    out = tmp_path / "ck.pt"
    args = ["--model", "vgg11", "--width", "0.0625", "--dataset", "synthetic", "--epochs", "2",
            "--batch-size", "32", "--lr", "0.05", "--device", "cpu", "--out", str(out)]
    assert main(args) == 0
    model = load_model(out)
    assert model.zoo_config["name"] == "vgg11" and model.zoo_config["num_classes"] == 10
    summary = json.loads(out.with_suffix(".json").read_text())
    assert len(summary["log"]) == 2 and 0 <= summary["test_top1"] <= 1
    # an unknown model is refused with the list of known ones
    assert main(["--model", "vgg99", "--dataset", "synthetic"]) == 2
    assert "unknown model 'vgg99'" in capsys.readouterr().err


def test_pretrain_resume_matches_uninterrupted(tmp_path):
    from pruning_env.pretrain import pretrain

    common = dict(model="vgg11", width=0.0625, dataset="synthetic", batch_size=64, lr=0.05, device="cpu",
                  progress=False, seed=0)
    full = pretrain(epochs=2, out=tmp_path / "full.pt", **common)
    # simulate a run killed after epoch 1: train 1 epoch of a 2-epoch schedule, keep its state file
    import pruning_env.pretrain as pt

    part = tmp_path / "part.pt"
    orig = pt.evaluate
    calls = {"n": 0}

    def dying_evaluate(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the validation pass of epoch 2
            raise KeyboardInterrupt
        return orig(*a, **k)

    pt.evaluate = dying_evaluate
    try:
        with pytest.raises(KeyboardInterrupt):
            pretrain(epochs=2, out=part, **common)
    finally:
        pt.evaluate = orig
    assert part.with_name(part.name + ".state").is_file()
    pretrain(epochs=2, out=part, resume=True, **common)
    a, b = load_model(full), load_model(part)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.allclose(va.float(), vb.float()), ka
