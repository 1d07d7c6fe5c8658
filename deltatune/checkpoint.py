"""Delta files: safetensors (no pickle) holding only the delta and head tensors, with metadata.

Metadata: format and deltatune version, the applied configs with their stages, options and resolved sites (exact
module names, never a pattern), the head, the plain backbone's class, parameter shapes and a hash of each frozen
backbone tensor's values, timm's pretrained tag, and a sha256 digest of all of it and the tensors. ``load_delta``
checks everything before a single module of the model is changed, so a refused file leaves the model as it was:

1. the file is a regular, readable safetensors file in a format version this deltatune reads;
2. its digest matches its metadata and tensor bytes (version 1 files, which have none, skip this);
3. its tensors are float16/bfloat16/float32/float64 and finite;
4. the method entries are well formed and every option has its annotated type (``registry.validate_options``);
5. the backbone's class and parameter names and shapes are those it was saved for;
6. its methods rebuilt on a meta-device copy of the model (no memory allocated) create exactly the file's tensor
   names, shapes and dtype kinds;
7. the backbone's frozen parameters have the values it was trained on (``check_backbone="shapes"`` skips this).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltatune import __version__
from deltatune import _deltafile as fmt
from deltatune.core import (
    _require_state,
    apply,
    delta_modules,
    delta_state_dict,
    fingerprint,
    state_of,
    uncompiled,
    unwrap,
)
from deltatune.errors import DeltaTuneError
from deltatune.protocols import StoredForm, hooks
from deltatune.registry import config_from_dict, config_to_dict
from deltatune.targeting import innermost

CHECKS = ("values", "shapes")
MAX_STAGES = 64


def stored_form(model: nn.Module) -> nn.Module:
    """What the model's delta file holds: the model, or the copy a config's ``stored_form`` hook makes of it."""
    state = state_of(uncompiled(model))
    for config in hooks([e.config for e in state.entries] if state else [], StoredForm):
        model = config.stored_form(model) or model
    return model


def save_delta(model: nn.Module, path: str | os.PathLike, classes: Sequence[str] | None = None) -> int:
    """Writes the model's deltas and head to ``path`` atomically; returns the file's size in bytes.

    A method may store another form (``protocols.StoredForm``): prefix tuning's reparameterising MLP is stored
    folded (the per-layer prefixes it computes; outputs identical). Saving the same model twice gives the same
    bytes. ``classes`` (optional) names the head's outputs in order; ``deltatune.predict`` answers with them
    (``read_metadata(path)["classes"]``).
    """
    model = uncompiled(model)
    state = _require_state(model, "save_delta")
    if state.merged:
        _refuse_folded(model, state)
    model = stored_form(model)
    state = state_of(model)
    delta = delta_state_dict(model)
    tensors = {k: v.detach().cpu().contiguous() for k, v in delta.items()}
    live = model.state_dict(keep_vars=True)
    trained = {id(live[k]) for k in delta}
    metadata = {
        "format": fmt.FORMAT,
        "format_version": fmt.VERSION,
        "deltatune_version": __version__,
        "stages": _dumps([_stage(e) for e in state.entries]),
        "head": state.head or "",
        "fingerprint": state.fingerprint,
        "backbone_class": state.backbone_class,
        "backbone_shapes": _dumps(state.shapes),
        "backbone_values": _dumps([[n, tensor_hash(p)] for n, p in plain_parameters(model) if id(p) not in trained]),
        "pretrained": pretrained_tag(model),
        "bn_stats": state.bn_stats,
    }
    if classes is not None:
        metadata["classes"] = _dumps(_check_classes(classes))
    return fmt.write(Path(path), tensors, metadata)


def _check_classes(classes: Sequence[str]) -> list[str]:
    """Class names as stored: a list of text, one per head output."""
    if isinstance(classes, str) or not all(isinstance(c, str) for c in classes):
        raise DeltaTuneError(f"save_delta: classes must be a list of names (text), got {str(classes)[:80]!r}")
    return list(classes)


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _stage(entry: Any) -> dict[str, Any]:
    """One applied config as stored: its sites resolved to exact module names, so loading matches no pattern."""
    options = config_to_dict(entry.config)["options"]
    if "target_modules" in options:
        options["target_modules"] = list(entry.sites)
    if "exclude_modules" in options:
        options["exclude_modules"] = None
    return {"method": entry.config.name, "options": options, "stage": entry.stage, "head": entry.head}


def _refuse_folded(model: nn.Module, state: Any) -> None:
    """After ``merge``, a delta file can still hold what stayed a delta; refuses if merge folded any away."""
    live = {(m.delta_method, m.delta_stage) for _, m in delta_modules(model)}
    gone = [e for e in state.entries if e.sites and not e.selected and (e.config.name, e.stage) not in live]
    folded = [e.config.name for e in gone]
    if folded:
        raise DeltaTuneError(
            f"save_delta: merge() folded {', '.join(folded)} into the backbone's weights, so a delta file could no "
            f"longer rebuild this model from the plain backbone; call save_delta before merge(), or save the merged "
            f"model's state_dict"
        )


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a delta file (integrity checked), with ``stages`` decoded; raises DeltaTuneError otherwise."""
    path = Path(path)
    meta, _ = fmt.read(path)
    out = {**meta, "stages": _stages(meta, path), "backbone_shapes": fmt.decode(meta, "backbone_shapes", path)}
    if "classes" in meta:
        out["classes"] = fmt.decode(meta, "classes", path)
    return out


