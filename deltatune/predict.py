"""Inference with a trained delta: a backbone and a delta file (or a ``deltatune train`` run folder) in, the top-k
classes by name with their probabilities out, for an image, a folder of images or a text file (one text per line).

    import deltatune
    preds = deltatune.predict("runs/ssf-20250101-120000", "photos/", top_k=5)        # a run folder
    preds = deltatune.predict("deltatune_offline_vit", "digit.png", delta="ssf.safetensors")
    preds[0].labels, preds[0].scores                                               # names, probabilities

    deltatune predict runs/ssf-20250101-120000 photos/ --top-k 3
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from deltatune.backbones import create_backbone, data_config, forward, hf_name, is_text_model
from deltatune.checkpoint import load_delta, read_metadata
from deltatune.data import load_image, make_transform
from deltatune.data.text import load_tokenizer
from deltatune.errors import DeltaTuneError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
RUN_DELTA = "delta.safetensors"


@dataclass
class Prediction:
    """The top-k answer for one input: class names, softmax probabilities and class indices, best first."""

    input: str
    labels: list[str]
    scores: list[float]
    indices: list[int]

    def to_dict(self) -> dict[str, Any]:
        """Plain values (JSON-ready)."""
        return asdict(self)


@dataclass
class Predictor:
    """A tuned model in eval mode with what turns raw inputs into its batches."""

    model: nn.Module
    classes: list[str]
    model_name: str = ""
    transform: str = "timm"
    img_size: int | None = None
    tokenizer: str | None = None
    max_length: int = 128


def load_predictor(
    source: str | os.PathLike | nn.Module,
    delta: str | os.PathLike | None = None,
    classes: Sequence[str] | None = None,
    transform: str | None = None,
) -> Predictor:
    """A ready model from a run folder, a backbone name with ``delta``, a delta file alone (backbone named in it),
    or a module (tuned, or plain with ``delta``)."""
    if isinstance(source, nn.Module):
        if delta is not None:
            from deltatune.checkpoint import load_delta, read_metadata

            load_delta(source, delta)
            classes = classes or read_metadata(delta).get("classes")
        return Predictor(source.eval(), _class_list(source, classes), transform=transform or "timm")
    path = Path(source)
    run: dict[str, Any] = {}
    if path.is_dir():
        run = _run_config(path)
        delta, name = delta or path / RUN_DELTA, run.get("model", "")
    elif path.suffix == ".safetensors" and path.is_file():
        delta, name = path, ""
    else:
        name = str(source)
    if delta is None:
        raise DeltaTuneError(f"predict: {str(source)!r} is a backbone name; pass its delta file too (delta=...)")
    return _from_delta(Path(delta), name, run, classes, transform)


def _run_config(folder: Path) -> dict[str, Any]:
    """A run folder's config.yaml (what built its backbone and preprocessing)."""
    if not (folder / RUN_DELTA).is_file():
        raise DeltaTuneError(
            f"predict: {str(folder)!r} holds no {RUN_DELTA}: pass a finished `deltatune train` run folder or a delta"
            " file"
        )
    config = folder / "config.yaml"
    return (yaml.safe_load(config.read_text()) or {}) if config.is_file() else {}


def _from_delta(
    delta: Path, name: str, run: dict[str, Any], classes: Sequence[str] | None, transform: str | None
) -> Predictor:

    meta = read_metadata(delta)
    if not name:
        name = meta.get("pretrained", "").removeprefix("timm/")
        if not name:
            raise DeltaTuneError(f"predict: {str(delta)!r} does not name its backbone; pass the backbone's name")
    classes = list(classes or meta.get("classes") or [])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run.get("seed", 0))  # a random-init backbone is rebuilt as training built it
        model = create_backbone(
            name,
            len(classes) or _head_size(delta, meta),
            run.get("pretrained", True),
            run.get("checkpoint"),
            run.get("img_size"),
            **(run.get("model_kwargs") or {}),
        )
    load_delta(model, delta)
    return Predictor(
        model.eval(),
        _class_list(model, classes),
        name,
        transform or run.get("eval_transform") or "timm",
        run.get("img_size"),
        run.get("tokenizer"),
        run.get("max_length", 128),
    )


