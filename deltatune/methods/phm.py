"""PHM-Adapter and Compacter: "Compacter: Efficient Low-Rank Hypercomplex Adapter Layers" (Mahabadi, Henderson,
Ruder, NeurIPS 2021). https://arxiv.org/abs/2106.04647

Bottleneck adapters (placed like deltatune's ``adapter``: after the attention output and the MLP output of every
block, before the residual adds) whose two weight matrices are parameterised hypercomplex multiplications (PHM)::

    z -> z + act(z H_down + b_down) H_up + b_up            H = sum_{i=1..n} A_i (x) B_i      ((x): Kronecker)

with A_i (n, n) the "slow" rule matrices and B_i (in/n, out/n) the "fast" weights:

- ``phm-adapter``: every layer owns its A (n^3) and full B_i: n^3 + in*out/n weights per layer.
- ``compacter``: one A shared by every PHM layer of the model, and rank-1 fast weights B_i = s_i t_i^T:
  (in + out) weights per layer, n^3 once.

Defaults and init as the official configs: n = 12 for the PHM-adapter, n = 4 for Compacter; A ~ N(0, 0.01) per layer
(PHM-adapter), N(0, 1e-4) for Compacter's shared A; B (or s, t) glorot-uniform with gain sqrt(2) per i; biases zero.
Hidden size d / sigma (Swin: 4d / sigma, as the core adapter), rounded to a multiple of n (at least n); d must be
divisible by n (the tiny test models, d = 64 or 32, need n = 4 or 8 for the PHM-adapter).
Not mergeable: a nonlinearity sits between the two matrices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from deltatune.core import Applied
from deltatune.errors import DeltaTuneError
from deltatune.methods.adapter import ACTIVATIONS
from deltatune.methods.adapter import PRESETS as ADAPTER_PRESETS
from deltatune.registry import register, require
from deltatune.targeting import Targets, config_sites, family, innermost, set_module


@dataclass
class _PHMOptions:
    """Options shared by ``phm-adapter`` and ``compacter``."""

    n: int = 4
    """Number of Kronecker summands (the hypercomplex dimension); divides d and the hidden size. Official: PHM-adapter
    12, Compacter 4."""
    hidden: int | None = None
    """Hidden size of every adapter (a multiple of n); None: d / sigma rounded to a multiple of n."""
    sigma: float = 32.0
    """Compression ratio: hidden = d / sigma (Swin: 4d / sigma). 32 gives ViT-B/16 hidden 24."""
    act: str = "gelu"
    """Activation between the two PHM layers: gelu, relu, silu, tanh or identity."""
    rule_std: float = 0.01
    """Std of the normal init of the rule matrices A (official: 0.01 per layer, 1e-4 for Compacter's shared A)."""
    target_modules: Targets | None = None
    """Sites: layers whose output the adapter follows. Default: the core adapter's (attention and MLP outputs)."""
    exclude_modules: Targets | None = None
    """Sites to leave out (wins over target_modules)."""

    mergeable: ClassVar[bool] = False
    name: ClassVar[str]
    shared_rule: ClassVar[bool]

    def __post_init__(self) -> None:
        require(self, self.n >= 1, "n", ">= 1")
        if self.hidden is not None and (self.hidden < 1 or self.hidden % self.n):
            raise DeltaTuneError(f"{self.name}: hidden must be a positive multiple of n={self.n}, got {self.hidden}")
        require(self, self.sigma > 0, "sigma", "> 0")
        if self.act not in ACTIVATIONS:
            raise DeltaTuneError(f"{self.name}: unknown act {self.act!r}; choose one of {', '.join(ACTIVATIONS)}")

    def apply(self, model: nn.Module, skip: tuple[str, ...]) -> Applied:
        """Wraps every site in a ``PHMAdapter``; Compacter's rule A is one tensor shared by all of them."""
        sites = config_sites(model, self, ADAPTER_PRESETS, (nn.Linear,), skip)
        mult = 4 if family(model) == "swin" else 1
        ref = innermost(sites[0][1]).weight
        shared = None
        if self.shared_rule:
            shared = nn.Parameter(torch.empty(self.n, self.n, self.n, device=ref.device, dtype=ref.dtype))
            nn.init.normal_(shared, 0.0, self.rule_std)
        for name, module in sites:
            d = innermost(module).out_features
            if d % self.n:
                raise DeltaTuneError(
                    f"{self.name}: {name} has {d} channels, not divisible by n={self.n}; pick n "
                    f"dividing it (e.g. n=2) or leave the site out with exclude_modules"
                )
            hidden = self.hidden or self.n * max(1, round(mult * d / self.sigma / self.n))
            set_module(model, name, PHMAdapter(module, self.name, hidden, self, shared))
        return Applied([n for n, _ in sites])


@register("phm-adapter")
@dataclass
class PHMAdapterConfig(_PHMOptions):
    """Adapter whose matrices are sums of n Kronecker products, each layer with its own rule (PHM-Adapter)."""

    n: int = 12
    """Number of Kronecker summands; divides d and the hidden size (official PHM-adapter config: 12)."""

    shared_rule: ClassVar[bool] = False
    families: ClassVar[frozenset[str] | None] = frozenset(ADAPTER_PRESETS) - {"gpt2"}  # PHM layers replace Linears


@register("compacter")
@dataclass
class CompacterConfig(_PHMOptions):
    """Adapter with a model-wide shared PHM rule and rank-1 fast weights (Compacter)."""

    rule_std: float = 1e-4
    """Std of the normal init of the shared rule A (official Compacter: 1e-4)."""

    shared_rule: ClassVar[bool] = True
    families: ClassVar[frozenset[str] | None] = frozenset(ADAPTER_PRESETS) - {"gpt2"}  # PHM layers replace Linears


def _glorot_(t: Tensor) -> Tensor:
    """Glorot-uniform init with gain sqrt(2) (the official code's) of each (fan_in, fan_out) slice of (n, in, out)."""
    bound = (2.0 * 6.0 / (t.shape[-2] + t.shape[-1])) ** 0.5
    return nn.init.uniform_(t, -bound, bound)


class PHMLinear(nn.Module):
    """``y = x H + b`` with ``H = sum_i A_i (x) B_i`` (in, out); B_i full or rank-1 (``s_i t_i^T``)."""

    def __init__(
        self, d_in: int, d_out: int, n: int, rule: nn.Parameter | None, rank1: bool, rule_std: float, kw: dict
    ) -> None:
        super().__init__()
        if rule is None:
            rule = nn.Parameter(torch.empty(n, n, n, **kw))
            nn.init.normal_(rule, 0.0, rule_std)
        self.rule = rule  # (n, n, n): shared across layers for Compacter
        if rank1:
            self.left = nn.Parameter(_glorot_(torch.empty(n, d_in // n, 1, **kw)))  # (n, in/n, 1)
            self.right = nn.Parameter(_glorot_(torch.empty(n, 1, d_out // n, **kw)))  # (n, 1, out/n)
        else:
            self.fast = nn.Parameter(_glorot_(torch.empty(n, d_in // n, d_out // n, **kw)))  # (n, in/n, out/n)
        self.bias = nn.Parameter(torch.zeros(d_out, **kw))

    def weight(self) -> Tensor:
        """H (in, out) = sum_i kron(A_i, B_i)."""
        fast = self.left @ self.right if hasattr(self, "left") else self.fast  # (n, in/n, out/n)
        n, p, q = fast.shape
        return torch.einsum("iac,ibe->abce", self.rule, fast).reshape(n * p, n * q)

    def forward(self, x: Tensor) -> Tensor:
        return torch.addmm(self.bias, x.flatten(0, -2), self.weight()).unflatten(0, x.shape[:-1])


class PHMAdapter(nn.Module):
    """Wraps a Linear: ``y = base(x); y + up(act(down(y)))`` with PHM down/up layers."""

    delta_method: str  # "phm-adapter" or "compacter", set per instance (one class serves both)

    def __init__(self, base: nn.Module, method: str, hidden: int, cfg: _PHMOptions, shared: nn.Parameter | None):
        super().__init__()
        self.base, self.delta_stage, self.delta_method = base, None, method
        layer = innermost(base)
        kw = {"device": layer.weight.device, "dtype": layer.weight.dtype}
        d, rank1 = layer.out_features, cfg.shared_rule
        self.phm_down = PHMLinear(d, hidden, cfg.n, shared, rank1, cfg.rule_std, kw)
        self.phm_act = ACTIVATIONS[cfg.act]()
        self.phm_up = PHMLinear(hidden, d, cfg.n, shared, rank1, cfg.rule_std, kw)
        self.train(base.training)  # take the mode of the module it replaces

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)  # (..., d)
        return y + self.phm_up(self.phm_act(self.phm_down(y)))

    def delta_parameters(self) -> list[nn.Parameter]:
        return [*self.phm_down.parameters(), *self.phm_up.parameters()]
