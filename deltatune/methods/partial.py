"""Partial fine-tuning baselines: the attention weights, the MLP weights, or the norms' affine parameters train.

- ``attn-only`` and ``mlp-only``: Touvron et al., "Three things everyone should know about Vision Transformers"
  (ECCV 2022, https://arxiv.org/abs/2203.09795), used as baselines by MiMi (https://arxiv.org/abs/2311.03873):
  every parameter of every block's attention (qkv, proj, relative position bias) or MLP (fc1, fc2) trains.
- ``layernorm``: only the normalisation layers' affine parameters (``gamma``, ``beta``) train, as in
  "Tuning LayerNorm in Attention" (Zhao et al., ICLR 2024, https://arxiv.org/abs/2312.11420).

They add nothing: ``theta' = theta`` for frozen tensors and ``theta' = theta + dtheta`` for the selected ones, which
are the backbone's own, so nothing is left to merge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from deltatune._layers import rms_norm_types
from deltatune.core import Applied, delta_modules
from deltatune.errors import DeltaTuneError
from deltatune.registry import register
from deltatune.targeting import Targets, innermost, iter_sites, matches, resolve_targets

ATTN_PRESETS: dict[str, Targets] = {
    "vit": ["attn"],
    "swin": ["attn"],
    "bert": r".*attention\.self|.*attention\.output\.dense",
    "hf-vit": r".*layers\.\d+\.attention",  # transformers 5.x ViT: q_proj, k_proj, v_proj, o_proj
    "llama": ["self_attn"],
    "gpt2": ["attn"],
    "t5": ["SelfAttention", "EncDecAttention"],
}
MLP_PRESETS: dict[str, Targets] = {
    "vit": ["mlp"],
    "swin": ["mlp"],
    "convnext": ["mlp"],
    "mixer": ["mlp_tokens", "mlp_channels"],
    "bert": r".*intermediate\.dense|.*layer\.\d+\.output\.dense",
    "hf-vit": r".*layers\.\d+\.mlp",
    "llama": ["mlp"],
    "gpt2": ["mlp"],
    "t5": ["DenseReluDense"],
}
NORM_OPS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.RMSNorm)


def select(
    model: nn.Module, method: str, targets: Targets, skip: tuple[str, ...], kinds: tuple[type, ...] = (nn.Module,)
) -> Applied:
    """The backbone's own parameters inside every module matched by ``targets`` (deltas of other methods excluded)."""
    added = {id(p) for _, m in delta_modules(model) for p in m.delta_parameters()}
    sites, params = [], {}
    for name, module in iter_sites(model):
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        if not matches(name, targets) or not isinstance(innermost(module), kinds):
            continue
        own = [p for p in module.parameters() if id(p) not in added]
        if own:
            sites.append(name)
            params.update((id(p), p) for p in own)
    if not params:
        raise DeltaTuneError(
            f"{method}: target_modules={targets!r} matched no module with parameters in {type(model).__name__}; "
            f"name the modules to train with target_modules=[...]"
        )
    return Applied(sites, list(params.values()))


@register("attn-only")
@dataclass
class AttnOnlyConfig:
    """Partial fine-tuning: every block's attention weights train (all else frozen but the head)."""

    target_modules: Targets | None = None
    """Attention modules whose parameters train. Default: the family's attention modules."""

    mergeable: ClassVar[bool] = True
    families: ClassVar[frozenset[str] | None] = frozenset(ATTN_PRESETS)  # attention blocks
    identity_at_init: ClassVar[bool] = True
    name: ClassVar[str]

    def apply(self, model: nn.Module, skip: tuple[str, ...]) -> Applied:
        return select(model, self.name, resolve_targets(model, self.name, self.target_modules, ATTN_PRESETS), skip)


@register("mlp-only")
@dataclass
class MLPOnlyConfig:
    """Partial fine-tuning: every block's MLP weights train (all else frozen but the head)."""

    target_modules: Targets | None = None
    """MLP modules whose parameters train. Default: the family's MLP modules."""

    mergeable: ClassVar[bool] = True
    identity_at_init: ClassVar[bool] = True
    name: ClassVar[str]

    def apply(self, model: nn.Module, skip: tuple[str, ...]) -> Applied:
        return select(model, self.name, resolve_targets(model, self.name, self.target_modules, MLP_PRESETS), skip)


@register("layernorm")
@dataclass
class LayerNormConfig:
    """Only the affine parameters of the normalisation layers (LayerNorm, GroupNorm, BatchNorm, RMSNorm) train."""

    target_modules: Targets | None = None
    """Norm layers to train (regex or list of names/suffixes). Default: every norm layer outside the head."""

    mergeable: ClassVar[bool] = True
    families: ClassVar[frozenset[str] | None] = None  # any model: it needs no preset
    identity_at_init: ClassVar[bool] = True
    name: ClassVar[str]

    def apply(self, model: nn.Module, skip: tuple[str, ...]) -> Applied:
        targets = self.target_modules if self.target_modules is not None else ".*"
        return select(model, self.name, targets, skip, NORM_OPS + rms_norm_types(model))  # + Llama/T5 RMSNorms
