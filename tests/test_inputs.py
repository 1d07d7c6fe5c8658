"""Every training input is checked before work starts: a DeltaTuneError naming the value and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from tiny_run import tiny_config

from deltatune import DeltaTuneError
from deltatune.data import load_data, load_image
from deltatune.data.text import text_data
from deltatune.train import loop as training
from deltatune.train.config import TrainConfig
from deltatune.train.loop import train


def _png(path: Path, value: int, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (value, value, value)).save(path)


def _vtab(root: Path, labels: list[int]) -> Path:
    """A VTAB-1k task whose train800val200 and test lists carry ``labels``."""
    rows = []
    for i, label in enumerate(labels):
        _png(root / f"images/{i}.png", 10 * i)
        rows.append(f"images/{i}.png {label}")
    for split in ("train800val200", "test"):
        (root / f"{split}.txt").write_text("\n".join(rows) + "\n")
    return root


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("grad_clip", -1, r"grad_clip: -1.0 is out of range; set --grad-clip to a value with 0 < grad_clip"),
        ("min_lr", -0.01, r"min_lr: -0.01 is out of range; set --min-lr to a value with 0 <= min_lr"),
        ("warmup_lr", "-0.01", r"warmup_lr: -0.01 is out of range; set --warmup-lr"),
        ("lr", "nan", r"lr: expected a finite number, got 'nan'; set --lr"),
        ("lr", float("inf"), r"lr: expected a finite number, got inf"),
        ("max_eval_samples", 0, r"max_eval_samples: 0 is out of range; set --max-eval-samples to a value with 1 <="),
        ("img_size", 0, r"img_size: 0 is out of range; set --img-size to a value with 1 <= img_size"),
        ("epochs", True, r"epochs: expected a number, got the boolean True"),
        ("model_kwargs", "{img_size: 32}", r"model_kwargs: img_size=32 is set by --img-size.*pass --img-size 32"),
        ("model_kwargs", {1: 2}, r"model_kwargs: 1 is not an argument name"),
    ],
)
def test_bad_options_are_refused_before_anything_loads(option: str, value: object, message: str) -> None:
    with pytest.raises(DeltaTuneError, match=message):
        TrainConfig.from_dict({option: value})


def test_options_are_checked_when_the_dataclass_is_built_directly() -> None:
    with pytest.raises(DeltaTuneError, match="grad_clip: -1.0 is out of range"):
        TrainConfig(grad_clip=-1.0)
    with pytest.raises(DeltaTuneError, match="epochs: expected a number, got the boolean True"):
        TrainConfig(epochs=True)


def test_yaml_boolean_for_a_number_is_refused(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text("epochs: true\n")
    with pytest.raises(DeltaTuneError, match="epochs: expected a number, got the boolean True"):
        TrainConfig.from_yaml(tmp_path / "r.yaml")


def test_impossible_output_folder_is_refused_before_the_data_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(training, "_load", lambda cfg: pytest.fail("loaded the data before checking output_dir"))
    with pytest.raises(DeltaTuneError, match=r"output_dir .*file/out' cannot be created or written"):
        train(tiny_config(tmp_path / "file" / "out"))


@pytest.mark.parametrize("label", [-1, 10_000_000])
def test_labels_that_are_not_class_ids_are_refused(label: int, tmp_path: Path) -> None:
    """VPT's FGVC json splits (VTAB's list files refuse a '-' at parsing, below)."""
    for i in range(3):
        _png(tmp_path / "images" / f"{i}.png", i)
    for split in ("train", "val", "test"):
        (tmp_path / f"{split}.json").write_text(json.dumps({"0.png": 0, "1.png": 1, "2.png": label}))
    with pytest.raises(DeltaTuneError, match=rf"label {label} is not a class id; labels are integers 0 <= label <"):
        load_data("fgvc", str(tmp_path))
    _vtab(tmp_path / "task", [0, 1, 10_000_000])
    with pytest.raises(DeltaTuneError, match="label 10000000 is not a class id"):
        load_data("vtab:task", str(tmp_path))


def test_negative_text_labels_are_refused() -> None:
    rows = [{"text": "a", "label": "-1"}, {"text": "b", "label": "1"}]
    with pytest.raises(DeltaTuneError, match="label -1 is not a class id"):
        text_data(rows, rows, tok=None)


def test_one_class_dataset_is_refused(tmp_path: Path) -> None:
    for split in ("train", "val"):
        _png(tmp_path / "data" / split / "cat" / "0.png", 0)
    with pytest.raises(DeltaTuneError, match=r"training split has 1 class\(es\); a classifier needs at least 2"):
        train(tiny_config(tmp_path / "out", dataset="folder", data_dir=str(tmp_path / "data")))
    _vtab(tmp_path / "task", [3, 3])  # labels 0-2 have no image: one class in fact
    with pytest.raises(DeltaTuneError, match=r"has 1 class\(es\)"):
        train(tiny_config(tmp_path / "out", dataset="vtab:task", data_dir=str(tmp_path)))


def test_folder_dataset_name_keeps_its_case(tmp_path: Path) -> None:
    for split in ("train", "val"):
        for cls in ("a", "b"):
            _png(tmp_path / "MyData" / split / cls / "0.png", 0)
    assert load_data("folder:MyData", str(tmp_path)).num_classes == 2


@pytest.mark.parametrize(("size", "kind"), [(40, "warning"), (100, "error")])
def test_decompression_bomb_names_the_file(
    size: int, kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PIL warns above MAX_IMAGE_PIXELS and raises above twice that; both are refused (the limit is lowered here
    so that a small file plays the bomb)."""
    _png(tmp_path / "bomb.png", 0, size)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DeltaTuneError, match=r"image '.*bomb.png' is too large to decode safely"):
        load_image(str(tmp_path / "bomb.png"))


def test_split_file_label_must_be_a_class_id(tmp_path: Path) -> None:
    task = _vtab(tmp_path / "task", [0, 1])
    (task / "train800val200.txt").write_text("images/0.png -1\n")
    with pytest.raises(DeltaTuneError, match=r"line 1: expected '<image path> <class id>' \(an integer >= 0\)"):
        load_data("vtab:task", str(tmp_path))
