"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., ICLR 2022). https://arxiv.org/abs/2106.09685

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T           W (out, in) frozen
                                                               A (r, in) kaiming-uniform, B (out, r) zeros
    merged: W' = W + (alpha / r) B A

``LoRALinear`` is that formula, on a Linear or on GPT-2's Conv1D (weight stored (in, out): the update is merged
into its transpose). A fused qkv projection (timm's ``attn.qkv``, GPT-2's ``c_attn``) can get LoRA on some of its
parts only (``fused_qkv="qv"``): ``LoRAFusedQKV`` gives each part its own A and B, like separate q and v
projections would. With ``rslora`` the scale is alpha / sqrt(r). Convolutions (grouped and depthwise
included) get a low-rank update of their weight viewed as (out, in/groups * k*k), so they merge exactly too.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune._layers import features, linear_types, out_in
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
    "llama": ["q_proj", "v_proj"],  # Llama, Qwen2, Mistral: the paper's (and peft's) q and v
    "gpt2": ["attn.c_attn"],  # GPT-2's fused qkv Conv1D
    "t5": ["SelfAttention.q", "SelfAttention.v", "EncDecAttention.q", "EncDecAttention.v"],
}
ALL_LINEAR = "all-linear"


@register("lora")
@dataclass
class LoRAConfig:
    """Low-rank update ``(alpha / r) B A`` beside frozen Linear (and Conv1D, Conv) layers; merges exactly."""

    r: int = 8
    """Rank of the update."""
    alpha: float = 16.0
    """Scale numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with rslora)."""
    dropout: float = 0.0
    """Dropout on the LoRA branch's input."""
    target_modules: Targets | None = None
    """Sites (regex, list of names/suffixes, or "all-linear"). Default: attention qkv (q and v for HF models)."""
    exclude_modules: Targets | None = None
    """Sites to leave out (wins over target_modules)."""
    fused_qkv: str | None = None
    """For fused qkv projections: the parts that get LoRA, e.g. "qv". None: the whole layer."""
    rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski 2023, peft's use_rslora) instead of alpha / r."""
    rank_pattern: dict[str, int] | None = None
    """Per-site ranks: a key (regex) matching the end of a site's name after a dot, as peft's, overrides r."""
    alpha_pattern: dict[str, float] | None = None
    """Per-site alphas, keyed like rank_pattern; overrides alpha."""

    mergeable: ClassVar[bool] = True
    identity_at_init: ClassVar[bool] = True
    name: ClassVar[str]

    def __post_init__(self) -> None:
        require(self, self.r >= 1, "r", ">= 1")
        require(self, all(r >= 1 for r in (self.rank_pattern or {}).values()), "rank_pattern", "ranks >= 1")
        require(self, 0.0 <= self.dropout < 1.0, "dropout", "in [0, 1)")
        if self.fused_qkv is not None and (not self.fused_qkv or set(self.fused_qkv) - set("qkv")):
            raise DeltaTuneError(f"lora: fused_qkv takes letters of 'qkv' such as 'qv', got {self.fused_qkv!r}")

    def apply(self, model: nn.Module, skip: tuple[str, ...]) -> Applied:
        """Wraps every site in a ``LoRALinear`` (``LoRAFusedQKV`` with fused_qkv) or ``LoRAConv``."""
        targets = resolve_targets(model, self.name, self.target_modules, PRESETS)
        if targets == ALL_LINEAR:
            targets, kinds = ".*", linear_types()
        else:
            kinds = (*linear_types(), nn.Conv1d, nn.Conv2d, nn.Conv3d)
        sites = find_sites(model, self.name, targets, kinds, self.exclude_modules, skip)
        for name, module in sites:
            layer = innermost(module)
            r, alpha = _pattern(name, self.rank_pattern, self.r), _pattern(name, self.alpha_pattern, self.alpha)
            if isinstance(layer, nn.Conv1d | nn.Conv2d | nn.Conv3d):
                wrapped = LoRAConv(module, r, alpha, self.dropout, self.rslora)
            elif self.fused_qkv is None:
                wrapped = LoRALinear(module, r, alpha, self.dropout, rslora=self.rslora)
            else:
                wrapped = LoRAFusedQKV(module, r, alpha, self.dropout, self._parts(name, layer), self.rslora)
            set_module(model, name, wrapped)
        return Applied([n for n, _ in sites])

    def _parts(self, name: str, layer: nn.Module) -> tuple[list[int], int]:
        """(chunk indices, chunk count) of the output rows that get LoRA."""
        out = features(layer)[1]
        if out % 3:
            raise DeltaTuneError(
                f"lora: fused_qkv needs a fused qkv layer (out_features divisible by 3); {name} has {out}"
            )
        return ["qkv".index(c) for c in sorted(set(self.fused_qkv or ""), key="qkv".index)], 3


def _pattern(name: str, pattern: dict[str, Any] | None, default: Any) -> Any:
    """The value of the first key of ``pattern`` matching the end of ``name`` (after a dot), as peft's; else default."""
    for key, value in (pattern or {}).items():
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", name):
            return value
    return default


def _kw(layer: nn.Module) -> dict:
    return {"device": layer.weight.device, "dtype": layer.weight.dtype}


def _kaiming(a: Tensor) -> None:
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))


