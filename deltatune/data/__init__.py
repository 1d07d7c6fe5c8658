"""Datasets by name (sources registered like methods), image and text, with timm transforms and loaders.

A new source is a function ``source(arg, request) -> Data`` decorated with ``@register_source("name")`` in
``images.py``, ``text.py`` or its own module imported here.
"""

from deltatune.data.images import TensorImages, check_classes, load_image
from deltatune.data.lm import CAUSAL_LM
from deltatune.data.pipeline import make_loader, make_transform, posterize, subsample, with_transforms
from deltatune.data.sources import Data, Request, load_data, num_classes, register_source
from deltatune.data.text import is_text_dataset

__all__ = [
    "CAUSAL_LM",
    "Data",
    "Request",
    "TensorImages",
    "check_classes",
    "is_text_dataset",
    "load_data",
    "load_image",
    "make_loader",
    "make_transform",
    "num_classes",
    "posterize",
    "register_source",
    "subsample",
    "with_transforms",
]
