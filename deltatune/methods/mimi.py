"""MiMi: Mini but Mighty, finetuning ViTs with mini adapters (Marouf, Tartaglione, Lathuilière, WACV 2024).
https://arxiv.org/abs/2311.03873

Start with large adapters (sigma = 4), then train in phases; after phase t prune globally to the cumulative
fraction ``p_t = 1 - (1 - rho)^(t+1)`` of the original neurons, ranked by the normalised weight magnitude

    s_i = (sum_j |W_down[i, j]| + sum_j |W_up[j, i]|) / (d_in + d_out)

until the target size is reached. Pruned neurons are removed from the matrices and empty adapters are removed
(see ``methods.pruning``). The adapters themselves are ``deltatune.methods.adapter.Adapter``; as in the official
code their start size is ``floor(d / sigma)`` (Swin: ``floor(4d / sigma)``, at least 1) and both matrices start
``trunc_normal_(std=0.02)`` with timm's default ABSOLUTE bounds +-2 (so effectively N(0, 0.02), not cut at 2 std).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from deltatune.core import Applied
from deltatune.errors import DeltaTuneError
from deltatune.methods.adapter import Adapter, AdapterConfig
from deltatune.registry import register, require
from deltatune.targeting import family, get_module, innermost

TRUNC_BOUND = 2.0  # timm's trunc_normal_ default: a=-2, b=2, absolute values (not multiples of std)


@register("mimi")
@dataclass
class MiMiConfig(AdapterConfig):
    """Adapters that start large (sigma 4) and are pruned globally in phases to a target size."""

    sigma: float = 4.0
    """Start compression ratio (MiMi starts at 4)."""
    rho: float = 0.5
    """Fraction of the remaining neurons pruned after each phase (0.5 halves them)."""
    target_sigma: float | None = 32.0
    """Stop when the adapters are as small as sigma would make them (kept fraction = sigma / target_sigma)."""
    target_params: int | None = None
    """Alternatively stop at this many adapter parameters (overrides target_sigma)."""
    phases: int | None = None
    """Training phases (prunings + 1); if set, rho is derived so the last pruning lands on the target."""
    score: str = "mimi"
    """Neuron score: mimi, l1, random, grad or activation (the paper's ablations)."""
    scope: str = "global"
    """Pruning scope: global (one threshold over all adapters) or local (the same fraction in every adapter)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        from deltatune.methods.pruning import SCOPES, SCORES

        require(self, 0.0 < self.rho < 1.0, "rho", "in (0, 1)")
        if self.score not in SCORES:
            raise DeltaTuneError(f"mimi: unknown score {self.score!r}; choose one of {', '.join(SCORES)}")
        if self.scope not in SCOPES:
            raise DeltaTuneError(f"mimi: unknown scope {self.scope!r}; choose one of {', '.join(SCOPES)}")
        require(self, self.phases is None or self.phases >= 1, "phases", ">= 1")
        if self.target_sigma is not None and self.target_sigma < self.sigma:
            raise DeltaTuneError(f"mimi: target_sigma {self.target_sigma} is below the start sigma {self.sigma}")

    def apply(self, model: nn.Module, skip: tuple[str, ...]) -> Applied:
        """The core adapters, re-drawn as the official code inits them: trunc-normal(0, std) cut at absolute +-2."""
        applied = super().apply(model, skip)
        with torch.no_grad():
            for name in applied.sites:
                adapter = get_module(model, name)
                if isinstance(adapter, Adapter):
                    for lin in (adapter.adapter_down, adapter.adapter_up):
                        nn.init.trunc_normal_(lin.weight, std=self.init_std, a=-TRUNC_BOUND, b=TRUNC_BOUND)
                    if self.zero_up:
                        nn.init.zeros_(adapter.adapter_up.weight)
        return applied

    def original_size(self, model: nn.Module, site: nn.Module) -> int:
        """Start size as the official code: ``hidden``, or floor(d / sigma) (Swin: floor(4d / sigma)), at least 1."""
        mult = 4 if family(model) == "swin" else 1
        layer = innermost(site)
        d = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        return self.hidden or max(1, math.floor(mult * d / self.sigma))

    def keep_target(self, start_params: int) -> float:
        """The fraction of the original neurons to keep at the end."""
        if self.target_params is not None:
            if not 0 < self.target_params <= start_params:
                raise DeltaTuneError(f"mimi: target_params must be in (0, {start_params}], got {self.target_params}")
            return self.target_params / start_params
        return self.sigma / (self.target_sigma or self.sigma)

    def schedule(self, start_params: int) -> list[float]:
        """Cumulative pruned fractions after each phase but the last: 1 - (1 - rho)^(t+1), the last one clipped to
        the target; with ``phases`` set, rho = 1 - keep^(1 / (phases - 1)) so that phase count is met exactly."""
        keep = self.keep_target(start_params)
        if self.phases is not None:
            if self.phases == 1 and keep < 1:
                raise DeltaTuneError("mimi: phases=1 leaves no pruning; use phases >= 2 or target_sigma = sigma")
            return [1 - keep ** ((t + 1) / (self.phases - 1)) for t in range(self.phases - 1)]
        phases = 0 if keep >= 1 else math.ceil(math.log(keep) / math.log(1 - self.rho) - 1e-9)
        amounts = [1 - (1 - self.rho) ** (t + 1) for t in range(phases)]
        if amounts:
            amounts[-1] = 1 - keep
        return amounts
