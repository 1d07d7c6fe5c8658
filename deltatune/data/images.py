"""Datasets by name (torchvision, ImageFolder, VTAB-1k, FGVC, offline image and text tasks, text folders), timm
transforms and loaders.

Every mistake in the data (unknown name, missing split, empty class folder, unreadable image, malformed list
file) raises a ``DeltaTuneError`` that names the file and the fix.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torchvision
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision.transforms import v2

from deltatune.errors import DeltaTuneError
from deltatune.train.distributed import Runtime

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
MAX_CLASSES = 100_000  # more is a typo (ImageNet-21k has 21,841): a ViT-B head for 10M classes takes 30 GB
OTHER_DATASETS = ("offline:TASK", "folder", "vtab[:TASK]", "fgvc[:NAME]", "text", "synthetic")


@dataclass
class Data:
    """Train and eval sets of one task, and how to batch them."""

    train: Dataset
    eval: Dataset
    num_classes: int
    collate: Callable | None = None
    is_text: bool = False


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


class Transformed(Dataset):
    """Applies a transform to the image of each ``(image, label)`` item."""

    def __init__(self, dataset: Dataset, transform: Callable) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image, label = self.dataset[i]
        return self.transform(image), label


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


def load_data(
    name: str,
    data_dir: str = "data",
    train_split: str | None = None,
    eval_split: str | None = None,
    download: bool = True,
    seed: int = 0,
    image_size: int | None = None,
    **text_options: Any,
) -> Data:
    """The raw (untransformed) train and eval sets of a dataset given by name; see ``TrainConfig.dataset``."""
    key = name.lower()
    if key in TORCHVISION:
        return _torchvision(key, data_dir, train_split, eval_split, download)
    kind, _, arg = key.partition(":")
    given = name.partition(":")[2]  # folder names keep their case
    if _is_offline_text_task(key):
        return _offline_text(arg or key, seed, **text_options)
    if kind == "offline" or _is_offline_task(key):
        return _offline(arg or key, seed, image_size or 32)
    if kind == "synthetic":
        return _synthetic(seed, image_size or 32)
    if kind in ("folder", "imagefolder"):
        return _folder(Path(data_dir) / given if given else Path(data_dir), train_split, eval_split)
    if kind == "vtab":
        return _vtab(Path(data_dir) / given if given else Path(data_dir), train_split, eval_split)
    if kind == "fgvc":
        return _fgvc(Path(data_dir) / given if given else Path(data_dir), train_split, eval_split)
    if kind == "text":
        from deltatune.data.text import load_text

        return load_text(Path(data_dir), train_split, eval_split, **text_options)
    raise DeltaTuneError(
        f"unknown dataset {name!r}; choose a torchvision name ({', '.join(TORCHVISION)}) or one "
        f"of {', '.join(OTHER_DATASETS)}"
    )


def is_text_dataset(name: str) -> bool:
    """Whether the dataset ``name`` is text (a text folder or an offline text task): it needs a text model."""
    return name.lower() == "text" or _is_offline_text_task(name.lower())


def _is_offline_task(name: str) -> bool:
    try:
        from deltatune.offline.tasks import TASKS
    except ImportError:
        return False
    return name in TASKS


def _is_offline_text_task(name: str) -> bool:
    from deltatune.offline.text_tasks import TEXT_TASKS

    kind, _, arg = name.partition(":")
    return (arg if kind == "offline" else name) in TEXT_TASKS


def _torchvision(key: str, root: str, train_split: str | None, eval_split: str | None, download: bool) -> Data:
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


def _offline(task: str, seed: int, image_size: int) -> Data:
    from deltatune.offline.tasks import make_task

    train, test, num_classes = make_task(task, seed=seed, image_size=image_size)
    return Data(train, test, num_classes)


def _offline_text(task: str, seed: int, tokenizer: str | None = None, max_length: int = 128) -> Data:
    from deltatune.data.text import load_tokenizer, text_data
    from deltatune.offline.text_tasks import make_text_task

    tok = load_tokenizer(tokenizer)
    train, test, _ = make_text_task(task, seed)
    return text_data(train, test, tok, max_length)


def _synthetic(seed: int, size: int, n_train: int = 256, n_eval: int = 128) -> Data:
    """Noisy images tinted red, green, blue or yellow; the tint is the label (4 classes, learnable in a few steps)."""
    gen = torch.Generator().manual_seed(seed)
    tints = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 0]])

    def make(n: int) -> TensorImages:
        labels = (torch.arange(n) % len(tints))[torch.randperm(n, generator=gen)]
        images = 0.6 * torch.rand(n, 3, size, size, generator=gen) + 0.4 * tints[labels][..., None, None]
        return TensorImages(images, labels)

    return Data(make(n_train), make(n_eval), len(tints))


def _split_dir(root: Path, split: str | None, defaults: tuple[str, ...]) -> Path:
    for name in [split] if split else defaults:
        if (root / name).is_dir():
            return root / name
    raise DeltaTuneError(
        f"image folder {str(root)!r} has no {' or '.join([split] if split else defaults)} "
        "subfolder; expected ROOT/train/CLASS/*.jpg and ROOT/val/CLASS/*.jpg (or test/)"
    )


def _folder(root: Path, train_split: str | None, eval_split: str | None) -> Data:
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


def _vtab(root: Path, train_split: str | None, eval_split: str | None) -> Data:
    return _listed("VTAB-1k", VTAB_SPLITS, (train_split or "train800val200", eval_split or "test"), root, _read_list)


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


def _fgvc(root: Path, train_split: str | None, eval_split: str | None) -> Data:
    return _listed("FGVC", FGVC_SPLITS, (train_split or "trainval", eval_split or "test"), root, _read_json)


def _listed(kind: str, known: tuple[str, ...], splits: tuple[str, str], root: Path, read: Callable) -> Data:
    """Train and eval splits read from split files by ``read(root, split)``; unknown split names are refused."""
    for split in splits:
        if split not in known:
            raise DeltaTuneError(f"{kind} split {split!r} unknown; use one of {', '.join(known)}")
    train, test = (read(root, s) for s in splits)
    return Data(ListImages(train), ListImages(test), num_classes([y for _, y in train + test], f"{kind} {root}"))


def num_classes(labels: list[int], where: str) -> int:
    """1 + the largest label, after checking that labels are class ids: 0 <= label < MAX_CLASSES."""
    bad = [y for y in labels if not 0 <= y < MAX_CLASSES]
    if bad:
        raise DeltaTuneError(
            f"{where}: label {bad[0]} is not a class id; labels are integers 0 <= label < {MAX_CLASSES:,}"
            " numbering the classes from 0: fix the split files"
        )
    return 1 + max(labels)


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


def subsample(dataset: Dataset, n: int | None, seed: int) -> Dataset:
    """A seeded random subset of ``n`` items (the dataset itself when n is None or not smaller)."""
    size = len(dataset)  # type: ignore[arg-type]
    if n is None or n >= size:
        return dataset
    keep = torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return Subset(dataset, keep.tolist())


def make_transform(kind: str, training: bool, data_cfg: dict[str, Any], **timm_options: Any) -> Callable:
    """Image preprocessing: timm's (with augmentation when training), a direct resize, or normalisation only.

    Accepts PIL images and float tensors in [0, 1]; returns a normalised float tensor (3, H, W).
    """
    mean, std, size = data_cfg["mean"], data_cfg["std"], tuple(data_cfg["input_size"][-2:])
    if kind == "timm":
        import timm.data

        tf = timm.data.create_transform(
            input_size=data_cfg["input_size"],
            is_training=training,
            interpolation=data_cfg["interpolation"],
            mean=mean,
            std=std,
            crop_pct=data_cfg.get("crop_pct"),
            crop_mode=data_cfg.get("crop_mode"),
            **(timm_options if training else {}),
        )
        _keep_posterize_zero_bits(tf)
        # timm's ops (RandAugment, its Resize) want PIL images; PIL inputs pass through ToPILImage unchanged.
        return v2.Compose([v2.ToPILImage(), tf])
    ops: list[Callable] = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if kind == "resize":
        ops.append(v2.Resize(size, interpolation=_interpolation(data_cfg["interpolation"]), antialias=True))
    return v2.Compose([*ops, v2.Normalize(mean, std), v2.ToPureTensor()])


def posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize as it behaved with Pillow < 13: keeping 0 bits gives a black image (Pillow 13 refuses 0)."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    return ImageOps.posterize(img, bits_to_keep)


def _keep_posterize_zero_bits(transform: Any) -> None:
    """Routes the posterize ops of timm's RandAugment / AutoAugment inside ``transform`` through ``posterize``.

    ``rand-m9-mstd0.5`` draws magnitudes up to 10, where PosterizeIncreasing keeps 4 - 4 = 0 bits: Pillow 13 raises
    on that (about one image in 700). Clamping the magnitude (``mmax``) would change every op's distribution;
    this keeps the paper's augmentation exactly as timm applied it with older Pillow, for this transform only.
    """
    from timm.data.auto_augment import AugmentOp

    for op in getattr(transform, "ops", None) or getattr(transform, "policy", None) or []:
        for sub in op if isinstance(op, list | tuple) else [op]:
            if isinstance(sub, AugmentOp) and sub.name.startswith("Posterize"):
                sub.aug_fn = posterize
    for inner in getattr(transform, "transforms", None) or []:
        _keep_posterize_zero_bits(inner)


def _interpolation(name: str) -> v2.InterpolationMode:
    return {"bicubic": v2.InterpolationMode.BICUBIC, "nearest": v2.InterpolationMode.NEAREST}.get(
        name, v2.InterpolationMode.BILINEAR
    )


def with_transforms(data: Data, train_tf: Callable, eval_tf: Callable) -> Data:
    """``data`` with its images transformed (text data is returned as it is)."""
    if data.is_text:
        return data
    return replace(data, train=Transformed(data.train, train_tf), eval=Transformed(data.eval, eval_tf))


def make_loader(
    dataset: Dataset,
    batch_size: int,
    rt: Runtime,
    train: bool,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
    collate: Callable | None = None,
) -> DataLoader:
    """A loader over this process's share of ``dataset``.

    Training uses a DistributedSampler even in one process, so that N processes with batch B see exactly the
    batches of one process with batch N x B. Evaluation takes every world_size-th item, unpadded.
    """
    if train:
        sampler = DistributedSampler(dataset, rt.world_size, rt.rank, shuffle=True, seed=seed)
    else:
        dataset, sampler = Subset(dataset, range(rt.rank, len(dataset), rt.world_size)), None  # type: ignore[arg-type]
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=num_workers,
        drop_last=drop_last,
        collate_fn=collate,
        pin_memory=rt.device.type == "cuda",
    )
