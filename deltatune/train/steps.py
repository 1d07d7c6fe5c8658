"""Pieces of the training loop: seeding, the learning-rate schedule, batches to the device, evaluation, log lines."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from deltatune.backbones import forward
from deltatune.train.distributed import Runtime, all_reduce_sum


def seed_all(seed: int) -> None:
    """Seeds torch, numpy and Python's random."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def cosine_lr(step: int, total: int, warmup: int, lr: float, warmup_lr: float, min_lr: float) -> float:
    """Learning rate at ``step``: linear warm-up from warmup_lr to lr over ``warmup`` steps, then cosine to min_lr."""
    if step < warmup:
        return warmup_lr + (lr - warmup_lr) * step / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t))


def to_device(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, dict):
        return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
    return inputs.to(device, non_blocking=True)


@torch.no_grad()
def eval_sums(
    model: nn.Module, loader: DataLoader, rt: Runtime, per_batch: Callable[[Tensor, Tensor], list[float]]
) -> list[float]:
    """Sums of ``per_batch(logits, targets)`` over the loader in eval mode, all processes' shares together."""
    was_training = model.training
    model.eval()
    sums: list[float] = []
    for inputs, targets in loader:
        inputs, targets = to_device(inputs, rt.device), targets.to(rt.device)
        with rt.autocast():
            logits = forward(model, inputs).float()
        values = per_batch(logits, targets)
        sums = [a + b for a, b in zip(sums, values)] if sums else values
    model.train(was_training)
    return all_reduce_sum(rt, sums)


def evaluate(model: nn.Module, loader: DataLoader, rt: Runtime) -> dict[str, float]:
    """Top-1 accuracy (%) and mean cross-entropy over the loader (all processes' shares together)."""

    def per_batch(logits: Tensor, targets: Tensor) -> list[float]:
        correct = (logits.argmax(-1) == targets).sum().item()
        return [correct, nn.functional.cross_entropy(logits, targets, reduction="sum").item(), float(len(targets))]

    correct, loss, n = eval_sums(model, loader, rt, per_batch) or [0.0, 0.0, 0.0]
    return {"top1": 100.0 * correct / max(n, 1), "loss": loss / max(n, 1), "n": int(n)}


def epoch_line(r: dict[str, Any], epochs: int) -> str:
    line = f"epoch {r['epoch']}/{epochs}  loss {r['train_loss']:.4f}  lr {r['lr']:.2e}"
    if "eval_top1" in r:
        line += f"  top-1 {r['eval_top1']:.2f}%"
    if "ema_top1" in r:
        line += f"  ema top-1 {r['ema_top1']:.2f}%"
    if "eval_perplexity" in r:
        line += f"  perplexity {r['eval_perplexity']:.2f}"
    if "ema_perplexity" in r:
        line += f"  ema perplexity {r['ema_perplexity']:.2f}"
    return line + f"  ({r['epoch_s']:.1f} s)"
