"""Datasets by name, image and text, with timm transforms and loaders."""

from deltatune.data.images import (
    Data,
    TensorImages,
    check_classes,
    is_text_dataset,
    load_data,
    load_image,
    make_loader,
    make_transform,
    num_classes,
    posterize,
    subsample,
    with_transforms,
)

__all__ = [
    "Data",
    "TensorImages",
    "check_classes",
    "is_text_dataset",
    "load_data",
    "load_image",
    "make_loader",
    "make_transform",
    "num_classes",
    "posterize",
    "subsample",
    "with_transforms",
]