def _head_size(delta: Path, meta: dict[str, Any]) -> int:
    """The number of classes of a file without names: its head's output size."""
    from safetensors import safe_open

    head = meta.get("head") or ""
    with safe_open(str(delta), framework="pt") as f:
        if head and f"{head}.weight" in f.keys():
            return int(f.get_slice(f"{head}.weight").get_shape()[0])
    raise DeltaTuneError(f"predict: {str(delta)!r} holds no trained head and no class names; pass classes=[...]")


def _class_list(model: nn.Module, classes: Sequence[str] | None) -> list[str]:
    n = _num_outputs(model)
    names = [str(c) for c in classes] if classes else [str(i) for i in range(n)]
    if n and len(names) != n:
        raise DeltaTuneError(f"predict: {len(names)} class names for a head of {n} outputs; pass one name per class")
    return names


def _num_outputs(model: nn.Module) -> int:
    getter = getattr(model, "get_classifier", None)
    head = getter() if callable(getter) else getattr(model, "classifier", None)
    return int(getattr(head, "out_features", 0) or getattr(getattr(model, "config", None), "num_labels", 0) or 0)


def predict(
    model: str | os.PathLike | nn.Module | Predictor,
    inputs: Any,
    top_k: int = 5,
    delta: str | os.PathLike | None = None,
    classes: Sequence[str] | None = None,
    transform: str | None = None,
    batch_size: int = 64,
) -> list[Prediction]:
    """Top-k predictions, one per input, in input order (a folder's images sorted by name).

    Args:
        model: A run folder, a delta file, a backbone name (with ``delta``), a tuned module, or a Predictor.
        inputs: An image file, a folder of images, a .txt file (one text per line, text backbones), a list of
            those paths, PIL images or texts, or a preprocessed batch tensor (N, C, H, W).
        top_k: How many classes per input (at most the number of classes).
        delta: The delta file, when ``model`` is a backbone name or a plain module.
        classes: Class names, overriding the ones the delta file records.
        transform: Image preprocessing (timm or resize); default: the run's evaluation preprocessing, else timm.
        batch_size: Inputs per forward pass.
    """
    p = model if isinstance(model, Predictor) else load_predictor(model, delta, classes, transform)
    if top_k < 1:
        raise DeltaTuneError(f"predict: top_k must be >= 1, got {top_k}")
    names, items = _gather(inputs, _is_text(p))
    out: list[Prediction] = []
    for start in range(0, len(items), batch_size):
        probs = _probabilities(p, items[start : start + batch_size])
        scores, idx = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
        for name, s, i in zip(names[start : start + batch_size], scores.tolist(), idx.tolist()):
            out.append(Prediction(name, [p.classes[j] for j in i], s, i))
    return out


def _is_text(p: Predictor) -> bool:

    return is_text_model(p.model_name) if p.model_name else hasattr(getattr(p.model, "config", None), "vocab_size")


def _gather(inputs: Any, text: bool) -> tuple[list[str], list[Any]]:
    """Names (for the output) and raw items (paths, images, texts, or tensors) of ``inputs``."""
    if isinstance(inputs, torch.Tensor):
        batch = inputs if inputs.dim() == 4 else inputs[None]
        return [f"#{i}" for i in range(len(batch))], list(batch)
    if isinstance(inputs, str | os.PathLike) or not isinstance(inputs, Sequence):
        inputs = [inputs]
    names, items = [], []
    for x in inputs:
        if isinstance(x, str | os.PathLike) and Path(x).exists():
            for name, item in _expand(Path(x), text):
                names.append(name)
                items.append(item)
        elif isinstance(x, str) and text:
            names.append(x)
            items.append(x)
        elif isinstance(x, str | os.PathLike):
            raise DeltaTuneError(f"predict: {str(x)!r} does not exist; pass an image file, a folder or a text file")
        else:
            names.append(f"#{len(names)}")
            items.append(x)
    if not items:
        raise DeltaTuneError(f"predict: no inputs found in {inputs!r} (images: {', '.join(IMAGE_SUFFIXES)})")
    return names, items