def _stages(meta: dict[str, str], path: Path) -> list[dict[str, Any]]:
    """The file's method entries, each checked for shape (configs are built, and so validated, when applied)."""
    stages = fmt.decode(meta, "stages", path)
    if not isinstance(stages, list) or not 0 < len(stages) <= MAX_STAGES:
        raise DeltaTuneError(f"{str(path)!r}: corrupt metadata: 'stages' must list 1 to {MAX_STAGES} methods")
    for s in stages:
        if not isinstance(s, dict) or type(s.get("stage")) is not int or type(s.get("head")) is not bool:
            raise DeltaTuneError(f"{str(path)!r}: corrupt metadata: a stage entry is {str(s)[:80]!r}")
        config_from_dict(s)  # types of every option, before anything is built
        targets = s["options"].get("target_modules")
        if meta.get("format_version") != "1" and not (targets is None or isinstance(targets, list)):
            raise DeltaTuneError(f"{str(path)!r}: corrupt metadata: target_modules must list module names")
    return stages


def load_delta(
    model: nn.Module,
    path: str | os.PathLike,
    method: str | list[str] | None = None,
    check_backbone: str = "values",
    delta_dtype: torch.dtype | str | None = None,
) -> nn.Module:
    """Re-applies the file's methods to the plain backbone ``model`` and loads the delta and head tensors.

    ``method`` (optional) is what the caller expects the file to hold; a file with other methods is an error.
    ``check_backbone="shapes"`` accepts a backbone whose frozen values differ from the one the file was trained
    on (same architecture): only for deliberate transfers, the outputs will differ from the trained model's.
    ``delta_dtype`` keeps the loaded deltas in that dtype (float32 ones beside a bfloat16 backbone), as ``apply``.
    """
    path, outer, model = Path(path), model, uncompiled(model)
    if check_backbone not in CHECKS:
        raise DeltaTuneError(f"load_delta: check_backbone must be one of {CHECKS}, got {check_backbone!r}")
    if state_of(model) is not None:
        raise DeltaTuneError("load_delta: the model already has deltas; pass the plain backbone")
    meta, tensors = fmt.read(path)
    stages = _stages(meta, path)
    names = [s["method"] for s in stages]
    if method is not None and sorted([method] if isinstance(method, str) else method) != sorted(names):
        raise DeltaTuneError(f"{str(path)!r} holds method(s) {names}, not {method}; load the right file")
    head: bool | str = meta.get("head") or False
    bn_stats = meta.get("bn_stats", "delta")
    _check_shapes(model, meta, path)
    trained = _dry_run(model, stages, head, bn_stats, tensors, path)
    if check_backbone == "values" and "backbone_values" in meta:
        _check_values(model, meta, trained, path)
    try:
        _apply_stages(model, stages, head, bn_stats, delta_dtype)
        targets = model.state_dict(keep_vars=True)
        with torch.no_grad():
            for name, tensor in tensors.items():
                targets[name].copy_(tensor)
    except Exception:
        unwrap(model)
        raise
    return outer


def _apply_stages(
    model: nn.Module, stages: list[dict[str, Any]], head: bool | str, bn_stats: str, delta_dtype: Any = None
) -> None:
    for stage in sorted({s["stage"] for s in stages}):
        group = [s for s in stages if s["stage"] == stage]
        configs = [config_from_dict(s) for s in group]
        apply(model, configs, head=head if group[0]["head"] else False, bn_stats=bn_stats, delta_dtype=delta_dtype)


def _check_shapes(model: nn.Module, meta: dict[str, str], path: Path) -> None:
    fp, shapes = fingerprint(model)
    if fp == meta.get("fingerprint"):
        return
    saved = fmt.decode(meta, "backbone_shapes", path)
    if not isinstance(saved, dict):
        raise DeltaTuneError(f"{str(path)!r}: corrupt metadata: backbone_shapes is not a table of shapes")
    diffs = [f"{k}: file {saved[k]} vs model {shapes[k]}" for k in saved if k in shapes and saved[k] != shapes[k]]
    diffs += [f"{k}: only in the file's backbone" for k in saved if k not in shapes]
    diffs += [f"{k}: only in this model" for k in shapes if k not in saved]
    raise DeltaTuneError(
        f"{str(path)!r} was saved for a different backbone ({str(meta.get('backbone_class'))[:80]}) than this "
        f"{type(model).__name__}: {'; '.join(diffs[:3]) or 'class differs'}"
        f"{' ...' if len(diffs) > 3 else ''}. Load it into the backbone it was trained on (same architecture "
        f"and number of classes)"
    )


