"""The epochs of a run: optimizer steps, evaluation, logs and resumable checkpoints after each epoch, and the
transition between phases (a method's pruning or the next sequential stage)."""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from deltatune.backbones import forward
from deltatune.core import trainable_parameters
from deltatune.errors import DeltaTuneError
from deltatune.train.config import TrainConfig
from deltatune.train.distributed import Runtime, all_reduce_sum
from deltatune.train.fsdp import gathered
from deltatune.train.phases import Phase, enter_stage, train_state, transition
from deltatune.train.setup import Parts, start_phase
from deltatune.train.state import write_checkpoint
from deltatune.train.steps import epoch_line, to_device
from deltatune.train.tasks import evaluate, headline

CHECKPOINT = "checkpoint.safetensors"


def _train_epoch(p: Parts, cfg: TrainConfig, rt: Runtime, epoch: int, total: int, step: int) -> tuple[float, int, int]:
    """One epoch of optimizer steps; returns this process's loss sum, examples seen and the global step after it."""
    out = Path(cfg.output_dir)
    trainable = [q for q in p.model.parameters() if q.requires_grad]
    loss_sum, seen = 0.0, 0
    bar = tqdm(
        p.train_loader,
        desc=f"epoch {epoch + 1}/{total}",
        leave=False,
        dynamic_ncols=True,
        disable=not (cfg.progress and rt.is_main),
    )
    for inputs, targets in bar:
        inputs, targets = to_device(inputs, rt.device), targets.to(rt.device)
        if p.mixup is not None:
            inputs, targets = p.mixup(inputs, targets)
        with rt.autocast():
            logits = forward(p.ddp, inputs)
        loss = p.criterion(logits.float(), targets)
        p.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            norm = nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        else:
            norm = nn.utils.get_total_norm([q.grad for q in trainable if q.grad is not None])
        value = loss.item()
        if not (math.isfinite(value) and torch.isfinite(norm)):
            kept = f"; the last good checkpoint ({out / CHECKPOINT}) is kept" if (out / CHECKPOINT).exists() else ""
            raise DeltaTuneError(
                f"training diverged at epoch {epoch + 1}, step {step + 1}: loss {value}, gradient "
                f"norm {float(norm)}{kept}. Lower --lr, set --grad-clip, or check the data "
                "for NaN/inf values"
            )
        p.optimizer.step()
        p.scheduler.step()
        step += 1
        p.tracker.step(step, value, p.optimizer.param_groups[0]["lr"])
        if p.ema is not None:
            p.ema.update(p.model)
        loss_sum, seen = loss_sum + value * len(targets), seen + len(targets)
        bar.set_postfix(loss=f"{value:.4f}", lr=f"{p.optimizer.param_groups[0]['lr']:.2e}")
    return loss_sum, seen, step


