"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., ICLR 2022). https://arxiv.org/abs/2106.09685

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T           W (out, in) frozen
                                                               A (r, in) kaiming-uniform, B (out, r) zeros
    merged: W' = W + (alpha / r) B A

A fused qkv projection (timm's ``attn.qkv``) can get LoRA on some of its parts only (``fused_qkv="qv"``):
each part gets its own A and B, like separate q and v projections would. Convolutions (grouped and depthwise
included) get a low-rank update of their weight viewed as (out, in/groups * k*k), so they merge exactly too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.core import Applied
from deltatune.errors import DeltaTuneError
from deltatune.kernels import lora as fast_lora
from deltatune.numerics import round_to
from deltatune.registry import register, require
from deltatune.targeting import Targets, find_sites, innermost, is_delta, resolve_targets, set_module

PRESETS: dict[str, Targets] = {
    "vit": ["attn.qkv"],
    "swin": ["attn.qkv"],
    "bert": ["query", "value"],
    "hf-vit": ["query", "value", "attention.q_proj", "attention.v_proj"],  # transformers 4.x and 5.x layouts
    "convnext": ["mlp.fc1", "mlp.fc2"],
    "mixer": ["mlp_channels.fc1", "mlp_channels.fc2"],
}
ALL_LINEAR = "all-linear"


@register("lora")
@dataclass
class LoRAConfig:
    """Low-rank update ``(alpha / r) B A`` beside frozen Linear and Conv layers; merges exactly."""

    r: int = 8
    """Rank of the update."""
    alpha: float = 16.0
    """Scale numerator: the update is multiplied by alpha / r."""
    dropout: float = 0.0
    """Dropout on the LoRA branch's input."""
    target_modules: Targets | None = None
    """Sites (regex, list of names/suffixes, or "all-linear"). Default: attention qkv (q and v for HF models)."""
    exclude_modules: Targets | None = None
    """Sites to leave out (wins over target_modules)."""
    fused_qkv: str | None = None
    """For fused qkv projections: the parts that get LoRA, e.g. "qv". None: the whole layer."""

    mergeable: ClassVar[bool] = True
    identity_at_init: ClassVar[bool] = True
    name: ClassVar[str]

    def __post_init__(self) -> None:
        require(self, self.r >= 1, "r", ">= 1")
        require(self, 0.0 <= self.dropout < 1.0, "dropout", "in [0, 1)")
        if self.fused_qkv is not None and (not self.fused_qkv or set(self.fused_qkv) - set("qkv")):
            raise DeltaTuneError(f"lora: fused_qkv takes letters of 'qkv' such as 'qv', got {self.fused_qkv!r}")

    def apply(self, model: nn.Module, skip: tuple[str, ...]) -> Applied:
        """Wraps every site in a ``LoRALinear`` or ``LoRAConv``."""
        targets = resolve_targets(model, self.name, self.target_modules, PRESETS)
        if targets == ALL_LINEAR:
            targets, kinds = ".*", (nn.Linear,)
        else:
            kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
        sites = find_sites(model, self.name, targets, kinds, self.exclude_modules, skip)
        for name, module in sites:
            layer = innermost(module)
            if isinstance(layer, nn.Linear):
                parts = self._parts(name, layer)
                wrapped = LoRALinear(module, self.r, self.alpha, self.dropout, parts)
            else:
                wrapped = LoRAConv(module, self.r, self.alpha, self.dropout)
            set_module(model, name, wrapped)
        return Applied([n for n, _ in sites])

    def _parts(self, name: str, layer: nn.Linear) -> tuple[list[int], int]:
        """(chunk indices, chunk count) of the output rows that get LoRA."""
        if self.fused_qkv is None:
            return [0], 1
        if layer.out_features % 3:
            raise DeltaTuneError(
                f"lora: fused_qkv needs a fused qkv layer (out_features divisible by 3); {name} "
                f"has {layer.out_features}"
            )
        return ["qkv".index(c) for c in sorted(set(self.fused_qkv), key="qkv".index)], 3


def _kw(layer: nn.Module) -> dict:
    return {"device": layer.weight.device, "dtype": layer.weight.dtype}


class LoRALinear(nn.Module):
    """Wraps a Linear: adds a low-rank update on some or all of its output chunks."""

    delta_method = "lora"

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float, parts: tuple[list[int], int]):
        super().__init__()
        self.base, self.delta_stage, self.scaling = base, None, alpha / r
        self.merged = False  # once merged, the base holds the update and forward adds nothing
        layer = innermost(base)
        self.chunks, n_chunks = parts
        self.chunk = layer.out_features // n_chunks
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        p = len(self.chunks)
        self.lora_a = nn.Parameter(torch.empty(p * r, layer.in_features, **_kw(layer)))  # (P*r, in)
        self.lora_b = nn.Parameter(torch.zeros(p, self.chunk, r, **_kw(layer)))  # (P, C, r)
        for a in self.lora_a.view(p, r, -1):
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        rows = torch.cat([torch.arange(c * self.chunk, (c + 1) * self.chunk) for c in self.chunks])
        self.register_buffer("rows", rows, persistent=False)

    def lora_delta(self, x: Tensor) -> Tensor:
        """The update for input x: (..., P * C) on the selected output rows."""
        p, _, r = self.lora_b.shape
        h = F.linear(self.dropout(x), self.lora_a).unflatten(-1, (p, r))  # (..., P, r)
        return torch.einsum("...pr,pcr->...pc", h, self.lora_b).flatten(-2) * self.scaling  # (..., P*C)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base(x)
        if not (self.training and isinstance(self.dropout, nn.Dropout)):  # dropout changes the branch's input
            y = fast_lora.lora(self.base, x, self.lora_a, self.lora_b, tuple(self.chunks), self.scaling)
            if y is not None:
                return y
        y = self.base(x)
        if len(self.rows) == y.shape[-1]:
            return y + self.lora_delta(x)
        return y.index_add(-1, self.rows, self.lora_delta(x))

    def delta_parameters(self) -> list[nn.Parameter]:
        return [self.lora_a, self.lora_b]

    def delta_weight(self) -> Tensor:
        """``(alpha / r) B A`` for the selected rows, in float64: (P * C, in)."""
        p, _, r = self.lora_b.shape
        a = self.lora_a.detach().double().view(p, r, -1)
        return torch.bmm(self.lora_b.detach().double(), a).flatten(0, 1) * self.scaling

    @torch.no_grad()
    def merge(self) -> nn.Module | None:
        """Adds the update into the base weight (float64, rounded once) and returns the base; repeats add nothing."""
        if is_delta(self.base):
            return None
        if not self.merged:
            w = self.base.weight
            merged = w.double().index_add(0, self.rows.to(w.device), self.delta_weight().to(w.device))
            w.copy_(round_to(merged, w.dtype))
            self.merged = True
        return self.base


