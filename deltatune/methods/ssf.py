"""SSF: Scaling and Shifting your Features (Lian et al., NeurIPS 2022). https://arxiv.org/abs/2210.08823

After every linear, conv and norm op, ``y = x * scale + shift`` over the channel dim; scale ~ N(1, 0.02),
shift ~ N(0, 0.02). Every site follows a linear op, so it folds into that op exactly::

    W'[i] = scale_i * W[i]        b' = scale * b + shift        (norm affine: w' = scale * w)

and the merged network is the plain architecture with no extra parameters or FLOPs. GPT-2's Conv1D (weight stored
(in, out)) folds through its transpose. An RMSNorm (Llama, Qwen2, Mistral, T5) has a weight and no bias, and its
class's forward has no place for one: SSF there is scale-only (no ``ssf_shift``), which folds exactly into the
weight; the shift after it is carried by the next linear's SSF. A norm with a built-in
activation (timm's ``BatchNormAct2d``, ``GroupNormAct``, ``LayerNormAct``...) is scaled between its norm and its
drop/act, where its affine sits, so the fold stays exact there too. One exception: ConvNeXt's last
site acts on the final feature map (official ``forward_features``: after the last stage's residual add, before the
pooling and the head's LayerNorm; timm's ``norm_pre``, an Identity). No op precedes it (a residual add) and the
head's LayerNorm mixes channels, so no fold is exact: ``merge`` leaves that one SSF in place and warns naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune._layers import features, is_conv1d, is_rms_norm, linear_types, out_in, rms_norm_types
from deltatune.core import Applied
from deltatune.kernels import ssf as fast
from deltatune.numerics import round_to
from deltatune.registry import register
from deltatune.targeting import (
    Targets,
    family,
    find_sites,
    get_module_or_none,
    innermost,
    is_delta,
    matches,
    resolve_targets,
    set_module,
)

LINEAR_OPS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORM_OPS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# The paper's sites are every linear/conv/norm op but the head; Swin's patch-merging reduction is not one.
PRESETS: dict[str, Targets] = {"*": ".*"}
# ConvNeXt: the final SSF acts on the feature map before pooling (FEATURE_MAPS), not after it on the head's norm.
EXCLUDE: dict[str, Targets] = {"swin": ["downsample.reduction"], "convnext": ["head.norm"]}
# Sites on a feature map with no layer of their own (timm keeps an Identity there): family -> module name.
FEATURE_MAPS: dict[str, str] = {"convnext": "norm_pre"}


@register("ssf")
@dataclass
class SSFConfig:
    """Scale and shift the output of every linear, conv and norm layer (the paper's sites by default)."""

    target_modules: Targets | None = None
    """Sites: a regex over whole names, or a list of names/suffixes. Default: every supported layer but the head."""
    exclude_modules: Targets | None = None
    """Sites to leave out (wins over target_modules). Default: the family's exclusions (Swin: downsample.reduction)."""
    init_std: float = 0.02
    """Std of the init: scale ~ N(1, std), shift ~ N(0, std)."""

    mergeable: ClassVar[bool] = True
    families: ClassVar[frozenset[str] | None] = None  # any model: it needs no preset
    name: ClassVar[str]

    def apply(self, model: nn.Module, skip: tuple[str, ...]) -> Applied:
        """Wraps every site in an ``SSF`` module."""
        targets = resolve_targets(model, self.name, self.target_modules, PRESETS)
        exclude = self.exclude_modules if self.exclude_modules is not None else EXCLUDE.get(family(model) or "")
        kinds = LINEAR_OPS + linear_types() + NORM_OPS + rms_norm_types(model)
        sites = find_sites(model, self.name, targets, kinds, exclude, skip)
        for name, module in sites:
            set_module(model, name, SSF(module, self.init_std))
        return Applied([n for n, _ in sites] + _feature_map_site(model, self, targets, exclude, skip))


def _feature_map_site(model: nn.Module, cfg: SSFConfig, targets: Targets, exclude: Targets | None, skip) -> list[str]:
    """Wraps the family's final feature map (an Identity in timm) in an SSF over ``num_features`` NCHW channels."""
    name = FEATURE_MAPS.get(family(model) or "")
    module = get_module_or_none(model, name) if name else None
    if not isinstance(module, nn.Identity) or not matches(name, targets) or (exclude and matches(name, exclude)):
        return []  # (head_norm_first ConvNeXts have a LayerNorm2d there: an ordinary, foldable site)
    if any(name == s or name.startswith(s + ".") for s in skip):
        return []
    ref = next(model.parameters())
    set_module(model, name, SSF(module, cfg.init_std, channels=model.num_features, like=ref))
    return [name]


def channel_dim(layer: nn.Module) -> int:
    """The dim of a layer's output that holds its channels: last for Linear/LayerNorm, 1 for NCHW layers."""
    if isinstance(layer, nn.Linear) or is_conv1d(layer) or is_rms_norm(layer):
        return -1
    if isinstance(layer, nn.LayerNorm) and not type(layer).__name__.endswith("2d"):
        return -1
    return 1  # convs, batch/group norms and timm's channels-first LayerNorm2d / LayerNormAct2d


def has_act(layer: nn.Module) -> bool:
    """A norm with a built-in drop or activation after its affine (timm's norm-act layers)."""
    return isinstance(layer, NORM_OPS) and any(
        not isinstance(getattr(layer, n, None), (nn.Identity, type(None))) for n in ("drop", "act")
    )


def norm_part(layer: nn.Module, x: Tensor) -> Tensor:
    """A norm-act layer's normalisation and affine, without its drop and act: the torch norm it extends."""
    if isinstance(layer, nn.LayerNorm) and channel_dim(layer) == 1:  # LayerNormAct2d: normalises NHWC
        y = F.layer_norm(x.permute(0, 2, 3, 1), layer.normalized_shape, layer.weight, layer.bias, layer.eps)
        return y.permute(0, 3, 1, 2)
    torch_norm = next(c for c in type(layer).__mro__ if c in NORM_OPS)
    return torch_norm.forward(layer, x)


def out_channels(layer: nn.Module) -> int:
    """Number of output channels of a supported layer."""
    if isinstance(layer, nn.Linear) or is_conv1d(layer):
        return features(layer)[1]
    if is_rms_norm(layer):
        return layer.weight.shape[0] if layer.weight is not None else layer.normalized_shape[-1]
    if isinstance(layer, LINEAR_OPS):
        return layer.out_channels
    if isinstance(layer, nn.LayerNorm):
        if len(layer.normalized_shape) != 1:
            raise ValueError("SSF supports LayerNorm over one dim only")
        return layer.normalized_shape[0]
    if isinstance(layer, nn.GroupNorm):
        return layer.num_channels
    return layer.num_features


def ssf_affine(y: Tensor, scale: Tensor, shift: Tensor | None, dim: int) -> Tensor:
    """``y * scale + shift`` with scale/shift broadcast along channel ``dim`` (no shift: ``y * scale``)."""
    if dim != -1 and dim != y.ndim - 1:
        shape = [1] * y.ndim
        shape[dim] = -1
        scale, shift = scale.view(shape), shift if shift is None else shift.view(shape)
    return y * scale if shift is None else torch.addcmul(shift, y, scale)


class SSF(nn.Module):
    """Wraps a layer: its output is scaled and shifted per channel."""

    delta_method = "ssf"

    def __init__(
        self, base: nn.Module, init_std: float = 0.02, channels: int | None = None, like: Tensor | None = None
    ) -> None:
        """``channels``/``like``: for a base without weights (a feature map's Identity: NCHW), its channels and a
        tensor whose device and dtype the SSF takes."""
        super().__init__()
        self.base = base
        self.delta_stage: int | None = None
        self.merged = False  # once merged, the base holds scale and shift and forward adds nothing
        self.norm_act = not is_delta(base) and has_act(base)  # scale between the norm and its act
        layer = innermost(base)
        self.dim = channel_dim(layer)
        ref = next(layer.parameters(), like)
        kw = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
        channels = channels or out_channels(layer)
        self.mergeable = not isinstance(layer, nn.Identity)  # a feature map's SSF has no layer to fold into
        self.ssf_scale = nn.Parameter(torch.empty(channels, **kw).normal_(1.0, init_std))
        # An RMSNorm has no bias to fold a shift into (and adding one changes its class's forward): scale only.
        shift = None if is_rms_norm(layer) else nn.Parameter(torch.empty(channels, **kw).normal_(0.0, init_std))
        self.register_parameter("ssf_shift", shift)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base(x)
        if self.norm_act:
            y = ssf_affine(norm_part(self.base, x), self.ssf_scale, self.ssf_shift, self.dim)
            return self.base.act(getattr(self.base, "drop", nn.Identity())(y))
        y = None if self.ssf_shift is None else fast.ssf(self.base, x, self.ssf_scale, self.ssf_shift)
        if y is not None:  # folded into a frozen Linear/LayerNorm
            return y
        return ssf_affine(self.base(x), self.ssf_scale, self.ssf_shift, self.dim)

    def delta_parameters(self) -> list[nn.Parameter]:
        return [self.ssf_scale] if self.ssf_shift is None else [self.ssf_scale, self.ssf_shift]

    def merge(self) -> nn.Module | None:
        """Folds scale and shift into the base layer and returns it (None if the base is another delta, or a feature
        map's Identity that has nothing to fold into); repeats fold nothing more."""
        if is_delta(self.base) or not self.mergeable:
            return None
        if not self.merged:
            fold(self.base, self.ssf_scale.detach(), None if self.ssf_shift is None else self.ssf_shift.detach())
            self.merged = True
        return self.base


@torch.no_grad()
def fold(layer: nn.Module, scale: Tensor, shift: Tensor | None) -> None:
    """In place: ``layer(x) * scale + shift`` becomes ``layer(x)``; computed in float64, rounded once.

    No shift (an RMSNorm): only the weight is scaled and no bias is added. Conv1D's (in, out) weight is scaled
    through its (out, in) view."""
    weight = out_in(layer) if is_conv1d(layer) else layer.weight
    ref = weight if weight is not None else scale
    if shift is None:
        if weight is None:
            layer.weight = nn.Parameter(round_to(scale.double(), ref.dtype), requires_grad=False)
        else:
            weight.copy_(round_to(weight.double() * scale.double(), weight.dtype))
        return
    s, t = scale.double(), shift.double()
    bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(s)
    new_bias = round_to(bias * s + t, ref.dtype)
    if weight is None:  # a norm without affine gains one
        layer.weight = nn.Parameter(round_to(s, ref.dtype), requires_grad=False)
    else:
        view = [-1] + [1] * (weight.ndim - 1)
        weight.copy_(round_to(weight.double() * s.view(view), weight.dtype))
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias, requires_grad=False)
    else:
        layer.bias.copy_(new_bias)
