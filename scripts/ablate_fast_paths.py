"""Where the fast paths' step time goes: each piece left out in turn (wrong gradients, timing only), stepped
round-robin with the floor, as paired ratios to the floor.

    python scripts/ablate_fast_paths.py --rounds 16 --out benchmarks/ablate_fast_paths.md

Rows: the floor; SSF as shipped and without its per-channel column sums (``kernels.ssf.column_sums`` returning
zeros); LoRA as shipped, without its low-rank gradients (the rank-r products and the input recompute: dA, dB set to
zeros) and without the merged weight (W used as it is, forward and backward). A piece's cost is its row's ratio
minus the shipped row's. The left-out variants train nothing useful: they exist to time, never to run.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import timm
import torch

from deltatune.bench import cases
from deltatune.bench.measure import paired_ratio, round_robin
from deltatune.kernels import lora as fast_lora
from deltatune.kernels import ssf as fast_ssf
from deltatune.kernels._common import rows


def _no_sums(dy: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    zero = dy.new_zeros(dy.shape[1])
    return zero, None if y is None else zero


def _input_grad_only(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """LoRA's backward with dx only: the merged weight rebuilt as shipped, dA and dB zeros."""
    *_, weight, lora_a, lora_b = ctx.saved_tensors
    dx = None
    if weight is not None:
        dx = fast_lora.input_grad(rows(dy), weight, lora_a, lora_b, ctx.chunks, ctx.scaling)
        dx = dx.view(*dy.shape[:-1], weight.shape[1])
    return dx, None, None, torch.zeros_like(lora_a), torch.zeros_like(lora_b), None, None


VARIANTS: dict[str, tuple[str, Callable[[], contextlib.AbstractContextManager]]] = {
    "floor": ("floor", contextlib.nullcontext),
    "ssf": ("ssf", contextlib.nullcontext),
    "ssf without column sums": ("ssf", lambda: mock.patch.object(fast_ssf, "column_sums", _no_sums)),
    "lora": ("lora", contextlib.nullcontext),
    "lora without low-rank grads": (
        "lora",
        lambda: mock.patch.object(fast_lora.LoRALinearFn, "backward", staticmethod(_input_grad_only)),
    ),
    "lora without merged weight": ("lora", lambda: mock.patch.object(fast_lora, "lora_weight", lambda w, *_: w)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--img-size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write the table as Markdown here")
    args = parser.parse_args()

    def make() -> torch.nn.Module:
        torch.manual_seed(0)
        return timm.create_model(args.model, pretrained=False, num_classes=100, img_size=args.img_size).train()

    built = {name: cases.build_case(name, make, False, False) for name in ("floor", "ssf", "lora")}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=g)
    target = torch.randint(0, 100, (args.batch,), generator=g)

    def step(case: str, patch: Callable[[], contextlib.AbstractContextManager]) -> Callable[[], None]:
        def run() -> None:
            with patch():
                cases.train_step(built[case], x, target, None)

        return run

    steps = {name: step(case, patch) for name, (case, patch) in VARIANTS.items()}
    times = round_robin(steps, args.warmup, args.rounds, torch.device("cpu"))
    lines = [
        f"{args.model}, {args.img_size} px, batch {args.batch}, fp32, {torch.get_num_threads()} threads, wall clock, "
        f"{args.rounds} rounds after {args.warmup}",
        "",
        "| variant | step ms (median) | x floor, paired |",
        "| --- | --- | --- |",
    ]
    for name, t in times.items():
        lines.append(f"| {name} | {statistics.median(t):.1f} | {paired_ratio(t, times['floor']):.3f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(f"```\npython scripts/ablate_fast_paths.py --rounds {args.rounds}\n```\n\n{text}\n")


if __name__ == "__main__":
    main()
