"""Tests for the offline default: fractal data, built-in tasks, and the shipped fractal-pretrained ViT."""

import json
import socket

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

from deltatune.errors import DeltaTuneError
from deltatune.offline import TASKS, WEIGHTS_FILE, FractalDataset, create_offline_vit, make_task, read_weights_metadata
from deltatune.offline.backbone import OFFLINE_VIT_ARCH
from deltatune.offline.formula import filling_rate, render_ifs, sample_good_ifs
from deltatune.offline.probe import digits_probe, random_probe

TASK_SIZES = {"digits": (1000, 797, 10), "digits-shift": (1000, 797, 10), "count": (800, 400, 6)}
TASK_SIZES |= {"location": (800, 400, 9), "orientation": (800, 400, 8)}


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes any socket connection fail, so that a test proves it needs no download."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def shipped() -> dict[str, torch.Tensor]:
    """The shipped weight file's tensors."""
    return load_file(str(WEIGHTS_FILE))


# --- fractal data -------------------------------------------------------------------------------------------------


def test_fractal_same_seed_same_tensors_other_seed_differs() -> None:
    a, b = FractalDataset(6, 4, 32, seed=3), FractalDataset(6, 4, 32, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    c = FractalDataset(6, 4, 32, seed=4)
    assert not torch.equal(a.images, c.images)
    assert not torch.equal(a.ifs[0], c.ifs[0])


def test_fractal_sample_seed_keeps_classes_and_changes_renders() -> None:
    a, b = FractalDataset(6, 4, 32, seed=3), FractalDataset(6, 4, 32, seed=3, sample_seed=99)
    assert all(torch.equal(x, y) for x, y in zip(a.ifs, b.ifs, strict=True))
    assert not torch.equal(a.images, b.images)


def test_fractal_items_shapes_ranges_and_balance() -> None:
    ds = FractalDataset(num_classes=8, per_class=5, image_size=32, seed=0)
    assert len(ds) == 40
    image, label = ds[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert isinstance(label, int) and 0 <= label < 8
    assert torch.bincount(ds.labels, minlength=8).tolist() == [5] * 8
    # Every image shows a shape: bright ink pixels over a background, not a blank or flat image.
    contrast = ds.images.float().amax((1, 2, 3)) - ds.images.float().amin((1, 2, 3))
    assert bool((contrast > 60).all())
    assert FractalDataset(2, 1, 64, seed=0)[0][0].shape == (3, 64, 64)


def test_fractal_filter_keeps_only_contractive_well_filled_systems() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b, p = sample_good_ifs(20, gen, min_fill=0.12, max_fill=0.6)
    assert a.shape == (20, 4, 2, 2) and b.shape == (20, 4, 2) and p.shape == (20, 4)
    assert bool(((torch.linalg.matrix_norm(a, ord=2) < 1) | (p == 0)).all())  # every used map contracts
    torch.testing.assert_close(p.sum(-1), torch.ones(20))
    assert bool(((p > 0).sum(-1) >= 2).all())  # at least two maps in use
    fill = filling_rate(render_ifs(a, b, p, 32, torch.Generator().manual_seed(1)))
    assert bool((fill > 0.08).all()) and bool((fill < 0.7).all())  # same test, other walker randomness


def test_fractal_diverging_system_renders_blank() -> None:
    a = torch.eye(2).expand(1, 2, 2, 2) * 3.0  # expanding maps: points fly off to infinity
    ink = render_ifs(a, torch.zeros(1, 2, 2), torch.full((1, 2), 0.5), 16, torch.Generator().manual_seed(0))
    assert float(filling_rate(ink)) == 0.0


# --- tasks --------------------------------------------------------------------------------------------------------


def test_task_names() -> None:
    assert TASKS == ["digits", "digits-shift", "count", "location", "orientation"]


@pytest.mark.parametrize("name", TASKS)
def test_task_sizes_shapes_ranges_labels(name: str) -> None:
    train, test, num_classes = make_task(name, seed=0)
    n_train, n_test, expected_classes = TASK_SIZES[name]
    assert (len(train), len(test), num_classes) == (n_train, n_test, expected_classes)
    image, label = train[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert isinstance(label, int)
    for ds in (train, test):
        # uint8 pixels that span the full range: black background and full-intensity ink, not a blank or dim image
        assert ds.images.dtype == torch.uint8 and (int(ds.images.min()), int(ds.images.max())) == (0, 255)
        counts = torch.bincount(ds.labels, minlength=num_classes)
        assert len(counts) == num_classes and int(counts.min()) > 0.8 * len(ds) / num_classes


@pytest.mark.parametrize("name", TASKS)
def test_task_deterministic_by_seed(name: str) -> None:
    a_train, a_test, _ = make_task(name, seed=1)
    b_train, b_test, _ = make_task(name, seed=1)
    assert torch.equal(a_train.images, b_train.images) and torch.equal(a_test.images, b_test.images)
    assert torch.equal(a_train.labels, b_train.labels)
    c_train, _, _ = make_task(name, seed=2)
    assert not torch.equal(a_train.images, c_train.images)


def test_task_image_size() -> None:
    train, test, _ = make_task("orientation", seed=0, image_size=48)
    assert train[0][0].shape == (3, 48, 48) and test[0][0].shape == (3, 48, 48)


def test_digits_are_the_real_sklearn_digits() -> None:
    from sklearn.datasets import load_digits

    train, test, _ = make_task("digits", seed=0, image_size=8)
    digits = load_digits()
    # At the native 8x8 size the images are sklearn's pixels (0..16) up to uint8 rounding, in all three channels.
    pool = {tuple((torch.from_numpy(img).flatten() / 16 * 255).round().int().tolist()) for img in digits.images}
    assert all(tuple(train.images[i, 0].flatten().int().tolist()) in pool for i in range(20))
    assert torch.equal(train.images[:, 0], train.images[:, 2])
    assert sorted(torch.cat([train.labels, test.labels]).tolist()) == sorted(digits.target.tolist())


def test_unknown_task_raises_and_lists_valid_names() -> None:
    with pytest.raises(DeltaTuneError, match="digits-shift") as info:
        make_task("cifar100")
    assert isinstance(info.value, ValueError) and "cifar100" in str(info.value)


# --- shipped weights and backbone ----------------------------------------------------------------------------------


def test_weight_file_size_dtype_and_metadata(shipped: dict[str, torch.Tensor]) -> None:
    assert WEIGHTS_FILE.stat().st_size <= 10 * 1024 * 1024
    assert all(t.dtype == torch.float16 for t in shipped.values())
    assert not any(k.startswith("head.") for k in shipped)
    meta = read_weights_metadata()
    assert json.loads(meta["arch"]) == OFFLINE_VIT_ARCH
    assert json.loads(meta["mean"]) == [0.5, 0.5, 0.5] and json.loads(meta["std"]) == [0.5, 0.5, 0.5]
    assert meta["command"].startswith("python scripts/pretrain_offline_vit.py")
    assert meta["seed"] == "0" and len(meta["date"]) == 10
    assert 0.5 < float(meta["pretrain_val_acc"]) <= 1.0  # 100 fractal classes: chance is 0.01


def test_shipped_weights_beat_random_init_on_the_digits_probe() -> None:
    """Re-measures what the file records: a linear probe on the pretrained features beats every random init."""
    meta = read_weights_metadata()
    pretrained = digits_probe(create_offline_vit(num_classes=0))
    random_inits = random_probe(OFFLINE_VIT_ARCH)
    assert pretrained == pytest.approx(float(meta["probe_digits_pretrained"]), abs=0.01)
    assert np.mean(random_inits) == pytest.approx(float(meta["probe_digits_random"]), abs=0.01)
    assert pretrained > max(random_inits) + 0.03, (pretrained, random_inits)


def test_create_offline_vit_loads_shipped_weights_exactly(shipped: dict[str, torch.Tensor]) -> None:
    model = create_offline_vit(num_classes=10)
    state = model.state_dict()
    assert set(state) - set(shipped) == {"head.weight", "head.bias"}
    for name, tensor in shipped.items():
        assert torch.equal(state[name], tensor.float()), name
    assert model.head.weight.shape == (10, OFFLINE_VIT_ARCH["embed_dim"])
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    cfg = model.pretrained_cfg
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["std"] == (0.5, 0.5, 0.5) and cfg["input_size"] == (3, 32, 32)


def test_create_offline_vit_random_init_differs(shipped: dict[str, torch.Tensor]) -> None:
    model = create_offline_vit(num_classes=3, pretrained=False)
    assert not torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"], shipped["blocks.0.attn.qkv.weight"].float())


def test_timm_create_model_works_offline(no_network: None, shipped: dict[str, torch.Tensor]) -> None:
    assert "deltatune_offline_vit" in timm.list_models("deltatune*", pretrained=True)
    model = timm.create_model("deltatune_offline_vit", pretrained=True, num_classes=7)
    assert model.num_classes == 7 and model.head.out_features == 7
    state = model.state_dict()
    assert all(torch.equal(state[k], v.float()) for k, v in shipped.items())
    headless = timm.create_model("deltatune_offline_vit", pretrained=True)
    assert headless.num_classes == 0 and headless(torch.rand(1, 3, 32, 32)).shape == (1, OFFLINE_VIT_ARCH["embed_dim"])


def test_missing_weight_file_raises(tmp_path: pytest.TempPathFactory) -> None:
    missing = tmp_path / "nothing.safetensors"
    with pytest.raises(DeltaTuneError, match="pretrain_offline_vit.py"):
        create_offline_vit(5, pretrained_cfg_overlay=dict(file=str(missing)))


def test_architecture_override_that_breaks_weights_raises() -> None:
    with pytest.raises(DeltaTuneError, match="only the head may differ"):
        create_offline_vit(5, depth=4)


def test_larger_image_size_resamples_position_embedding(shipped: dict[str, torch.Tensor]) -> None:
    model = create_offline_vit(5, img_size=64)
    assert model.pos_embed.shape[1] == 1 + (64 // OFFLINE_VIT_ARCH["patch_size"]) ** 2
    assert torch.equal(model.state_dict()["blocks.0.mlp.fc1.weight"], shipped["blocks.0.mlp.fc1.weight"].float())
    assert model(torch.rand(1, 3, 64, 64)).shape == (1, 5)
