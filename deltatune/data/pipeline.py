"""From raw datasets to batches: timm transforms (augmentation when training), seeded subsets and loaders."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision.transforms import v2

from deltatune.data.sources import Data
from deltatune.train.distributed import Runtime


class Transformed(Dataset):
    """Applies a transform to the image of each ``(image, label)`` item."""

    def __init__(self, dataset: Dataset, transform: Callable) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image, label = self.dataset[i]
        return self.transform(image), label


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
