"""Datasets by name and layout (VTAB-1k, FGVC, ImageFolder, text, offline), transforms, sharding, bad data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from deltatune import DeltaTuneError
from deltatune.data import TensorImages, load_data, make_loader, make_transform, subsample
from deltatune.train.distributed import Runtime
from deltatune.train.loop import train

DATA_CFG = {
    "input_size": (3, 32, 32),
    "mean": (0.5, 0.5, 0.5),
    "std": (0.25, 0.25, 0.25),
    "interpolation": "bilinear",
    "crop_pct": 1.0,
    "crop_mode": "center",
}


def _png(path: Path, value: int, size: int = 20) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (value, value, value)).save(path)


def _vtab(root: Path, n_train: int = 8, n_val: int = 4, n_test: int = 6) -> Path:
    task = root / "cifar"
    lines: dict[str, list[str]] = {"train800": [], "val200": [], "test": []}
    for split, n in (("train800", n_train), ("val200", n_val), ("test", n_test)):
        for i in range(n):
            rel = f"images/{split}/{i}.png"
            _png(task / rel, 10 * i)
            lines[split].append(f"{rel} {i % 3}")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, rows in lines.items():
        (task / f"{split}.txt").write_text("\n".join(rows) + "\n")
    return task


def test_vtab_layout(tmp_path: Path) -> None:
    task = _vtab(tmp_path)
    data = load_data("vtab", str(task))
    assert (len(data.train), len(data.eval), data.num_classes) == (12, 6, 3)  # train800val200 by default
    image, label = data.train[1]
    assert image.size == (20, 20) and label == 1
    tuning = load_data("vtab:cifar", str(tmp_path), train_split="train800", eval_split="val200")
    assert (len(tuning.train), len(tuning.eval)) == (8, 4)


def test_vtab_errors_name_the_fix(tmp_path: Path) -> None:
    task = _vtab(tmp_path)
    with pytest.raises(DeltaTuneError, match=r"vtab:cifar"):  # pointed at the vtab-1k root, not the task
        load_data("vtab", str(tmp_path))
    with pytest.raises(DeltaTuneError, match=r"split 'train1000' unknown"):
        load_data("vtab", str(task), train_split="train1000")
    (task / "test.txt").write_text("images/test/0.png\n")
    with pytest.raises(DeltaTuneError, match=r"test.txt' line 1: expected '<image path> <class id>'"):
        load_data("vtab", str(task))
    (task / "test.txt").write_text("images/test/missing.png 0\n")
    with pytest.raises(DeltaTuneError, match=r"do not exist.*missing.png"):
        load_data("vtab", str(task))
    (task / "val200.txt").unlink()
    with pytest.raises(DeltaTuneError, match=r"no val200.txt.*SSF/NOAH layout"):
        load_data("vtab", str(task), train_split="val200")


def test_fgvc_json_splits(tmp_path: Path) -> None:
    root = tmp_path / "CUB_200_2011"
    splits = {"train": range(0, 6), "val": range(6, 8), "test": range(8, 12)}
    for split, ids in splits.items():
        for i in ids:
            _png(root / "images" / f"{i}.png", i)
        (root / f"{split}.json").write_text(json.dumps({f"{i}.png": i % 4 for i in ids}))
    data = load_data("fgvc:CUB_200_2011", str(tmp_path))
    assert (len(data.train), len(data.eval), data.num_classes) == (8, 4, 4)  # trainval: train + val
    assert load_data("fgvc", str(root), train_split="train", eval_split="val").eval[1][1] == 3
    (root / "test.json").write_text("[1, 2]")
    with pytest.raises(DeltaTuneError, match="must map image paths to integer class ids"):
        load_data("fgvc", str(root))


def test_image_folder_and_bad_images(tmp_path: Path) -> None:
    for split in ("train", "val"):
        for c, cls in enumerate(("cat", "dog")):
            for i in range(3):
                _png(tmp_path / split / cls / f"{i}.png", 100 * c + i)
    data = load_data("folder", str(tmp_path))
    assert (len(data.train), len(data.eval), data.num_classes) == (6, 6, 2)
    (tmp_path / "train" / "dog" / "0.png").write_bytes(b"not an image")
    with pytest.raises(DeltaTuneError, match=r"cannot read image .*0.png.*replace the file"):
        load_data("folder", str(tmp_path)).train[3]
    (tmp_path / "train" / "bird").mkdir()
    with pytest.raises(DeltaTuneError, match=r"bird.*add images or remove the empty class folder"):
        load_data("folder", str(tmp_path))


def test_unreadable_image_stops_training_with_a_clear_error(tmp_path: Path) -> None:
    for split in ("train", "test"):
        for c in range(2):
            for i in range(4):
                _png(tmp_path / "data" / split / str(c) / f"{i}.png", 60 * c + i)
    (tmp_path / "data" / "train" / "1" / "2.png").write_text("corrupt")
    cfg = {
        "model": "test_vit",
        "pretrained": False,
        "img_size": 32,
        "model_kwargs": {"patch_size": 8},
        "dataset": "folder",
        "data_dir": str(tmp_path / "data"),
        "num_workers": 0,
        "epochs": 1,
        "batch_size": 4,
        "output_dir": str(tmp_path / "run"),
        "progress": False,
        "threads": 1,
    }
    with pytest.raises(DeltaTuneError, match=r"cannot read image .*2.png"):
        train(cfg)


def test_unknown_and_unreachable_datasets(tmp_path: Path) -> None:
    with pytest.raises(DeltaTuneError, match=r"unknown dataset 'imagenet-22k'.*cifar100.*vtab"):
        load_data("imagenet-22k")
    with pytest.raises(DeltaTuneError, match=r"cannot load cifar10 .*download is off.*--data-dir"):
        load_data("cifar10", str(tmp_path), download=False)
    with pytest.raises(DeltaTuneError, match=r"only the splits train and test"):
        load_data("cifar10", str(tmp_path), train_split="val", download=False)
    with pytest.raises(DeltaTuneError, match=r"no train subfolder"):
        load_data("folder", str(tmp_path))


def test_offline_and_synthetic_tasks() -> None:
    data = load_data("offline:orientation", seed=0, image_size=16)
    image, label = data.train[0]
    assert data.num_classes == 8 and image.shape == (3, 16, 16) and 0 <= label < 8
    a, b = load_data("synthetic", seed=3), load_data("synthetic", seed=3)
    assert torch.equal(a.train.images, b.train.images) and len(a.train) == 256 and a.num_classes == 4


def test_transforms_accept_tensors_and_images() -> None:
    tensor = torch.full((3, 32, 32), 0.75)
    none = make_transform("none", True, DATA_CFG)(tensor)
    assert torch.allclose(none, torch.full((3, 32, 32), 1.0))  # (0.75 - 0.5) / 0.25
    resized = make_transform("resize", False, DATA_CFG)(Image.new("RGB", (64, 48), (191, 191, 191)))
    assert resized.shape == (3, 32, 32) and type(resized) is torch.Tensor
    augment = make_transform("timm", True, DATA_CFG, hflip=0.5, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25)
    assert augment(tensor).shape == (3, 32, 32) and augment(Image.new("RGB", (50, 40))).shape == (3, 32, 32)
    assert make_transform("timm", False, DATA_CFG)(Image.new("RGB", (40, 40))).shape == (3, 32, 32)


def test_text_folder(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text("text,label\nhello there,b\nbye now,a\n")
    (tmp_path / "test.jsonl").write_text(json.dumps({"text": "hi"}) + "\n")
    pytest.importorskip("transformers")
    from deltatune.data.text import read_rows

    assert read_rows(tmp_path / "train.csv")[1] == {"text": "bye now", "label": "a"}
    with pytest.raises(DeltaTuneError, match=r"row 1: needs 'text' and 'label'"):
        read_rows(tmp_path / "test.jsonl")
    with pytest.raises(DeltaTuneError, match="needs a tokenizer"):
        load_data("text", str(tmp_path))


def test_subsample_is_seeded() -> None:
    data = load_data("synthetic")
    a, b, c = subsample(data.train, 10, 0), subsample(data.train, 10, 0), subsample(data.train, 10, 1)
    assert a.indices == b.indices != c.indices and len(a) == 10
    assert subsample(data.train, None, 0) is data.train


def test_two_ranks_split_the_global_batch() -> None:
    data = load_data("synthetic")
    data.train = TensorImages(data.train.images, torch.arange(len(data.train)))  # label = index
    one = make_loader(data.train, 8, Runtime(torch.device("cpu")), train=True, seed=5)
    ranks = [make_loader(data.train, 4, Runtime(torch.device("cpu"), r, 2), train=True, seed=5) for r in (0, 1)]
    for epoch in (0, 1):
        for loader in (one, *ranks):
            loader.sampler.set_epoch(epoch)
        first = next(iter(one))[1].tolist()
        halves = [next(iter(loader))[1].tolist() for loader in ranks]
        assert sorted(first) == sorted(halves[0] + halves[1]) and len(set(first)) == 8
    evals = [make_loader(data.eval, 16, Runtime(torch.device("cpu"), r, 2), train=False) for r in (0, 1)]
    assert sum(len(loader.dataset) for loader in evals) == len(data.eval)


def test_registered_source_receives_its_argument_as_written() -> None:
    """A source registered by name gets the text after the first colon unchanged (case and further colons kept)."""
    from deltatune.data import Data, register_source
    from deltatune.data.sources import _SOURCES

    seen: list[str] = []

    @register_source("echo-test")
    def _echo(arg: str, request: object) -> Data:
        seen.append(arg)
        return Data([], [], 2)

    try:
        assert load_data("Echo-Test:My Folder:v2/A").num_classes == 2
        assert seen == ["My Folder:v2/A"]
    finally:
        _SOURCES.pop("echo-test")
