"""FacT: Factor-Tuning for Lightweight Adaptation on Vision Transformer (Jie & Deng, AAAI 2023).
https://arxiv.org/abs/2212.03145

The updates of all blocks' qkv, proj, fc1 and fc2 weights, cut into d x d slices (qkv: 3, proj: 1, fc1 and fc2:
4 for ViT-B, so 12 per block), form one tensor dW of shape (S, d, d), stored factorised and scaled by s::

    FacT-TT (tensor-train):  dW_j = s * V  C_j  U^T      U, V (d, r); C (S, r, r)        2dr + S r^2 parameters
    FacT-TK (Tucker):        dW_j = s * V (sum_k C[:, :, k] P[j, k]) U^T     C (r, r, r), P (S, r)   2dr + r^3 + S r

A layer (in -> out) holds b*a slices, a = ceil(in / d), b = ceil(out / d), d = min(in, out)::

    y = W x + s * [blockdiag_b(V) dropout(M blockdiag_a(U^T) [x; 0])]_{:out}       M (b*r, a*r): its cores

(sizes that are not multiples of d, like BERT's intermediate 37 for hidden 32, use the top-left out x in block).
Init as the official code: U kaiming-uniform, V zeros (output unchanged at init), TT cores U(-1/sqrt(a r),
1/sqrt(a r)), TK C and P xavier-uniform; dropout 0.1 on the rank-r features.
Merges exactly like LoRA (``W' = W + s dW``, float64, rounded once).

Backbones whose blocks change width (Swin) get one factorisation per width (per stage): U, V (and TK's C) cannot be
shared across different d. TK's slice-to-core map follows the paper's formula (the official code reshapes the core
in a different order, an equivalent-size but differently-tied parameterisation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.core import Applied
from deltatune.numerics import round_to
from deltatune.registry import register, require
from deltatune.targeting import Targets, config_sites, innermost, is_delta, set_module

_HF = r"|.*attention\.output\.dense|.*intermediate\.dense|.*layer\.\d+\.output\.dense"
PRESETS: dict[str, Targets] = {
    "vit": ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"],
    "swin": ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"],
    "bert": r".*attention\.self\.(query|key|value)" + _HF,
    "hf-vit": r".*attention\.(q|k|v|o)_proj|.*mlp\.fc[12]",  # transformers 5.x ViT
}


@dataclass
class _FacTOptions:
    """Options shared by ``fact-tt`` and ``fact-tk``."""

    r: int = 8
    """Rank of the factorisation."""
    scale: float = 1.0
    """Scale s of the update (the paper tunes it per task; 1.0 is the official TT config for CIFAR-100)."""
    dropout: float = 0.1
    """Dropout on the rank-r features (official 0.1)."""
    target_modules: Targets | None = None
    """Sites (Linear layers). Default: every block's qkv, proj, fc1 and fc2 (HF: query, key, value and dense)."""
    exclude_modules: Targets | None = None
    """Sites to leave out (wins over target_modules)."""

    mergeable: ClassVar[bool] = True
    families: ClassVar[frozenset[str] | None] = frozenset(PRESETS)
    identity_at_init: ClassVar[bool] = True
    name: ClassVar[str]
    tucker: ClassVar[bool]

    def __post_init__(self) -> None:
        require(self, self.r >= 1, "r", ">= 1")
        require(self, 0.0 <= self.dropout < 1.0, "dropout", "in [0, 1)")

    def apply(self, model: nn.Module, skip: tuple[str, ...]) -> Applied:
        """Groups the sites by width d, builds one factorisation per group and wraps every site in a ``FacTLinear``."""
        sites = config_sites(model, self, PRESETS, (nn.Linear,), skip)
        groups: dict[int, list[tuple[str, nn.Module, int, int]]] = {}
        for name, module in sites:
            layer = innermost(module)
            d = min(layer.in_features, layer.out_features)
            groups.setdefault(d, []).append((name, module, -(-layer.in_features // d), -(-layer.out_features // d)))
        for d, group in groups.items():
            slices = sum(a * b for _, _, a, b in group)
            factors = FacTFactors(d, self.r, slices, self.tucker, innermost(group[0][1]).weight)
            offset = 0
            for name, module, a, b in group:
                core = None
                if not self.tucker:
                    bound = 1.0 / math.sqrt(a * self.r)
                    core = torch.empty(b, a, self.r, self.r).to(factors.fact_u).uniform_(-bound, bound)
                set_module(model, name, FacTLinear(module, self.name, factors, offset, a, b, core, self))
                offset += a * b
        return Applied([n for n, _ in sites])


@register("fact-tt")
@dataclass
class FacTTTConfig(_FacTOptions):
    """FacT with a tensor-train factorisation: shared U, V and one r x r core per d x d slice."""

    tucker: ClassVar[bool] = False


@register("fact-tk")
@dataclass
class FacTTKConfig(_FacTOptions):
    """FacT with a Tucker factorisation: shared U, V, an r x r x r core and an (S, r) slice factor."""

    r: int = 32
    """Rank of the factorisation."""
    scale: float = 0.1
    """Scale s of the update (the official CIFAR-100 config; the paper tunes it per task)."""

    tucker: ClassVar[bool] = True


class FacTFactors(nn.Module):
    """The factors shared by every site of one width d: U, V and (Tucker) C and P."""

    def __init__(self, d: int, r: int, slices: int, tucker: bool, ref: Tensor):
        super().__init__()
        kw = {"device": ref.device, "dtype": ref.dtype}
        self.fact_u = nn.Parameter(torch.empty(r, d, **kw))  # U^T (r, d)
        self.fact_v = nn.Parameter(torch.zeros(d, r, **kw))  # V (d, r)
        nn.init.kaiming_uniform_(self.fact_u, a=math.sqrt(5))
        if tucker:
            self.fact_c = nn.Parameter(nn.init.xavier_uniform_(torch.empty(r, r, r, **kw)))  # (r_v, r_u, r_p)
            self.fact_p = nn.Parameter(nn.init.xavier_uniform_(torch.empty(slices, r, **kw)))  # (S, r_p)


class FacTLinear(nn.Module):
    """Wraps a Linear (in -> out, a = ceil(in/d), b = ceil(out/d)): adds ``s * blockdiag(V) M blockdiag(U^T) x``."""

    delta_method: str  # "fact-tt" or "fact-tk", set per instance (one class serves both)

    def __init__(
        self,
        base: nn.Module,
        method: str,
        factors: FacTFactors,
        offset: int,
        a: int,
        b: int,
        core: Tensor | None,
        cfg: _FacTOptions,
    ):
        super().__init__()
        self.base, self.delta_stage, self.delta_method = base, None, method
        self.merged = False  # once merged, the base holds the update and forward adds nothing
        self.fact_factors = factors  # shared by every site of this width
        self.offset, self.a, self.b, self.scale = offset, a, b, cfg.scale
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        if core is not None:
            self.fact_core = nn.Parameter(core)  # (b, a, r, r)
        self.train(base.training)  # take the mode of the module it replaces

    def cores(self, dtype: torch.dtype | None = None) -> Tensor:
        """This layer's slice cores (b, a, r_v, r_u), computed in ``dtype`` (default: the factors')."""
        if hasattr(self, "fact_core"):
            return self.fact_core.to(dtype)
        f = self.fact_factors
        p = f.fact_p[self.offset : self.offset + self.a * self.b]  # (b*a, r_p)
        return torch.einsum("vuk,sk->svu", f.fact_c.to(dtype), p.to(dtype)).unflatten(0, (self.b, self.a))

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base(x)
        y = self.base(x)
        return y + self.fact_delta(x, y.shape[-1])

    def fact_delta(self, x: Tensor, out: int) -> Tensor:
        """The update for input x: (..., out) (the forward and the mixed-batch kernel share it)."""
        f = self.fact_factors
        m = self.cores()
        r = m.shape[-1]
        d = f.fact_u.shape[1]
        h = F.pad(x, (0, self.a * d - x.shape[-1])).unflatten(-1, (self.a, d))  # (..., a, d)
        h = F.linear(h, f.fact_u).flatten(-2)  # (..., a*r)
        h = F.linear(h, m.permute(0, 2, 1, 3).reshape(self.b * r, self.a * r))  # (..., b*r)
        h = F.linear(self.dropout(h).unflatten(-1, (self.b, r)), f.fact_v).flatten(-2)  # (..., b*d)
        return h[..., :out] * self.scale

    def delta_parameters(self) -> list[nn.Parameter]:
        own = [self.fact_core] if hasattr(self, "fact_core") else []
        return [*self.fact_factors.parameters(), *own]

    def delta_weight(self) -> Tensor:
        """``s * dW`` (out, in) in float64."""
        f = self.fact_factors
        m, v, u = self.cores(torch.float64).detach(), f.fact_v.detach().double(), f.fact_u.detach().double()
        dw = torch.einsum("xv,bavu,uy->bxay", v, m, u)  # (b, d, a, d)
        out, inp = innermost(self.base).weight.shape
        return dw.reshape(self.b * v.shape[0], self.a * u.shape[1])[:out, :inp] * self.scale

    @torch.no_grad()
    def merge(self) -> nn.Module | None:
        """Adds the update into the base weight (float64, rounded once) and returns the base; repeats add nothing."""
        if is_delta(self.base):
            return None
        if not self.merged:
            w = self.base.weight
            w.copy_(round_to(w.double() + self.delta_weight().to(w.device), w.dtype))
            self.merged = True
        return self.base