class LoRAConv(nn.Module):
    """Wraps a Conv: adds a low-rank update of its weight, viewed as (out, in/groups * prod(kernel))."""

    delta_method = "lora"

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float):
        super().__init__()
        self.base, self.delta_stage, self.scaling = base, None, alpha / r
        self.merged = False  # once merged, the base holds the update and forward adds nothing
        layer = innermost(base)
        fan_in = layer.weight[0].numel()
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.lora_a = nn.Parameter(torch.empty(r, fan_in, **_kw(layer)))  # (r, in/groups * k*k)
        self.lora_b = nn.Parameter(torch.zeros(layer.out_channels, r, **_kw(layer)))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base(x)
        layer = innermost(self.base)
        delta = (self.lora_b @ self.lora_a).view_as(layer.weight) * self.scaling
        return self.base(x) + layer._conv_forward(self.dropout(x), delta, None)

    def delta_parameters(self) -> list[nn.Parameter]:
        return [self.lora_a, self.lora_b]

    @torch.no_grad()
    def merge(self) -> nn.Module | None:
        """Adds the update into the base weight (float64, rounded once) and returns the base; repeats add nothing."""
        if is_delta(self.base):
            return None
        if not self.merged:
            w = self.base.weight
            delta = (self.lora_b.double() @ self.lora_a.double()).view(w.shape) * self.scaling
            w.copy_(round_to(w.double() + delta, w.dtype))
            self.merged = True
        return self.base
