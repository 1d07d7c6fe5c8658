"""Checkpoints written by the methods' official code, loaded into timm backbones as deltatune deltas.

SSF (dongzelian/SSF, ``models/vision_transformer.py``, ``swin_transformer.py``, ``convnext.py``): each module that
holds SSF parameters names them ``ssf_scale_K`` / ``ssf_shift_K`` (K = 1, 2) and applies ``x * scale + shift``
after one of its own ops. Where each lands in timm's module names:

    ViT       blocks.i.ssf_*_1/2 -> norm1 / norm2;  attn.ssf_*_1/2 -> attn.qkv / attn.proj;  mlp.* -> fc1 / fc2
              patch_embed.ssf_*_1/2 -> patch_embed.proj / patch_embed.norm;  ssf_*_1 (model) -> norm (final)
    Swin      layers.i.blocks.j.* as ViT's blocks;  layers.i.downsample.ssf_*_1 -> layers.{i+1}.downsample.norm
              (timm moved patch merging to the start of the next stage);  patch_embed, final norm as ViT
    ConvNeXt  stages.i.blocks.j.ssf_*_1/2 -> conv_dw / norm;  stages.i.downsample.ssf_*_1/2 -> downsample.0 / .1
              stem.ssf_*_1/2 -> stem.0 / stem.1;  ssf_*_1 (model) -> norm_pre (the final feature map)

The official code trains SSF and the head with the backbone frozen, so the backbone is the pretrained one the
user's timm model already holds: ``load_official`` reads the SSF tensors and the head, and ignores the other keys.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from deltatune.core import apply, delta_modules
from deltatune.errors import DeltaTuneError
from deltatune.interop.mimi import is_mimi, load_mimi, mimi_sites
from deltatune.methods.ssf import SSFConfig
from deltatune.targeting import family, matches

KEY = re.compile(r"^(?:(?P<owner>.+)\.)?ssf_(?P<kind>scale|shift)_(?P<k>[12])$")
_MLP = (r"(.+\.mlp)", ("fc1", "fc2"))
_ATTN = (r"(.+\.attn)", ("qkv", "proj"))
_PATCH = (r"(patch_embed)", ("proj", "norm"))
# family -> [(owner regex, (site of ssf_*_1, site of ssf_*_2))]; sites are relative to the owner ("" owner: model).
SITES: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    "vit": [(r"(blocks\.\d+)", ("norm1", "norm2")), _ATTN, _MLP, _PATCH, (r"()", ("norm",))],
    "swin": [(r"(layers\.\d+\.blocks\.\d+)", ("norm1", "norm2")), _ATTN, _MLP, _PATCH, (r"()", ("norm",))],
    "convnext": [
        (r"(stages\.\d+\.blocks\.\d+)", ("conv_dw", "norm")),
        _MLP,
        (r"(stages\.\d+\.downsample)", ("0", "1")),
        (r"(stem)", ("0", "1")),
        (r"()", ("norm_pre",)),
    ],
}
HEADS = {"head.weight", "head.bias", "head.fc.weight", "head.fc.bias"}


def read_state_dict(source: dict[str, Tensor] | str | os.PathLike) -> dict[str, Tensor]:
    """A state dict given as such or as a file (safetensors, or torch.save read with weights_only=True; a
    ``model`` / ``state_dict`` / ``model_ema`` entry is unwrapped)."""
    if isinstance(source, dict):
        sd = source
    else:
        path = Path(source)
        if not path.is_file():
            raise DeltaTuneError(f"official checkpoint {str(path)!r} does not exist; give the path of the .pth file")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    return {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, Tensor)}


def official_ssf_site(fam: str, owner: str, k: int) -> str:
    """The timm module whose output the official parameter ``{owner}.ssf_*_{k}`` scales and shifts."""
    for pattern, sites in SITES[fam]:
        m = re.fullmatch(pattern, owner)
        if m and k <= len(sites):
            base = m.group(1)
            return f"{base}.{sites[k - 1]}" if base else sites[k - 1]
    if fam == "swin" and re.fullmatch(r"layers\.\d+\.downsample", owner) and k == 1:
        return f"layers.{int(owner.split('.')[1]) + 1}.downsample.norm"
    raise DeltaTuneError(f"official SSF key {owner}.ssf_*_{k}: no known {fam} site; is this an official SSF file?")


def ssf_tensors(sd: dict[str, Tensor], fam: str) -> dict[str, dict[str, Tensor]]:
    """The official SSF tensors by timm site: ``{site: {"scale": t, "shift": t}}``, each site complete."""
    sites: dict[str, dict[str, Tensor]] = {}
    for key, value in sd.items():
        m = KEY.match(key)
        if m:
            site = official_ssf_site(fam, m["owner"] or "", int(m["k"]))
            sites.setdefault(site, {})[m["kind"]] = value
    if not sites:
        raise DeltaTuneError("the state dict holds no ssf_scale_* / ssf_shift_* tensors: it is not an SSF checkpoint")
    half = [s for s, t in sites.items() if len(t) != 2]
    if half:
        raise DeltaTuneError(f"official SSF site {half[0]}: the file has only its {next(iter(sites[half[0]]))}")
    return sites


def load_official(
    model: nn.Module, state_dict: dict[str, Tensor] | str | os.PathLike, method: str | None = None
) -> nn.Module:
    """Loads a checkpoint of a method's official code into the timm ``model`` as deltatune deltas plus its head.

    ``method``: ``"ssf"`` (dongzelian/SSF: ViT, Swin, ConvNeXt) or ``"mimi"`` (IemProg/MiMi: ViT, Swin; see
    ``interop.mimi``); None: told apart by the keys. The result merges and saves like any deltatune delta.
    """
    if method not in (None, "ssf", "mimi"):
        raise DeltaTuneError(f"load_official: method {method!r} is not supported; give 'ssf', 'mimi' or None")
    sd = read_state_dict(state_dict)
    head = {k: v for k, v in sd.items() if k in HEADS}
    mimi = method == "mimi" or (method is None and is_mimi(sd))
    sites: Any = mimi_sites(model, sd) if mimi else _ssf_sites(model, sd)
    _head_params(model, head)  # everything is checked before the model is touched
    if mimi:
        load_mimi(model, sites)
    else:
        _load_ssf(model, sites)
    with torch.no_grad():
        for param, value in _head_params(model, head):
            param.copy_(value)
    return model


def _ssf_sites(model: nn.Module, sd: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """The official SSF tensors by timm site, for a model family the official code has."""
    fam = family(model)
    if fam not in SITES:
        raise DeltaTuneError(f"load_official: official SSF checkpoints are for timm ViT, Swin and ConvNeXt, not {fam}")
    return ssf_tensors(sd, fam)


def _load_ssf(model: nn.Module, sites: dict[str, dict[str, Tensor]]) -> nn.Module:
    """Applies deltatune SSF at the official checkpoint's sites and loads its scales and shifts."""
    fam = family(model)
    targets = list(sites)  # names or suffixes: leave out every other module that a short name ("norm") ends
    others = [n for n, _ in model.named_modules() if n and n not in sites and matches(n, targets)]
    apply(model, SSFConfig(target_modules=targets, exclude_modules=others), head=True)
    wrapped = dict(delta_modules(model))
    odd = [s for s in sites if s not in wrapped] + [s for s in wrapped if s not in sites]
    if odd:
        raise DeltaTuneError(f"official SSF site {odd[0]} does not match an SSF site of this {fam} model one to one")
    with torch.no_grad():
        for site, t in sites.items():
            _copy(wrapped[site].ssf_scale, t["scale"], f"{site} scale")
            _copy(wrapped[site].ssf_shift, t["shift"], f"{site} shift")
    return model


def _copy(param: Tensor, value: Tensor, what: str) -> None:
    if param.shape != value.shape:
        raise DeltaTuneError(f"official SSF {what}: shape {tuple(value.shape)} != the model's {tuple(param.shape)}")
    param.copy_(value)


def _head_params(model: nn.Module, head: dict[str, Tensor]) -> list[tuple[Tensor, Tensor]]:
    """The official head (``head`` in its ViT/Swin, ``head.fc`` in ConvNeXt) paired with timm's classifier's
    parameters; refuses a head of another shape."""
    if not head:
        return []
    if not hasattr(model, "get_classifier"):
        raise DeltaTuneError(f"load_official: official checkpoints load into timm models, not {type(model).__name__}")
    classifier, pairs = model.get_classifier(), []
    for name, value in head.items():
        param = getattr(classifier, name.rsplit(".", 1)[1])
        if param.shape != value.shape:
            raise DeltaTuneError(
                f"official {name} has shape {tuple(value.shape)}, the model's head {tuple(param.shape)}: create the"
                f" model with num_classes={value.shape[0]}"
            )
        pairs.append((param, value))
    return pairs
