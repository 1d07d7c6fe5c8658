"""Official SSF checkpoints (dongzelian/SSF naming) load as deltatune SSF: outputs equal the plain timm model run
with the official formula ``x * scale + shift`` hooked in at the official sites, before and after merging."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_backbone, make_input, rel_err
from torch import Tensor, nn

import deltatune
from deltatune import DeltaTuneError


def ssf_ada(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """The official formula, its channel rule included: the last dim if it fits, else dim 1 (NCHW)."""
    if x.shape[-1] == scale.shape[0]:
        return x * scale + shift
    return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)


def _block_keys(owner: str, timm: str, first: str = "norm1", second: str = "norm2") -> dict[str, str]:
    """A block's official keys (its own two sites, attention's and MLP's) -> the timm module each follows."""
    keys = {f"{owner}.ssf_%s_1": f"{timm}.{first}", f"{owner}.ssf_%s_2": f"{timm}.{second}"}
    keys |= {f"{owner}.mlp.ssf_%s_1": f"{timm}.mlp.fc1", f"{owner}.mlp.ssf_%s_2": f"{timm}.mlp.fc2"}
    if first == "norm1":
        keys |= {f"{owner}.attn.ssf_%s_1": f"{timm}.attn.qkv", f"{owner}.attn.ssf_%s_2": f"{timm}.attn.proj"}
    return keys


def _vit_keys(model: nn.Module) -> dict[str, str]:
    """Official key owner.ssf_*_K -> the timm module it follows, written out from the official ViT's forward."""
    keys = {"patch_embed.ssf_%s_1": "patch_embed.proj", "ssf_%s_1": "norm"}
    for i in range(len(model.blocks)):
        keys |= _block_keys(f"blocks.{i}", f"blocks.{i}")
    return keys


def _swin_keys(model: nn.Module) -> dict[str, str]:
    keys = {"patch_embed.ssf_%s_1": "patch_embed.proj", "patch_embed.ssf_%s_2": "patch_embed.norm", "ssf_%s_1": "norm"}
    for i, layer in enumerate(model.layers):
        for j in range(len(layer.blocks)):
            keys |= _block_keys(f"layers.{i}.blocks.{j}", f"layers.{i}.blocks.{j}")
        if i + 1 < len(model.layers):  # official: patch merging ends stage i; timm: it starts stage i + 1
            keys[f"layers.{i}.downsample.ssf_%s_1"] = f"layers.{i + 1}.downsample.norm"
    return keys


def _convnext_keys(model: nn.Module) -> dict[str, str]:
    keys = {"stem.ssf_%s_1": "stem.0", "stem.ssf_%s_2": "stem.1", "ssf_%s_1": "norm_pre"}
    for i, stage in enumerate(model.stages):
        if i:
            d = f"stages.{i}.downsample"
            keys |= {f"{d}.ssf_%s_1": f"{d}.0", f"{d}.ssf_%s_2": f"{d}.1"}
        for j in range(len(stage.blocks)):
            keys |= _block_keys(f"stages.{i}.blocks.{j}", f"stages.{i}.blocks.{j}", "conv_dw", "norm")
    return keys


KEYS = {"vit": _vit_keys, "swin": _swin_keys, "convnext": _convnext_keys}
HEAD = {"vit": "head", "swin": "head.fc", "convnext": "head.fc"}


def _out_channels(m: nn.Module) -> int:
    for attr in ("out_features", "out_channels", "normalized_shape", "num_channels"):
        if hasattr(m, attr):
            v = getattr(m, attr)
            return v[0] if isinstance(v, tuple) else v
    raise AssertionError(type(m))


def _official(kind: str, model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
    """A random official-style state dict (SSF tensors, head, and a backbone key that must be ignored)."""
    g = torch.Generator().manual_seed(3)
    sites = KEYS[kind](model)
    sd: dict[str, Tensor] = {}
    for key, site in sites.items():
        out = model.num_features if site == "norm_pre" else _out_channels(model.get_submodule(site))
        sd[key % "scale"] = 1 + 0.3 * torch.randn(out, generator=g)
        sd[key % "shift"] = 0.3 * torch.randn(out, generator=g)
    head = model.get_classifier()
    sd[f"{HEAD[kind]}.weight"] = torch.randn(head.weight.shape, generator=g)
    sd[f"{HEAD[kind]}.bias"] = torch.randn(head.bias.shape, generator=g)
    sd["blocks.0.attn.qkv.weight"] = torch.zeros(3)  # a backbone tensor: the pretrained one stays
    return sd, sites


def _reference(kind: str, sd: dict[str, Tensor], sites: dict[str, str]) -> Tensor:
    """The plain model (float64) with the official head and the official formula hooked in after each site."""
    model = make_backbone(kind).double()
    head = model.get_classifier()
    with torch.no_grad():
        head.weight.copy_(sd[f"{HEAD[kind]}.weight"])
        head.bias.copy_(sd[f"{HEAD[kind]}.bias"])
    for key, site in sites.items():
        scale, shift = sd[key % "scale"].double(), sd[key % "shift"].double()
        model.get_submodule(site).register_forward_hook(lambda m, i, o, s=scale, t=shift: ssf_ada(o, s, t))
    with torch.no_grad():
        return model(make_input(kind).double())


@pytest.mark.parametrize("kind", ["vit", "swin", "convnext"])
def test_official_ssf_checkpoint_gives_the_official_forward_and_merges(kind: str, tmp_path: Path) -> None:
    model = make_backbone(kind)
    sd, sites = _official(kind, model)
    expected = _reference(kind, sd, sites)
    path = tmp_path / "official.pth"
    torch.save({"model": sd}, path)
    tuned = deltatune.load_official(model, path).eval()
    x = make_input(kind)
    with torch.no_grad():
        assert rel_err(tuned(x).double(), expected) < 1e-5
        deltatune.save_delta(tuned, tmp_path / "delta.safetensors")
        reloaded = deltatune.load_delta(make_backbone(kind), tmp_path / "delta.safetensors").eval()
        assert torch.equal(reloaded(x), tuned(x))
        assert rel_err(deltatune.merge(tuned)(x).double(), expected) < 1e-5


def test_half_a_site_or_an_unknown_owner_is_refused() -> None:
    sd, _ = _official("vit", make_backbone("vit"))
    with pytest.raises(DeltaTuneError, match="only its scale"):
        deltatune.load_official(make_backbone("vit"), {k: v for k, v in sd.items() if k != "blocks.0.ssf_shift_1"})
    with pytest.raises(DeltaTuneError, match="no known vit site"):
        deltatune.load_official(make_backbone("vit"), {**sd, "blocks.0.foo.ssf_scale_1": torch.ones(3)})
    with pytest.raises(DeltaTuneError, match="not an SSF checkpoint"):
        deltatune.load_official(make_backbone("vit"), {"head.weight": torch.ones(5, 3)})
