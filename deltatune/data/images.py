"""Image datasets by name: torchvision, ImageFolder, VTAB-1k, FGVC, offline and synthetic tasks.

Every mistake in the data (unknown name, missing split, empty class folder, unreadable image, malformed list
file) raises a ``DeltaTuneError`` that names the file and the fix.
"""

from __future__ import annotations

import functools
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from deltatune.data.sources import Data, Request, add_source, fixed, num_classes, register_source
from deltatune.data.text import TEXT_TASKS, offline_text
from deltatune.errors import DeltaTuneError
from deltatune.offline.tasks import TASKS, make_task

# name: (torchvision class, classes, default train split, default eval split); None splits: a train=bool flag.
TORCHVISION: dict[str, tuple[str, int, str | None, str | None]] = {
    "cifar10": ("CIFAR10", 10, None, None),
    "cifar100": ("CIFAR100", 100, None, None),
    "mnist": ("MNIST", 10, None, None),
    "fashion-mnist": ("FashionMNIST", 10, None, None),
    "svhn": ("SVHN", 10, "train", "test"),
    "flowers102": ("Flowers102", 102, "train", "test"),
    "food101": ("Food101", 101, "train", "test"),
    "dtd": ("DTD", 47, "train", "test"),
    "oxford-pets": ("OxfordIIITPet", 37, "trainval", "test"),
    "stanford-cars": ("StanfordCars", 196, "train", "test"),
    "fgvc-aircraft": ("FGVCAircraft", 100, "trainval", "test"),
    "stl10": ("STL10", 10, "train", "test"),
    "gtsrb": ("GTSRB", 43, "train", "test"),
    "country211": ("Country211", 211, "train", "test"),
}


VTAB_SPLITS = ("train800", "val200", "train800val200", "test")
FGVC_SPLITS = ("train", "val", "trainval", "test")