def _dry_run(
    model: nn.Module,
    stages: list[dict[str, Any]],
    head: bool | str,
    bn_stats: str,
    tensors: dict[str, torch.Tensor],
    path: Path,
) -> set[str]:
    """Rebuilds the file's methods on a meta-device copy (nothing allocated, the model untouched) and checks the
    file's tensors against what they create; returns the backbone names of the parameters the file trains."""
    ghost = meta_copy(model)
    try:
        _apply_stages(ghost, stages, head, bn_stats)
    except Exception as e:  # any failure to rebuild a file's methods is the file's problem, never a crash
        detail = str(e) if isinstance(e, DeltaTuneError) else f"{type(e).__name__}: {e}"
        raise DeltaTuneError(f"{str(path)!r}: its methods cannot be rebuilt on this model: {detail[:300]}") from e
    live = ghost.state_dict(keep_vars=True)
    expected = {k: live[k] for k in delta_state_dict(ghost)}
    _check_tensors(expected, tensors, path)
    ids = {id(t) for t in expected.values()}
    return {n for n, p in plain_parameters(ghost) if id(p) in ids}


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of the model whose parameters and buffers live on the meta device: shapes and dtypes, no data.

    Each module is copied shallowly with its own dicts (children, parameters, buffers, hooks), so building deltas
    on the copy never reaches the model; other attributes are shared read-only. Much faster than a deepcopy.
    """
    done: dict[int, Any] = {}

    def fake(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in done:
            meta = torch.empty_like(t, device="meta")
            done[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
        return done[id(t)]

    def clone(module: nn.Module) -> nn.Module:
        if id(module) not in done:
            new = object.__new__(type(module))
            new.__dict__ = {k: v.copy() if isinstance(v, dict) else v for k, v in module.__dict__.items()}
            done[id(module)] = new
            for table, convert in (("_parameters", fake), ("_buffers", fake), ("_modules", clone)):
                entries = new.__dict__[table]
                for k, v in entries.items():
                    entries[k] = None if v is None else convert(v)
        return done[id(module)]

    return clone(model)


def _check_tensors(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], path: Path) -> None:
    """The file holds exactly the tensors its methods create, with their shapes and a dtype that casts exactly."""
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    shared = [k for k in expected if k in got]
    wrong = [f"{k}: file {list(got[k].shape)} vs model {list(expected[k].shape)}" for k in shared]
    wrong = [w for k, w in zip(shared, wrong) if got[k].shape != expected[k].shape]
    if missing or extra or wrong:
        raise DeltaTuneError(
            f"{str(path)!r} does not match the deltas its own metadata describes (missing {missing[:3]}, "
            f"unexpected {extra[:3]}, wrong shapes {wrong[:3]}); the file is corrupt or was edited"
        )
    for k in shared:
        want, have = expected[k].dtype, got[k].dtype
        if (have not in fmt.FLOATS) if want.is_floating_point else have != want:
            raise DeltaTuneError(f"{str(path)!r}: {k} is stored as {have}, the model holds it as {want}")


def plain_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """The backbone's own parameters by their names in the plain backbone, seen through any delta wrappers."""
    seen: set[int] = set()

    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Parameter]]:
        module = innermost(module)
        for name, p in module._parameters.items():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                yield prefix + name, p
        for name, child in module._modules.items():
            if child is not None:
                yield from walk(child, f"{prefix}{name}.")

    yield from walk(model, "")


def tensor_hash(t: torch.Tensor) -> str:
    """A short sha256 of a tensor's dtype, shape and bytes."""
    h = hashlib.sha256(f"{t.dtype}{list(t.shape)}".encode())
    h.update(fmt.tensor_bytes(t))
    return h.hexdigest()[:16]


def pretrained_tag(model: nn.Module) -> str:
    """timm's pretrained weights tag (hub id, else architecture.tag) or an HF model's name; '' if none."""
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict):
        return str(cfg.get("hf_hub_id") or ".".join(str(cfg[k]) for k in ("architecture", "tag") if cfg.get(k)))
    return str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")


def _check_values(model: nn.Module, meta: dict[str, str], trained: set[str], path: Path) -> None:
    """Refuses a backbone whose frozen parameters differ from the one the file was trained on, naming the first."""
    saved = fmt.decode(meta, "backbone_values", path)
    if not isinstance(saved, list) or not all(isinstance(x, list) and len(x) == 2 for x in saved):
        raise DeltaTuneError(f"{str(path)!r}: corrupt metadata: backbone_values is not a list of [name, hash]")
    want = {str(n): h for n, h in saved}
    for name, p in plain_parameters(model):
        if name in trained:
            continue
        if want.get(name) != tensor_hash(p):
            tags = f" (file: {meta.get('pretrained') or 'no tag'}; model: {pretrained_tag(model) or 'no tag'})"
            raise DeltaTuneError(
                f"{str(path)!r} was trained on other backbone weights: {name} differs{tags}. Load it into the "
                f"backbone it was trained on, or pass check_backbone='shapes' to use it on these weights anyway"
            )