class LoRALinear(nn.Module):
    """Wraps a Linear (or GPT-2's Conv1D): ``y = base(x) + (alpha / r) dropout(x) A^T B^T``.

    B (out, r) is stored as ``lora_b`` of shape (1, out, r): the layout delta files have always had, shared with
    ``LoRAFusedQKV``'s (P, C, r). ``parts`` is kept for callers of the time when one class did both: a fused
    ``parts`` (say ``([0, 2], 3)``) builds a ``LoRAFusedQKV``.
    """

    delta_method = "lora"
    chunks: tuple[int, ...] = (0,)  # the output parts that carry LoRA: here the whole output

    def __new__(cls, *args: Any, parts: tuple[list[int], int] | None = None, **kw: Any) -> LoRALinear:
        parts = args[4] if len(args) > 4 else parts
        fused = parts is not None and (list(parts[0]), parts[1]) != ([0], 1)
        return super().__new__(LoRAFusedQKV if cls is LoRALinear and fused else cls)

    def __init__(
        self,
        base: nn.Module,
        r: int,
        alpha: float,
        dropout: float,
        parts: tuple[list[int], int] | None = None,
        rslora: bool = False,
    ):
        super().__init__()
        self.base, self.delta_stage, self.scaling = base, None, alpha / (math.sqrt(r) if rslora else r)
        self.merged = False  # once merged, the base holds the update and forward adds nothing
        n_in, out = features(innermost(base))
        self.chunk = out  # the rows one part covers (all of them)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.lora_a = nn.Parameter(torch.empty(r, n_in, **_kw(innermost(base))))  # A (r, in)
        self.lora_b = nn.Parameter(torch.zeros(1, out, r, **_kw(innermost(base))))  # B (out, r), stored (1, out, r)
        _kaiming(self.lora_a)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base(x)
        if not (self.training and isinstance(self.dropout, nn.Dropout)):  # dropout changes the branch's input
            y = fast_lora.lora(self.base, x, self.lora_a, self.lora_b, self.chunks, self.scaling)
            if y is not None:
                return y
        return self.base(x) + self.lora_delta(x)

    def lora_delta(self, x: Tensor) -> Tensor:
        """The update for input x: ``s B A x`` over every output row, (..., out)."""
        return F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b[0]) * self.scaling

    def delta_parameters(self) -> list[nn.Parameter]:
        return [self.lora_a, self.lora_b]

    def delta_weight(self) -> Tensor:
        """``(alpha / r) B A`` in float64: (out, in)."""
        return self.lora_b[0].detach().double() @ self.lora_a.detach().double() * self.scaling

    @torch.no_grad()
    def merge(self) -> nn.Module | None:
        """Adds the update into the base weight (float64, rounded once) and returns the base; repeats add nothing."""
        if is_delta(self.base):
            return None
        if not self.merged:
            w = out_in(self.base)  # (out, in); a view for Conv1D, so the copy lands in its (in, out) weight
            w.copy_(round_to(w.double() + self.delta_weight().to(w.device), w.dtype))
            self.merged = True
        return self.base


class LoRAFusedQKV(LoRALinear):
    """Wraps a fused qkv projection: each selected part (q, k or v) gets its own A and B, like separate projections.

    ``lora_a`` is (P*r, in) and ``lora_b`` (P, C, r) for P parts of C output rows each. Shares only the type with
    ``LoRALinear`` (so code that looks for LoRA linears finds it); every method is its own.
    """

    def __init__(
        self, base: nn.Module, r: int, alpha: float, dropout: float, parts: tuple[list[int], int], rslora: bool = False
    ):
        nn.Module.__init__(self)
        self.base, self.delta_stage, self.scaling = base, None, alpha / (math.sqrt(r) if rslora else r)
        self.merged = False
        n_in, out = features(innermost(base))
        chunks, n_chunks = parts
        self.chunks, self.chunk = tuple(chunks), out // n_chunks
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        p = len(self.chunks)
        self.lora_a = nn.Parameter(torch.empty(p * r, n_in, **_kw(innermost(base))))  # (P*r, in)
        self.lora_b = nn.Parameter(torch.zeros(p, self.chunk, r, **_kw(innermost(base))))  # (P, C, r)
        for a in self.lora_a.view(p, r, -1):
            _kaiming(a)
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
        if not (self.training and isinstance(self.dropout, nn.Dropout)):
            y = fast_lora.lora(self.base, x, self.lora_a, self.lora_b, self.chunks, self.scaling)
            if y is not None:
                return y
        y = self.base(x)
        if len(self.rows) == y.shape[-1]:
            return y + self.lora_delta(x)
        return y.index_add(-1, self.rows, self.lora_delta(x))

    @torch.no_grad()
    def merge(self) -> nn.Module | None:
        """Adds the update into the selected rows of the base weight (float64, rounded once); repeats add nothing.

        The chunked ``W + s B A`` is the fast path's own (``kernels.lora.lora_weight``), here in float64."""
        if is_delta(self.base):
            return None
        if not self.merged:
            w = out_in(self.base)
            a, b = (t.detach().double().to(w.device) for t in (self.lora_a, self.lora_b))
            w.copy_(round_to(fast_lora.lora_weight(w.double(), a, b, self.chunks, self.scaling), w.dtype))
            self.merged = True
        return self.base


class LoRAConv(nn.Module):
    """Wraps a Conv: adds a low-rank update of its weight, viewed as (out, in/groups * prod(kernel))."""

    delta_method = "lora"

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float, rslora: bool = False):
        super().__init__()
        self.base, self.delta_stage, self.scaling = base, None, alpha / (math.sqrt(r) if rslora else r)
        self.merged = False  # once merged, the base holds the update and forward adds nothing
        layer = innermost(base)
        fan_in = layer.weight[0].numel()
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.lora_a = nn.Parameter(torch.empty(r, fan_in, **_kw(layer)))  # (r, in/groups * k*k)
        self.lora_b = nn.Parameter(torch.zeros(layer.out_channels, r, **_kw(layer)))  # (out, r)
        _kaiming(self.lora_a)

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
