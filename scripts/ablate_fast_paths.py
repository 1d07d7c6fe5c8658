"""Where the fast paths' step time goes: each piece left out in turn (wrong gradients, timing only), stepped
round-robin with the floor, as paired ratios to the floor.

    python scripts/ablate_fast_paths.py --rounds 16 --out benchmarks/ablate_fast_paths.md

Rows: the floor; SSF as shipped and without its per-channel column sums (``kernels.ssf.column_sums`` returning
zeros); LoRA as shipped, without its low-rank gradients (the rank-r products and the input recompute: dA, dB set to
zeros) and without the merged weight (W used as it is, forward and backward). A piece's cost is its row's ratio
minus the shipped row's. The left-out variants train nothing useful: they exist to time, never to run.

``--pieces`` adds a second table: LoRA as shipped (right gradients), with its pieces timed inside the step by
wrapping ``kernels.lora``'s functions with a clock (CPU ops are synchronous, so a call's wall time is its cost),
each piece's ms per step beside the floor's step in the same rounds; once with the compiled kernel for the rank-r
products (``kernels.native``, the default) and once with PyTorch matmuls.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import timm
import torch

from deltatune.bench import cases
from deltatune.bench.measure import paired_ratio, round_robin
from deltatune.kernels import lora as fast_lora
from deltatune.kernels import native_kernels
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


PIECES = {  # kernels.lora function (the recompute also by kind, the merged weight also in backward) -> what it is
    "lora_weight": "merged weight W + s B A, forward",
    "lora_weight (backward)": "merged weight rebuilt in backward (part of input_grad's time)",
    "_from_recipe": "dA, dB by the compiled kernel, x recomputed inside it from its LayerNorm (qkv, fc1)",
    "recompute (gelu)": "fc2's input recomputed from the GELU's kept input",
    "recompute (layer_norm)": "qkv's and fc1's input recomputed from the LayerNorm's kept tensors (kernel off)",
    "_low_rank_grads": "dA, dB from x (proj; fc2 after its recompute): compiled kernel, else four matmuls",
    "input_grad": "dx = dy (W + s B A), merged weight rebuilt",
}


@contextlib.contextmanager
def timed_pieces(totals: dict[str, float]) -> Iterator[None]:
    """Adds the wall ms of each of ``kernels.lora``'s pieces to ``totals``, keyed as ``PIECES``."""

    inside: list[str] = []  # the pieces running now: lora_weight inside input_grad is the backward's rebuild

    def clock(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any) -> Any:
            key = f"{name} ({args[0]})" if name == "recompute" else name
            key = f"{name} (backward)" if name == "lora_weight" and "input_grad" in inside else key
            inside.append(name)
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                totals[key] += 1e3 * (time.perf_counter() - start)
                inside.pop()

        return run

    with contextlib.ExitStack() as stack:
        for name in ("lora_weight", "recompute", "_from_recipe", "_low_rank_grads", "input_grad"):
            stack.enter_context(mock.patch.object(fast_lora, name, clock(name, getattr(fast_lora, name))))
        yield


def pieces_table(built: dict[str, cases.Case], x: torch.Tensor, target: torch.Tensor, args: Any) -> str:
    """LoRA's pieces in ms per step (timed inside the shipped step), with the compiled kernel and with the matmuls
    (``native_kernels(False)``), beside the floor's and both LoRA step times, all stepped round-robin."""
    totals: dict[str, dict[str, float]] = {"kernel": defaultdict(float), "matmuls": defaultdict(float)}

    def lora(kind: str) -> Callable[[], None]:
        def run() -> None:
            with native_kernels(kind == "kernel"), timed_pieces(totals[kind]):
                cases.train_step(built["lora"], x, target, None)

        return run

    steps = {"floor": lambda: cases.train_step(built["floor"], x, target, None), **{k: lora(k) for k in totals}}
    times = round_robin(steps, args.warmup, args.rounds, torch.device("cpu"))
    floor = statistics.median(times["floor"])
    calls = args.warmup + args.rounds  # totals include the warm-up rounds: per step, every round alike
    lines = [
        "| piece (LoRA, all linears), ms per step | kernel | x floor | matmuls | x floor |",
        "| --- | --- | --- | --- | --- |",
        f"| floor step (median) | {floor:.1f} | 1.000 | {floor:.1f} | 1.000 |",
    ]
    cells = [f"{statistics.median(times[k]):.1f} | {paired_ratio(times[k], times['floor']):.3f}" for k in totals]
    lines.append(f"| LoRA step (median; paired ratio) | {' | '.join(cells)} |")
    for key in PIECES:
        cells = [f"{totals[k][key] / calls:.1f} | {totals[k][key] / calls / floor:.3f}" for k in totals]
        lines.append(f"| `{key}`: {PIECES[key]} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--img-size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write the table as Markdown here")
    parser.add_argument("--pieces", action="store_true", help="also time LoRA's pieces inside its shipped step")
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
    if args.pieces:
        text += "\n\nLoRA's pieces inside its shipped step (right gradients), floor and LoRA stepped round-robin:\n\n"
        text += pieces_table(built, x, target, args)
    print(text)
    if args.out:
        flags = f"--rounds {args.rounds}" + (" --pieces" if args.pieces else "")
        args.out.write_text(f"```\npython scripts/ablate_fast_paths.py {flags}\n```\n\n{text}\n")


if __name__ == "__main__":
    main()
