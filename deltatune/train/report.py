"""The final report of a run: accuracy, trainable parameters, delta-file bytes, GFLOPs before and after merging,
inference images/s; printed as a table (text or Markdown) and plotted as accuracy against trainable parameters.

GFLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` for one example (batch 1); it counts a
multiply-add as 2 FLOPs (fvcore, used by many papers, counts it as 1).
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from deltatune import kernels
from deltatune._plot import pyplot, save
from deltatune.backbones import forward
from deltatune.core import merge, state_of, trainable_parameters, unwrap
from deltatune.train.tracking import log_figure

Inputs = torch.Tensor | dict[str, torch.Tensor]

# key, header, format
COLUMNS: list[tuple[str, str, str]] = [
    ("method", "method", "{}"),
    ("top1", "top-1 %", "{:.2f}"),
    ("perplexity", "perplexity", "{:.2f}"),
    ("trainable_params", "trainable params", "{:,}"),
    ("trainable_pct", "% of backbone", "{:.3f}"),
    ("delta_bytes", "delta bytes", "{:,}"),
    ("gflops", "GFLOPs", "{:.4f}"),
    ("gflops_merged", "GFLOPs merged", "{:.4f}"),
    ("images_per_s", "images/s", "{:.0f}"),
]


def first(inputs: Inputs, n: int = 1) -> Inputs:
    """The first ``n`` examples of a batch."""
    return {k: v[:n] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[:n]


@torch.no_grad()
def count_gflops(model: nn.Module, example: Inputs) -> float:
    """Inference GFLOPs of ``model`` for one example (multiply-add = 2 FLOPs), of the deltas' own formulas.

    The fast paths run off: the adapter's in-place up-projection (``addmm_``) is not counted by torch's counter, and
    LoRA's merge-on-the-fly weight product would be counted per call as if it scaled with the batch.
    """
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter, kernels.disabled():
        forward(model, first(example))
    model.train(was_training)
    return counter.get_total_flops() / 1e9


def merged_copy(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """A merged deep copy of a tuned model and the warnings naming deltas that could not merge."""
    merged = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merge(merged)
    return merged, [str(w.message) for w in caught]


def plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy with every delta removed: the plain backbone's architecture."""
    plain = copy.deepcopy(model)
    unwrap(plain)
    return plain


@torch.no_grad()
def images_per_second(model: nn.Module, batch: Inputs, seconds: float = 1.0, amp: bool = False) -> float:
    """Inference throughput on ``batch`` (already on the model's device), timed for about ``seconds``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n = len(next(iter(batch.values()))) if isinstance(batch, dict) else len(batch)

    def run() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            forward(model, batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    run()  # warm-up
    iters, start = 0, time.perf_counter()
    while iters < 2 or time.perf_counter() - start < seconds:
        run()
        iters += 1
    model.train(was_training)
    return iters * n / (time.perf_counter() - start)


def measure(model: nn.Module, batch: Inputs, seconds: float = 1.0, amp: bool = False) -> dict[str, Any]:
    """Parameter counts, GFLOPs before/after merging (and of the plain backbone) and images/s of a tuned model."""
    state = state_of(model)
    backbone = state.backbone_params if state else sum(p.numel() for p in model.parameters())
    trainable = trainable_parameters(model)
    merged, unmerged = merged_copy(model)
    agree, diff = merge_agreement(model, merged, batch)
    out: dict[str, Any] = {
        "trainable_params": trainable,
        "backbone_params": backbone,
        "trainable_pct": 100.0 * trainable / max(backbone, 1),
        "gflops": count_gflops(model, batch),
        "gflops_merged": count_gflops(merged, batch),
        "gflops_backbone": count_gflops(plain_copy(model), batch),
        "unmerged": unmerged,
        "merge_agreement": agree,
        "merge_max_logit_diff": diff,
    }
    if seconds > 0:
        out["images_per_s"] = images_per_second(model, batch, seconds, amp)
        out["images_per_s_merged"] = images_per_second(merged, batch, seconds, amp)
    return out


@torch.no_grad()
def merge_agreement(model: nn.Module, merged: nn.Module, batch: Inputs) -> tuple[float, float]:
    """Fraction of ``batch`` on which the tuned and merged models predict the same class, and their largest
    absolute logit difference (both in eval mode, float32)."""
    states = model.training, merged.training
    model.eval()
    merged.eval()
    a, b = forward(model, batch).float(), forward(merged, batch).float()
    model.train(states[0])
    merged.train(states[1])
    return (a.argmax(-1) == b.argmax(-1)).float().mean().item(), (a - b).abs().max().item()


def format_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]] = COLUMNS, markdown: bool = False
) -> str:
    """Rows of report dicts as an aligned text table (or a Markdown table); missing values print as '-'."""
    cols = [c for c in columns if any(c[0] in r for r in rows)]
    cells = [[c[1] for c in cols]]
    for r in rows:
        cells.append([fmt.format(r[key]) if r.get(key) is not None else "-" for key, _, fmt in cols])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]

    def line(row: list[str]) -> str:
        parts = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        return "| " + " | ".join(parts) + " |" if markdown else "  ".join(parts)

    rule = (
        "|" + "|".join(("-" * (w + 1) + ":") if i else ("-" * (w + 2)) for i, w in enumerate(widths)) + "|"
        if markdown
        else "-" * len(line(cells[0]))
    )
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def plot_accuracy_vs_params(
    rows: Sequence[dict[str, Any]], path: str | Path, title: str = "", tb_dir: str | Path | None = None
) -> Path:
    """Saves a PNG of top-1 against trainable parameters (log x), one labelled point per method (and, given
    ``tb_dir``, logs the figure to TensorBoard in ``tb_dir/tb``)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for r in rows:
        ax.scatter(r["trainable_params"], r["top1"], s=40)
        ax.annotate(r["method"], (r["trainable_params"], r["top1"]), textcoords="offset points", xytext=(5, 4))
    ax.set_xscale("log")
    ax.margins(x=0.15, y=0.1)  # room for the labels of the outermost points
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title or "accuracy vs trainable parameters")
    ax.grid(True, which="both", alpha=0.3)
    if tb_dir is not None:
        log_figure(tb_dir, "accuracy_vs_params", fig)
    return save(fig, path)
