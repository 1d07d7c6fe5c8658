"""Data sources by name, registered like methods: ``@register_source("folder")`` in the source's own file.

``--dataset KIND:ARG`` runs the source registered as KIND with ARG exactly as the user wrote it (folder names keep
their case); a name without a colon runs the source registered under that whole name (``cifar100``, ``digits``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import Dataset

from deltatune.errors import DeltaTuneError

MAX_CLASSES = 100_000  # more is a typo (ImageNet-21k has 21,841): a ViT-B head for 10M classes takes 30 GB


@dataclass
class Data:
    """Train and eval sets of one task, and how to batch them."""

    train: Dataset
    eval: Dataset
    num_classes: int
    collate: Callable | None = None
    is_text: bool = False
    task: str = "classify"
    """What the loss and evaluation do: "classify" (cross-entropy on labels, top-1) or "causal-lm" (next-token
    cross-entropy on the inputs themselves, perplexity)."""


@dataclass
class Request:
    """Where and how a source loads its data (the ``deltatune train`` data options)."""

    data_dir: str = "data"
    train_split: str | None = None
    eval_split: str | None = None
    download: bool = True
    seed: int = 0
    image_size: int | None = None
    text_options: dict[str, Any] = field(default_factory=dict)


Source = Callable[[str, Request], Data]
_SOURCES: dict[str, Source] = {}
_HELP: dict[str, str] = {}


def add_source(name: str, source: Source, shown: str | None = None) -> None:
    """Registers ``source(arg, request) -> Data`` under ``name``; ``shown``: how the error message lists it ("": not
    at all; None: by its name)."""
    key = name.lower()
    if key in _SOURCES:
        raise RuntimeError(f"data source {name!r} registered twice")
    _SOURCES[key] = source
    if shown is not None:
        _HELP[key] = shown


def fixed(source: Callable[[str, Request], Data], arg: str) -> Source:
    """A source that always loads ``arg`` (a dataset known by its bare name: ``digits`` is ``offline:digits``)."""
    return lambda _arg, request: source(arg, request)


def register_source(name: str, shown: str | None = None) -> Callable[[Source], Source]:
    """Function decorator: registers a data source under ``name`` (listed as ``shown``, default ``name``)."""

    def wrap(source: Source) -> Source:
        add_source(name, source, name if shown is None else shown)
        return source

    return wrap


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
    request = Request(data_dir, train_split, eval_split, download, seed, image_size, text_options)
    kind, colon, arg = name.partition(":")
    source = _SOURCES.get(kind.lower()) if colon else _SOURCES.get(name.lower())
    if source is None:
        plain = [k for k in _SOURCES if k not in _HELP]
        raise DeltaTuneError(
            f"unknown dataset {name!r}; choose one of {', '.join(plain)} or {', '.join(h for h in _HELP.values() if h)}"
        )
    return source(arg, request)


def num_classes(labels: list[int], where: str) -> int:
    """1 + the largest label, after checking that labels are class ids: 0 <= label < MAX_CLASSES."""
    bad = [y for y in labels if not 0 <= y < MAX_CLASSES]
    if bad:
        raise DeltaTuneError(
            f"{where}: label {bad[0]} is not a class id; labels are integers 0 <= label < {MAX_CLASSES:,}"
            " numbering the classes from 0: fix the split files"
        )
    return 1 + max(labels)
