"""Delta files: safetensors (no pickle) holding only the delta and head tensors, with metadata.

Metadata: format and deltatune version, the applied configs with their stages and options, the head, and a
fingerprint (class, parameter names and shapes) of the plain backbone. Loading checks everything (backbone,
methods, tensor names and shapes) before a single weight is copied, so a bad file changes nothing.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from deltatune.core import _require_state, apply, delta_state_dict, fingerprint, state_of, uncompiled, unwrap
from deltatune.errors import DeltaTuneError
from deltatune.registry import config_from_dict, config_to_dict

FORMAT = "deltatune-delta"
FORMAT_VERSION = "1"


def save_delta(model: nn.Module, path: str | os.PathLike) -> int:
    """Writes the model's deltas and head to ``path`` atomically; returns the file's size in bytes."""
    model = uncompiled(model)
    state = _require_state(model, "save_delta")
    if state.merged:
        raise DeltaTuneError(
            "save_delta: the model is merged; save deltas before merge() (a merged model is a "
            "full model: save its state_dict instead)"
        )
    from deltatune import __version__

    tensors = {k: v.contiguous().clone() for k, v in delta_state_dict(model).items()}
    stages = [{**config_to_dict(e.config), "stage": e.stage, "head": e.head} for e in state.entries]
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "deltatune_version": __version__,
        "stages": json.dumps(stages),
        "head": state.head or "",
        "fingerprint": state.fingerprint,
        "backbone_class": state.backbone_class,
        "backbone_shapes": json.dumps(state.shapes, separators=(",", ":")),
        "bn_stats": state.bn_stats,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path.stat().st_size


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a delta file, with ``stages`` decoded; raises DeltaTuneError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise DeltaTuneError(f"delta file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise DeltaTuneError(f"{str(path)!r} is not a readable safetensors file (corrupt or truncated?): {e}") from e
    if meta.get("format") != FORMAT:
        raise DeltaTuneError(f"{str(path)!r} is not a deltatune delta file (no '{FORMAT}' metadata)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DeltaTuneError(
            f"{str(path)!r} has delta format version {meta.get('format_version')!r}; this "
            f"deltatune reads version {FORMAT_VERSION}: upgrade deltatune"
        )
    try:
        meta["stages"] = json.loads(meta["stages"])
        meta["backbone_shapes"] = json.loads(meta["backbone_shapes"])
    except (KeyError, json.JSONDecodeError) as e:
        raise DeltaTuneError(f"{str(path)!r}: corrupt deltatune metadata ({e})") from e
    return meta


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise DeltaTuneError(f"{str(path)!r}: cannot read its tensors (corrupt or truncated file?): {e}") from e


def _check_backbone(model: nn.Module, meta: dict[str, Any], path: Path) -> None:
    fp, shapes = fingerprint(model)
    if fp == meta["fingerprint"]:
        return
    saved = meta["backbone_shapes"]
    diffs = [f"{k}: file {saved[k]} vs model {shapes[k]}" for k in saved if k in shapes and saved[k] != shapes[k]]
    diffs += [f"{k}: only in the file's backbone" for k in saved if k not in shapes]
    diffs += [f"{k}: only in this model" for k in shapes if k not in saved]
    raise DeltaTuneError(
        f"{str(path)!r} was saved for a different backbone ({meta['backbone_class']}) than this "
        f"{type(model).__name__}: {'; '.join(diffs[:3]) or 'class differs'}"
        f"{' ...' if len(diffs) > 3 else ''}. Load it into the backbone it was trained on (same architecture "
        f"and number of classes)"
    )


def load_delta(model: nn.Module, path: str | os.PathLike, method: str | list[str] | None = None) -> nn.Module:
    """Re-applies the file's methods to the plain backbone ``model`` and loads the delta and head tensors.

    ``method`` (optional) is what the caller expects the file to hold; a file with other methods is an error.
    """
    path, outer, model = Path(path), model, uncompiled(model)
    if state_of(model) is not None:
        raise DeltaTuneError("load_delta: the model already has deltas; pass the plain backbone")
    meta = read_metadata(path)
    names = [s["method"] for s in meta["stages"]]
    if method is not None and sorted([method] if isinstance(method, str) else method) != sorted(names):
        raise DeltaTuneError(f"{str(path)!r} holds method(s) {names}, not {method}; load the right file")
    _check_backbone(model, meta, path)
    tensors = _read_tensors(path)
    head: bool | str = meta["head"] or False
    try:
        for stage in sorted({s["stage"] for s in meta["stages"]}):
            group = [s for s in meta["stages"] if s["stage"] == stage]
            configs = [config_from_dict(s) for s in group]
            apply(model, configs, head=head if group[0]["head"] else False, bn_stats=meta.get("bn_stats", "delta"))
        _check_tensors(model, tensors, path)
    except Exception:
        unwrap(model)
        raise
    params = {**dict(model.named_buffers()), **dict(model.named_parameters())}  # BatchNorm statistics: buffers
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
    return outer


def _check_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    expected = {k: tuple(v.shape) for k, v in delta_state_dict(model).items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    wrong = [f"{k}: file {got[k]} vs model {expected[k]}" for k in expected if k in got and got[k] != expected[k]]
    if missing or extra or wrong:
        raise DeltaTuneError(
            f"{str(path)!r} does not match the deltas its own metadata describes (missing {missing[:3]}, "
            f"unexpected {extra[:3]}, wrong shapes {wrong[:3]}); the file is corrupt or was edited"
        )