class TensorImages(Dataset):
    """Images held in one tensor (N, 3, H, W) in [0, 1], served as ``(image, int label)``."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i], int(self.labels[i])


class ListImages(Dataset):
    """Images listed with their labels (VTAB-1k list files, VPT's FGVC json files), read on access."""

    def __init__(self, samples: list[tuple[str, int]]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        path, label = self.samples[i]
        return load_image(path), label


def load_image(path: str) -> Image.Image:
    """Opens an image as RGB; an unreadable file or a decompression bomb (more pixels than PIL's
    ``Image.MAX_IMAGE_PIXELS``: a small file that would fill the memory) raises a DeltaTuneError naming it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with open(path, "rb") as f:
                return Image.open(f).convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DeltaTuneError(
            f"image {path!r} is too large to decode safely ({e}); shrink or remove it (or raise "
            "PIL.Image.MAX_IMAGE_PIXELS if you trust the file)"
        ) from None
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DeltaTuneError(
            f"cannot read image {path!r} ({e}); replace the file or remove it from the dataset"
        ) from None


def _torchvision(key: str, arg: str, req: Request) -> Data:
    """A torchvision dataset (downloaded into --data-dir unless --no-download)."""
    root, train_split, eval_split, download = req.data_dir, req.train_split, req.eval_split, req.download
    cls_name, num_classes, default_train, default_eval = TORCHVISION[key]
    cls = getattr(torchvision.datasets, cls_name)

    def make(split: str | None, default: str | None, train: bool) -> Dataset:
        if default is None:  # a train=True/False dataset
            if split not in (None, "train", "test"):
                raise DeltaTuneError(f"{key} has only the splits train and test, not {split!r}")
            kwargs: dict[str, Any] = {"train": train if split is None else split == "train"}
        else:
            kwargs = {"split": split or default}
        try:
            return cls(root, download=download, **kwargs)
        except (RuntimeError, OSError, ValueError) as e:
            how = "the download failed (offline?)" if download else "it is not there and download is off"
            raise DeltaTuneError(
                f"cannot load {key} ({cls_name}, {kwargs}) from {root!r}: {how}: {e}. Put the "
                "dataset files in --data-dir (see the torchvision docs for the layout) or allow "
                "--download with network access"
            ) from e

    return Data(make(train_split, default_train, True), make(eval_split, default_eval, False), num_classes)


@register_source("offline", "offline:TASK")
def _offline(task: str, req: Request) -> Data:
    """A bundled offline task: an image task, or a text one (see ``data.text``)."""
    if task.lower() in TEXT_TASKS:
        return offline_text(task, req)
    train, test, num_classes = make_task(task.lower(), seed=req.seed, image_size=req.image_size or 32)
    return Data(train, test, num_classes)


for _task in TASKS:
    add_source(_task, fixed(_offline, _task), shown="")
for _name in TORCHVISION:
    add_source(_name, functools.partial(_torchvision, _name))


@register_source("synthetic")
def _synthetic(arg: str, req: Request, n_train: int = 256, n_eval: int = 128) -> Data:
    """Noisy images tinted red, green, blue or yellow; the tint is the label (4 classes, learnable in a few steps)."""
    gen, size = torch.Generator().manual_seed(req.seed), req.image_size or 32
    tints = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 0]])

    def make(n: int) -> TensorImages:
        labels = (torch.arange(n) % len(tints))[torch.randperm(n, generator=gen)]
        images = 0.6 * torch.rand(n, 3, size, size, generator=gen) + 0.4 * tints[labels][..., None, None]
        return TensorImages(images, labels)

    return Data(make(n_train), make(n_eval), len(tints))


def _root(arg: str, req: Request) -> Path:
    """``--data-dir``, or the folder ARG inside it (as written: folder names keep their case)."""
    return Path(req.data_dir) / arg if arg else Path(req.data_dir)


def _split_dir(root: Path, split: str | None, defaults: tuple[str, ...]) -> Path:
    for name in [split] if split else defaults:
        if (root / name).is_dir():
            return root / name
    raise DeltaTuneError(
        f"image folder {str(root)!r} has no {' or '.join([split] if split else defaults)} "
        "subfolder; expected ROOT/train/CLASS/*.jpg and ROOT/val/CLASS/*.jpg (or test/)"
    )


@register_source("folder")
@register_source("imagefolder", "")
def _folder(arg: str, req: Request) -> Data:
    """An ImageFolder: ``--data-dir[/ARG]`` with train/ and val/ (or test/) class folders."""
    root, train_split, eval_split = _root(arg, req), req.train_split, req.eval_split
    sets = []
    for folder in (_split_dir(root, train_split, ("train",)), _split_dir(root, eval_split, ("val", "test"))):
        try:
            sets.append(torchvision.datasets.ImageFolder(str(folder), loader=load_image))
        except FileNotFoundError as e:
            raise DeltaTuneError(
                f"image folder {str(folder)!r}: {e}. Every class folder needs at least one image "
                "(.jpg, .png, ...): add images or remove the empty class folder"
            ) from None
    train, val = sets
    if train.class_to_idx != val.class_to_idx:
        only = sorted(set(train.classes) ^ set(val.classes))
        raise DeltaTuneError(
            f"image folder {str(root)!r}: train and eval have different classes ({only[:5]}); "
            "give both splits the same class folders"
        )
    return Data(train, val, len(train.classes))


def _read_list(root: Path, split: str) -> list[tuple[str, int]]:
    path = root / f"{split}.txt"
    if not path.is_file():
        tasks = sorted(p.parent.name for p in root.glob("*/train800val200.txt"))
        hint = f" It holds VTAB tasks: use --dataset vtab:{tasks[0]} (one of {', '.join(tasks)})." if tasks else ""
        raise DeltaTuneError(
            f"VTAB-1k folder {str(root)!r} has no {path.name}. Expected the SSF/NOAH layout: TASK/{{train800, "
            f"val200, train800val200, test}}.txt with lines '<image path relative to TASK> <label>'.{hint}"
        )
    samples = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].isdigit():
            raise DeltaTuneError(
                f"{str(path)!r} line {n}: expected '<image path> <class id>' (an integer >= 0), got {line!r}"
            )
        samples.append((str(root / parts[0]), int(parts[1])))
    _check_files(samples, path)
    return samples


def _check_files(samples: list[tuple[str, int]], listed_in: Path) -> None:
    if not samples:
        raise DeltaTuneError(f"{str(listed_in)!r} lists no images; regenerate the split file")
    missing = [p for p, _ in samples if not Path(p).is_file()]
    if missing:
        raise DeltaTuneError(
            f"{len(missing)} image(s) listed in {str(listed_in)!r} do not exist, e.g. "
            f"{missing[0]!r}; paths are relative to {str(listed_in.parent)!r}"
        )


@register_source("vtab", "vtab[:TASK]")
def _vtab(arg: str, req: Request) -> Data:
    """A VTAB-1k task from its list files (the SSF/NOAH layout)."""
    splits = (req.train_split or "train800val200", req.eval_split or "test")
    return _listed("VTAB-1k", VTAB_SPLITS, splits, _root(arg, req), _read_list)


def _read_json(root: Path, split: str) -> list[tuple[str, int]]:
    if split == "trainval":
        return _read_json(root, "train") + _read_json(root, "val")
    path = root / f"{split}.json"
    if not path.is_file():
        raise DeltaTuneError(
            f"FGVC folder {str(root)!r} has no {path.name}; expected VPT's split files "
            "train.json, val.json and test.json mapping '<image path>': <class id>"
        )
    try:
        mapping = json.loads(path.read_text())
        items = [(str(k), int(v)) for k, v in mapping.items()]
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError) as e:
        raise DeltaTuneError(f"{str(path)!r} must map image paths to integer class ids: {e}") from None
    if not items:
        raise DeltaTuneError(f"{str(path)!r} lists no images")
    # VPT's json paths are relative to the dataset's image folder (CUB, NABirds: images/, Dogs: Images/).
    base = next((root / d for d in ("", "images", "Images") if (root / d / items[0][0]).is_file()), root)
    samples = [(str(base / p), y) for p, y in items]
    _check_files(samples, path)
    return samples


@register_source("fgvc", "fgvc[:NAME]")
def _fgvc(arg: str, req: Request) -> Data:
    """An FGVC dataset from VPT's json split files."""
    splits = (req.train_split or "trainval", req.eval_split or "test")
    return _listed("FGVC", FGVC_SPLITS, splits, _root(arg, req), _read_json)


def _listed(kind: str, known: tuple[str, ...], splits: tuple[str, str], root: Path, read: Callable) -> Data:
    """Train and eval splits read from split files by ``read(root, split)``; unknown split names are refused."""
    for split in splits:
        if split not in known:
            raise DeltaTuneError(f"{kind} split {split!r} unknown; use one of {', '.join(known)}")
    train, test = (read(root, s) for s in splits)
    return Data(ListImages(train), ListImages(test), num_classes([y for _, y in train + test], f"{kind} {root}"))


def check_classes(data: Data, where: str) -> None:
    """Refuses a task with fewer than two classes (or whose training split holds one label): it cannot be learnt."""
    labels = train_labels(data.train)
    distinct = len(set(labels)) if labels is not None else data.num_classes
    if data.num_classes < 2 or distinct < 2:
        raise DeltaTuneError(
            f"{where}: the training split has {min(distinct, data.num_classes)} class(es); a classifier needs at"
            " least 2 (a one-class task scores 100% by always answering it): add the other classes' data"
        )


def train_labels(dataset: Dataset) -> list[int] | None:
    """The labels of a dataset that holds them apart from its images (None when only reading every item would tell)."""
    if isinstance(dataset, ListImages):
        return [y for _, y in dataset.samples]
    if isinstance(dataset, TensorImages):
        return dataset.labels.tolist()
    targets = getattr(dataset, "targets", None) or getattr(dataset, "labels", None)
    return list(targets) if isinstance(targets, list) else None