def fit(
    p: Parts, cfg: TrainConfig, rt: Runtime, phase: Phase, start_epoch: int, total: int, history: list[dict]
) -> list[dict]:
    """Trains ``phase`` from ``start_epoch`` to its end (of ``total`` epochs); after each epoch evaluates (at the
    phase's end or every ``eval_every``), logs and checkpoints.

    Raises:
        DeltaTuneError: On a NaN/inf loss or gradient; the last checkpoint (the previous epoch's) is kept.
    """
    history = list(history)
    out = Path(cfg.output_dir)
    step = start_epoch * len(p.train_loader)
    for epoch in range(start_epoch, phase.end):
        p.train_loader.sampler.set_epoch(epoch)  # type: ignore[union-attr]
        p.ddp.train()
        start = time.perf_counter()
        loss_sum, seen, step = _train_epoch(p, cfg, rt, epoch, total, step)
        loss_sum, seen = all_reduce_sum(rt, [loss_sum, float(seen)])
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "phase": phase.index + 1,
            "train_loss": loss_sum / max(seen, 1),
            "lr": p.optimizer.param_groups[0]["lr"],
            "epoch_s": time.perf_counter() - start,
        }
        record["train_images_per_s"] = seen / record["epoch_s"]
        last = epoch + 1 == phase.end
        if last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
            scores = evaluate(p.model, p.eval_loader, rt, p.task)
            record.update({f"eval_{k}": v for k, v in scores.items() if k not in ("n", "tokens")})
            if p.ema is not None:
                key = headline(p.task)
                record[f"ema_{key}"] = evaluate(p.ema.module, p.eval_loader, rt, p.task)[key]
        history.append(record)
        if rt.is_main:
            with (out / "log.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
            p.tracker.epoch(record)
            if cfg.progress:
                tqdm.write(epoch_line(record, total))
        if cfg.checkpoint_every and ((epoch + 1) % cfg.checkpoint_every == 0 or last):
            checkpoint(p, cfg, rt, history, phase)
    return history


def check_finite(p: Parts, what: str) -> None:
    """Refuses to save weights (or an EMA copy) that the last optimizer step made NaN/inf."""
    modules = [("", p.model)] + ([("EMA ", p.ema.module)] if p.ema is not None else [])
    for prefix, module in modules:
        bad = [n for n, q in module.named_parameters() if q.requires_grad and not bool(torch.isfinite(q).all())]
        if bad:
            raise DeltaTuneError(
                f"training diverged: after its last step {what} hold NaN/inf values ({prefix}{bad[0]}); nothing was"
                f" saved over the last good checkpoint. Lower --lr or set --grad-clip"
            )


def checkpoint(p: Parts, cfg: TrainConfig, rt: Runtime, history: list[dict], phase: Phase) -> None:
    """The resumable checkpoint after an epoch, with what rebuilds its structure (phase, the methods' own state)."""
    check_finite(p, f"the weights of epoch {history[-1]['epoch']}")
    info = {"epoch": history[-1]["epoch"], "phase": phase.index, **train_state(p.model, cfg)}
    info |= {"history": history, "config": cfg.to_dict()}
    with gathered(p.model, p.optimizer):  # FSDP: the full deltas and optimizer state
        write_checkpoint(Path(cfg.output_dir) / CHECKPOINT, *checkpoint_parts(p), info, rt)


def checkpoint_parts(p: Parts) -> tuple[nn.Module, Any, Any, nn.Module | None]:
    """What a checkpoint holds: model, optimizer, schedule and the EMA copy."""
    return p.model, p.optimizer, p.scheduler, p.ema.module if p.ema else None


def next_phase(p: Parts, cfg: TrainConfig, rt: Runtime, phase: Phase) -> None:
    """The transition into ``phase``: the phased method's change (MiMi prunes) or the next stage; then its optimizer
    etc."""
    if phase.prune is not None:
        context = Transition(p.optimizer, p.ddp, cfg.seed, lambda n: _batches(p, rt, n), _loss(p, rt))
        what = transition(p.model, cfg, phase, context)
    else:
        what = enter_stage(p.model, cfg, phase, rt.device)
    start_phase(p, cfg, rt, phase)
    if rt.is_main and cfg.progress:
        tqdm.write(f"phase {phase.index + 1}: {what}; {trainable_parameters(p.model):,} trainable parameters")


@dataclass
class Transition:
    """What a phased method gets between phases (``protocols.PhaseContext``)."""

    optimizer: torch.optim.Optimizer
    ddp: nn.Module
    seed: int
    batches: Callable[[int], Iterator[tuple[Any, Tensor]]]
    loss: Callable[[nn.Module, Any, Tensor], Tensor]


def _batches(p: Parts, rt: Runtime, n: int) -> Iterator[tuple[Any, Tensor]]:
    """``n`` training batches on the device, mixed like in training (for a method's scores between phases)."""
    for inputs, targets in itertools.islice(p.train_loader, n):
        inputs, targets = to_device(inputs, rt.device), targets.to(rt.device)
        yield p.mixup(inputs, targets) if p.mixup is not None else (inputs, targets)


def _loss(p: Parts, rt: Runtime) -> Callable[[nn.Module, Any, Tensor], Tensor]:
    def loss(module: nn.Module, inputs: Any, targets: Tensor) -> Tensor:
        with rt.autocast():
            logits = forward(module, inputs)
        return p.criterion(logits.float(), targets)

    return loss