def _expand(path: Path, text: bool) -> list[tuple[str, Any]]:
    """A folder's images (sorted), a text file's non-empty lines, or one image file."""
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        return [(str(f), str(f)) for f in files]
    if text or path.suffix.lower() == ".txt":
        if not text:
            raise DeltaTuneError(f"predict: {str(path)!r} is a text file but the backbone takes images")
        lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
        return [(ln, ln) for ln in lines]
    return [(str(path), str(path))]


@torch.no_grad()
def _probabilities(p: Predictor, items: list[Any]) -> torch.Tensor:
    """Softmax over the classes for one batch of raw items."""

    device = next(p.model.parameters()).device
    batch = _texts(p, items) if _is_text(p) else _images(p, items)
    batch = {k: v.to(device) for k, v in batch.items()} if isinstance(batch, dict) else batch.to(device)
    return forward(p.model, batch).float().softmax(-1).cpu()


def _images(p: Predictor, items: list[Any]) -> torch.Tensor:
    """Paths, PIL images or (C, H, W) tensors as one preprocessed batch (B, C, H, W)."""

    if all(isinstance(x, torch.Tensor) for x in items):
        return torch.stack(items)
    tf = image_transform(p.model, p.transform, p.img_size)
    return torch.stack([tf(load_image(x) if isinstance(x, str) else x) for x in items])


def image_transform(model: torch.nn.Module, kind: str, img_size: int | None = None) -> Any:
    """The evaluation preprocessing a run used (``eval_transform``), for a user's images: PIL image -> (3, H, W).

    "none" kept the training images' size; a user's images need resizing to the backbone's input instead.
    """
    return make_transform("resize" if kind == "none" else kind, False, data_config(model, img_size))


def run_transform(delta: str | Path) -> str:
    """The evaluation preprocessing recorded in the run folder beside a delta file (timm's when there is none)."""
    return _run_config(Path(delta).parent).get("eval_transform") or "timm"


def _texts(p: Predictor, items: list[str]) -> dict[str, torch.Tensor]:

    name = p.tokenizer or (hf_name(p.model_name) if p.model_name else getattr(p.model, "name_or_path", None))
    tok = load_tokenizer(name)
    return dict(tok(items, padding=True, truncation=True, max_length=p.max_length, return_tensors="pt"))


def add_parser(sub: Any) -> None:
    """``deltatune predict RUN_OR_DELTA INPUT...``: the subcommand beside train, demo and bench."""
    parser = sub.add_parser(
        "predict",
        help="top-k classes for images or texts with a trained delta (a run folder or a delta file)",
        description="Loads the backbone and a delta file (or a `deltatune train` run folder: config.yaml and "
        "delta.safetensors), and prints the top-k classes, by the names the delta file records, with their "
        "probabilities for each image (a file or a folder of them) or each line of a .txt file (text backbones).",
    )
    parser.add_argument("source", help="a run folder, or a delta file (.safetensors)")
    parser.add_argument("inputs", nargs="+", help="image files, folders of images, or .txt files (one text a line)")
    parser.add_argument("--model", default=None, help="backbone name (default: the run's, else the file's)")
    parser.add_argument("--top-k", type=int, default=5, help="classes per input (default: 5)")
    parser.add_argument("--transform", default=None, help="image preprocessing: timm or resize (default: the run's)")
    parser.add_argument("--batch-size", type=int, default=64, help="inputs per forward pass (default: 64)")
    parser.add_argument("--json", action="store_true", help="one JSON object per input instead of text lines")
    parser.set_defaults(func=_run_predict)


def _run_predict(ns: Any) -> int:
    import json

    source, delta = ns.source, None
    if ns.model:
        source, delta = ns.model, Path(ns.source) / RUN_DELTA if Path(ns.source).is_dir() else ns.source
    preds = predict(source, ns.inputs, ns.top_k, delta=delta, transform=ns.transform, batch_size=ns.batch_size)
    for pr in preds:
        if ns.json:
            print(json.dumps(pr.to_dict()))
        else:
            answers = "  ".join(f"{label} {score:.3f}" for label, score in zip(pr.labels, pr.scores))
            print(f"{pr.input}: {answers}")
    return 0
