"""What a task kind changes in the one training loop: its loss, its evaluation and the number a run reports.

The kind is a property of the data (``Data.task``): "classify" (labels, cross-entropy, top-1 %) or "causal-lm"
(token blocks that are their own targets, next-token cross-entropy, perplexity = exp(mean token loss)).
"""

from __future__ import annotations

import math

from timm.loss import SoftTargetCrossEntropy
from torch import Tensor, nn
from torch.utils.data import DataLoader

from deltatune.data.lm import CAUSAL_LM
from deltatune.errors import DeltaTuneError
from deltatune.train.distributed import Runtime
from deltatune.train.steps import eval_sums
from deltatune.train.steps import evaluate as evaluate_classifier


class NextTokenLoss(nn.Module):
    """Mean cross-entropy of predicting token t+1 from the logits at t: ``logits`` (B, T, V), ``tokens`` (B, T)."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits: Tensor, tokens: Tensor) -> Tensor:
        return next_token_loss(logits, tokens, "mean", self.label_smoothing)


def next_token_loss(logits: Tensor, tokens: Tensor, reduction: str = "mean", label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy of ``logits[:, :-1]`` against ``tokens[:, 1:]`` (the prediction of each next token)."""
    pred, target = logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()  # (B*(T-1), V), (B*(T-1),)
    return nn.functional.cross_entropy(pred, target, reduction=reduction, label_smoothing=label_smoothing)


def criterion(task: str, soft_targets: bool, label_smoothing: float) -> nn.Module:
    """The training loss of ``task`` (classification with mixup's soft targets: soft-target cross-entropy)."""
    if task == CAUSAL_LM:
        return NextTokenLoss(label_smoothing)
    return SoftTargetCrossEntropy() if soft_targets else nn.CrossEntropyLoss(label_smoothing=label_smoothing)


def headline(task: str) -> str:
    """The report's main number for ``task``: ``top1`` (%, higher is better) or ``perplexity`` (lower is better)."""
    return "perplexity" if task == CAUSAL_LM else "top1"


def evaluate(model: nn.Module, loader: DataLoader, rt: Runtime, task: str = "classify") -> dict[str, float]:
    """``task``'s evaluation over the loader (all processes' shares together): loss and top1 or perplexity."""
    return evaluate_lm(model, loader, rt) if task == CAUSAL_LM else evaluate_classifier(model, loader, rt)


def evaluate_lm(model: nn.Module, loader: DataLoader, rt: Runtime) -> dict[str, float]:
    """Mean next-token cross-entropy over every predicted token of the loader's blocks, and its perplexity."""

    def per_batch(logits: Tensor, targets: Tensor) -> list[float]:
        loss = next_token_loss(logits, targets, "sum").item()
        return [loss, float(targets[:, 1:].numel()), float(len(targets))]

    loss, tokens, n = eval_sums(model, loader, rt, per_batch) or [0.0, 0.0, 0.0]
    mean = loss / max(tokens, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 700.0)), "tokens": int(tokens), "n": int(n)}


def check_fit(model: nn.Module, task: str, block_size: int) -> None:
    """Refuses causal-LM blocks longer than the model's positions (its embedding would index past its end)."""
    config = getattr(model, "config", None)
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if task == CAUSAL_LM and isinstance(limit, int) and block_size > limit:
        raise DeltaTuneError(f"block_size {block_size} exceeds the model's {limit} positions; set --block-size {limit}")
