"""Training in phases: sequential stages (``deltatune train --stages``) and a method's own phases (MiMi's pruning).

A run is a list of phases, each ``epochs`` long with a fresh cosine schedule. Before a phase starts comes its
transition: a new stage's methods are applied (earlier deltas frozen, a fresh optimizer), or the method that
plans phases (``protocols.PhasedMethod``) changes the model (the optimizer keeps its state for what survives).
Checkpoints record the phase and what the methods report of their structure, so ``--resume`` rebuilds it first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deltatune.core import apply
from deltatune.errors import DeltaTuneError
from deltatune.protocols import PhaseContext, PhasedMethod, TrainState, hooks
from deltatune.train.config import TrainConfig
from deltatune.train.memory import delta_dtype


@dataclass(frozen=True)
class Phase:
    """Epochs ``start`` to ``start + epochs`` (0-based) of a run, training stage ``stage``; ``prune`` is the amount
    handed to the phased method before it (MiMi: the cumulative fraction of adapter neurons pruned; None: none)."""

    index: int
    start: int
    epochs: int
    stage: int = 0
    prune: float | None = None

    @property
    def end(self) -> int:
        return self.start + self.epochs

    def fresh_optimizer(self) -> bool:
        """A new optimizer (and warm-up) at the run's start and at each new stage; a method's transition keeps it."""
        return self.prune is None


def phased_method(cfg: TrainConfig) -> Any | None:
    """The run's config that plans its own phases, if any."""
    found = hooks(cfg.method_configs(), PhasedMethod)
    return found[0] if found else None


def plan(cfg: TrainConfig, model: nn.Module) -> list[Phase]:
    """The run's phases: one per stage, or the phased method's (start, then one per transition), ``cfg.epochs`` each."""
    stages = cfg.stage_configs()
    method = phased_method(cfg)
    if method is None:
        return [Phase(i, i * cfg.epochs, cfg.epochs, stage=i) for i in range(len(stages))]
    if len(stages) > 1:
        raise DeltaTuneError(f"{method.name} changes the model between its own phases; train it on its own, not as one"
                             " of --stages")  # fmt: skip
    amounts = method.phase_plan(model)
    return [Phase(i, i * cfg.epochs, cfg.epochs, prune=a) for i, a in enumerate([None, *amounts])]


def describe(phases: list[Phase], model: nn.Module, cfg: TrainConfig) -> str:
    """One line for the log: the phases, the total epochs and what happens between phases."""
    total = phases[-1].end
    line = f"{len(phases)} phase(s) x {phases[0].epochs} epochs = {total} epochs"
    amounts = [p.prune for p in phases if p.prune is not None]
    method = phased_method(cfg)
    if amounts and method is not None:
        line += "; " + method.describe_plan(model, amounts)
    return line


def restore(model: nn.Module, cfg: TrainConfig, phase: Phase, info: dict[str, Any]) -> None:
    """Gives a freshly built model the structure it had in ``phase`` (stages applied, methods' structure restored),
    so a checkpoint written then can be loaded into it."""
    for configs in cfg.stage_configs()[1 : phase.stage + 1]:
        apply(model, configs, head=cfg.train_head, delta_dtype=delta_dtype(cfg.precision, cfg.delta_dtype))
    for config in hooks(cfg.method_configs(), TrainState):
        config.restore_train_state(model, info)


def train_state(model: nn.Module, cfg: TrainConfig) -> dict[str, Any]:
    """What the run's methods record of their structure in a checkpoint."""
    info: dict[str, Any] = {}
    for config in hooks(cfg.method_configs(), TrainState):
        info.update(config.train_state(model))
    return info


def enter_stage(model: nn.Module, cfg: TrainConfig, phase: Phase, device: torch.device) -> str:
    """Applies the phase's stage (the earlier stages' deltas freeze); returns what it did, for the log."""
    configs = cfg.stage_configs()[phase.stage]
    apply(model, configs, head=cfg.train_head, delta_dtype=delta_dtype(cfg.precision, cfg.delta_dtype))
    model.to(device)
    return f"stage {phase.stage + 1}: " + "+".join(c.name for c in configs)


def transition(model: nn.Module, cfg: TrainConfig, phase: Phase, context: PhaseContext) -> str:
    """The phased method's change before ``phase`` (MiMi prunes); returns what it did, for the log."""
    method = phased_method(cfg)
    assert method is not None and phase.prune is not None
    return method.between_phases(model, phase.prune, context)
