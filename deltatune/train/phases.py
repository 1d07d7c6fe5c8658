"""Training in phases: MiMi's train-then-prune rounds and sequential stages (``deltatune train --stages``).

A run is a list of phases, each ``epochs`` long with a fresh cosine schedule. Before a phase starts comes its
transition: a new stage's methods are applied (earlier deltas frozen, a fresh optimizer), or the adapters are
pruned to the phase's cumulative fraction (the optimizer keeps its state for the surviving neurons).
Checkpoints record the phase and the adapter sizes, so ``--resume`` rebuilds the same structure first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deltatune.core import apply
from deltatune.errors import DeltaTuneError
from deltatune.methods.pruning import activation_scores, adapters, prune_adapters, resize_adapters
from deltatune.train.config import TrainConfig


@dataclass(frozen=True)
class Phase:
    """Epochs ``start`` to ``start + epochs`` (0-based) of a run, training stage ``stage``; ``prune`` is the
    cumulative fraction of the original adapter neurons pruned before it (None: no pruning)."""

    index: int
    start: int
    epochs: int
    stage: int = 0
    prune: float | None = None

    @property
    def end(self) -> int:
        return self.start + self.epochs

    def fresh_optimizer(self) -> bool:
        """A new optimizer (and warm-up) at the run's start and at each new stage; pruning keeps the old one."""
        return self.prune is None


def mimi_config(cfg: TrainConfig) -> Any | None:
    """The run's mimi config, if it trains one."""
    found = [c for c in cfg.method_configs() if c.name == "mimi"]
    return found[0] if found else None


def plan(cfg: TrainConfig, model: nn.Module) -> list[Phase]:
    """The run's phases: one per stage, or MiMi's rounds (start size, then each pruning), ``cfg.epochs`` each."""
    stages = cfg.stage_configs()
    mimi = mimi_config(cfg)
    if mimi is None:
        return [Phase(i, i * cfg.epochs, cfg.epochs, stage=i) for i in range(len(stages))]
    if len(stages) > 1:
        raise DeltaTuneError("mimi prunes between its own phases; train it on its own, not as one of --stages")
    amounts = mimi.schedule(adapter_parameters(model))
    return [Phase(i, i * cfg.epochs, cfg.epochs, prune=a) for i, a in enumerate([None, *amounts])]


def describe(phases: list[Phase], model: nn.Module, cfg: TrainConfig) -> str:
    """One line for the log: the phases, the total epochs and what happens between phases."""
    total = phases[-1].end
    line = f"{len(phases)} phase(s) x {phases[0].epochs} epochs = {total} epochs"
    prunes = [p.prune for p in phases if p.prune is not None]
    if prunes:
        neurons = sum(a.original_hidden for _, a in adapters(model))
        kept = ", ".join(f"{round(neurons * (1 - a)):,}" for a in prunes)
        scope = mimi_config(cfg).scope  # type: ignore[union-attr]
        line += f"; adapter neurons {neurons:,} pruned to {kept} ({scope}) after phases 1-{len(prunes)}"
    return line


def adapter_parameters(model: nn.Module) -> int:
    """Parameters held by the model's adapters (the size MiMi's target_params refers to)."""
    return sum(p.numel() for _, a in adapters(model) for p in a.delta_parameters())


def restore(model: nn.Module, cfg: TrainConfig, phase: Phase, info: dict[str, Any]) -> None:
    """Gives a freshly built model the structure it had in ``phase`` (stages applied, adapters pruned), so a
    checkpoint written then can be loaded into it."""
    for configs in cfg.stage_configs()[1 : phase.stage + 1]:
        apply(model, configs, head=cfg.train_head)
    if info.get("adapter_sizes"):
        resize_adapters(model, info["adapter_sizes"])


def enter_stage(model: nn.Module, cfg: TrainConfig, phase: Phase, device: torch.device) -> None:
    """Applies the phase's stage; the earlier stages' deltas freeze."""
    apply(model, cfg.stage_configs()[phase.stage], head=cfg.train_head)
    model.to(device)


def prune(
    model: nn.Module,
    ddp: nn.Module,
    cfg: TrainConfig,
    phase: Phase,
    optimizer: torch.optim.Optimizer,
    batches: Any,
    step: Any,
) -> dict[str, int]:
    """Prunes the adapters to the phase's cumulative fraction, the optimizer's state following the survivors.

    Args:
        batches: a callable yielding ``cfg.prune_batches`` training batches, for the grad/activation scores.
        step: ``step(ddp, inputs, targets)`` runs a forward pass and returns the loss (gradients need backward).
    """
    mimi = mimi_config(cfg)
    assert mimi is not None and phase.prune is not None
    extra: dict[str, Any] = {}
    if mimi.score == "grad":
        optimizer.zero_grad(set_to_none=True)
        for inputs, targets in batches():
            step(ddp, inputs, targets).backward()  # DDP averages the gradients over processes
    elif mimi.score == "activation":
        extra["activations"] = activation_scores(
            adapters(model), lambda: [step(model, i, t) for i, t in batches()], reduce=True
        )
    sizes = prune_adapters(model, phase.prune, mimi.score, mimi.scope, optimizer=optimizer, seed=cfg.seed, **extra)
    optimizer.zero_grad(set_to_none=True)
    return sizes
