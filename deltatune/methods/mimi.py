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

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from deltatune.core import Applied
from deltatune.errors import DeltaTuneError
from deltatune.methods.adapter import Adapter, AdapterConfig, _width
from deltatune.methods.pruning import (
    SCOPES,
    SCORES,
    activation_scores,
    adapter_sizes,
    adapters,
    plot_allocation,
    prune_adapters,
    resize_adapters,
)
from deltatune.protocols import PhaseContext
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
    prune_batches: int = 8
    """Training batches whose gradients (score grad) or activations (score activation) rank the neurons."""

    cli_group: ClassVar[str] = "MiMi pruning"
    cli_options: ClassVar[dict[str, str]] = {
        "rho": "rho",
        "phases": "phases",
        "target_sigma": "target_sigma",
        "target_params": "target_params",
        "prune_score": "score",
        "prune_scope": "scope",
        "prune_batches": "prune_batches",
    }
    """``deltatune train`` options (flags --rho, --prune-score, ...) that set these fields."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self, 0.0 < self.rho < 1.0, "rho", "in (0, 1)")
        if self.score not in SCORES:
            raise DeltaTuneError(f"mimi: unknown score {self.score!r}; choose one of {', '.join(SCORES)}")
        if self.scope not in SCOPES:
            raise DeltaTuneError(f"mimi: unknown scope {self.scope!r}; choose one of {', '.join(SCOPES)}")
        require(self, self.phases is None or self.phases >= 1, "phases", ">= 1")
        require(self, self.target_params is None or self.target_params >= 1, "target_params", ">= 1")
        require(self, self.prune_batches >= 1, "prune_batches", ">= 1")
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
        d = _width(layer)  # Linear, Conv1D, Conv2d
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

    # ---- training hooks (protocols.PhasedMethod, TrainState, ReportsExtras): the trainer calls them by role ----

    def with_options(self, **options: Any) -> MiMiConfig:
        """This config with ``deltatune train`` options applied; a target_params replaces the target sigma."""
        if "target_params" in options:
            options.setdefault("target_sigma", None)
        return dataclasses.replace(self, **options)

    def phase_plan(self, model: nn.Module) -> list[float]:
        """The cumulative pruned fractions, one per transition between phases."""
        return self.schedule(adapter_parameters(model))

    def describe_plan(self, model: nn.Module, amounts: list[float]) -> str:
        """The adapter neurons before and after each pruning, for the log."""
        neurons = sum(a.original_hidden for _, a in adapters(model))
        kept = ", ".join(f"{round(neurons * (1 - a)):,}" for a in amounts)
        return f"adapter neurons {neurons:,} pruned to {kept} ({self.scope}) after phases 1-{len(amounts)}"

    def between_phases(self, model: nn.Module, amount: float, context: PhaseContext) -> str:
        """Prunes the adapters to the cumulative fraction ``amount``, the optimizer's state following the survivors."""
        optimizer, extra = context.optimizer, {}
        if self.score == "grad":
            optimizer.zero_grad(set_to_none=True)
            for inputs, targets in context.batches(self.prune_batches):
                context.loss(context.ddp, inputs, targets).backward()  # DDP averages the gradients over processes
        elif self.score == "activation":
            run = lambda: [context.loss(model, i, t) for i, t in context.batches(self.prune_batches)]  # noqa: E731
            extra["activations"] = activation_scores(adapters(model), run, reduce=True)
        sizes = prune_adapters(model, amount, self.score, self.scope, optimizer=optimizer, seed=context.seed, **extra)
        optimizer.zero_grad(set_to_none=True)
        return f"pruned to {sum(sizes.values()):,} adapter neurons ({sum(1 for v in sizes.values() if v)} adapters)"

    def train_state(self, model: nn.Module) -> dict[str, Any]:
        """The adapter sizes, for a checkpoint: resuming prunes a fresh model to them first."""
        return {"adapter_sizes": adapter_sizes(model)}

    def restore_train_state(self, model: nn.Module, info: dict[str, Any]) -> None:
        """Prunes a freshly built model's adapters to a checkpoint's sizes."""
        if info.get("adapter_sizes"):
            resize_adapters(model, info["adapter_sizes"])

    def report_extras(self, model: nn.Module, output_dir: Path) -> dict[str, Any]:
        """Adapter sizes after and before pruning, and the allocation figure."""
        sizes = adapter_sizes(model)  # removed adapters count too
        if not sizes:
            return {}
        extras: dict[str, Any] = {"adapter_sizes": sizes, "adapter_sizes_original": adapter_sizes(model, original=True)}
        extras["allocation_plot"] = str(plot_allocation(extras, output_dir / "allocation.png", ""))
        return extras


def adapter_parameters(model: nn.Module) -> int:
    """Parameters held by the model's adapters (the size MiMi's target_params refers to)."""
    return sum(p.numel() for _, a in adapters(model) for p in a.delta_parameters())
