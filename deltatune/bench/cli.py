"""``deltatune bench``: training-step time, images/s, memory and inference time of every method, in one run,
as ratios to full fine-tuning and to the floor (the same model with every weight frozen and the input requiring
grad: forward plus input-gradient backward, the least any frozen-backbone method can cost).

    deltatune bench --device cpu --model vit_small_patch16_224 --img-size 112 --batch 32 --json out.json

Configurations are stepped round-robin (one step of each, the order rotated every round) and each one's median
is kept, so the drift of a shared machine hits all alike. Memory: on CUDA the step's max_memory_allocated plus
the configuration's resident weights and optimizer state; on CPU the activation bytes saved for backward
(``deltatune.bench.measure``), which is what the peak on a GPU mostly is. ``*-plain`` rows run the wrappers' plain
formulas (``deltatune.kernels.disabled``): the obvious implementation the fast paths replace. ``lora-keep``
keeps LoRA's inputs for backward instead of recomputing them from their LayerNorm/GELU producers (the default,
``deltatune.kernels.lora``): the other side of that trade-off, time against saved bytes. ``lora-ops`` runs LoRA's
rank-r gradient products as PyTorch matmuls instead of the compiled CPU kernel (``deltatune.kernels.native``).
With ``--compile`` every configuration compiles as ``--partitioner`` says (default ``lean``: ``deltatune.compile``;
``torch``: ``torch.compile``), the floor included.
``floor-twin`` is a second floor stepped as its own row: its ratio to the floor is the run's timing noise, and
'paired IQR' (the quartiles of the same-round ratios) shows how far a row's rounds stray.
``mimi`` is MiMi's end state (sigma-4 adapters pruned globally by its score to 1/8 of their neurons, untrained).
Unmerged inference is also reported over the plain model plus the deltas' own FLOPs (``count_gflops``): the
allowance adapters and MiMi are judged by. ``--multitask 1,4,16`` times mixed-task batches instead
(``deltatune.bench.multitask``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn

import deltatune
from deltatune import kernels
from deltatune.bench import _report, multitask
from deltatune.bench.cases import (
    FLOORS,
    METHODS,
    NUM_CLASSES,
    PARTITIONERS,
    PEFT_METHODS,
    Case,
    build_case,
    measure_memory,
    train_step,
)
from deltatune.bench.measure import paired_quartiles, paired_ratio, round_robin
from deltatune.train.report import count_gflops


def _inference(model: nn.Module, x: Tensor, amp: torch.dtype | None, plain: bool) -> Callable[[], None]:
    autocast = torch.autocast(x.device.type, dtype=amp) if amp is not None else contextlib.nullcontext()

    def run() -> None:
        with torch.no_grad(), kernels.disabled() if plain else contextlib.nullcontext(), autocast:
            model(x)

    return run


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Runs every configuration and returns the report (meta and one result per configuration)."""
    device = torch.device(args.device)
    amp = torch.bfloat16 if args.dtype == "bf16" else None
    names = [n.strip() for n in args.methods.split(",")] if args.methods else [*METHODS, *PEFT_METHODS]
    unknown = set(names) - {*METHODS, *PEFT_METHODS}
    if unknown:
        choices = ", ".join(METHODS + PEFT_METHODS)
        raise deltatune.DeltaTuneError(f"bench: unknown configuration(s) {sorted(unknown)}; choose from {choices}")
    names = list(dict.fromkeys(["floor", "full", *names]))  # the ratios need both

    def make() -> nn.Module:
        torch.manual_seed(0)
        model = timm.create_model(args.model, pretrained=False, num_classes=NUM_CLASSES, img_size=args.img_size)
        return model.to(device).train()

    fused = device.type == "cuda"
    build = lambda n: build_case(n, make, args.compile, fused, args.partitioner)  # noqa: E731
    cases = {c.name: c for n in names if (c := build(n)) is not None}
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=g).to(device)
    target = torch.randint(0, NUM_CLASSES, (args.batch,), generator=g).to(device)
    steps = {n: (lambda c=c: train_step(c, x, target, amp)) for n, c in cases.items()}
    times = round_robin(steps, args.warmup, args.steps, device, args.clock)
    for case in cases.values():
        case.result = {"name": case.name, "trainable": case.trainable, "step_ms_all": times[case.name]}
        case.result.update(measure_memory(case, x, target, amp))
    infer = _inference_times(cases, x, amp, args)
    plain_flops = count_gflops(cases["floor"].raw, x)
    for case in cases.values():  # the adapters' own FLOPs: the allowance their unmerged inference is judged by
        case.result["flops_x_plain"] = count_gflops(case.raw, x) / plain_flops
    meta = {**_report.meta(args, device), "partitioner": args.partitioner if args.compile else None}
    return {"meta": meta, "results": _results(cases, infer, args.batch)}


def _inference_times(
    cases: dict[str, Case], x: Tensor, amp: torch.dtype | None, args: argparse.Namespace
) -> dict[str, list[float]]:
    """Inference ms per round of the plain backbone and of each configuration, unmerged and merged."""
    xi = x[: args.infer_batch] if args.infer_batch <= len(x) else x.repeat(-(-args.infer_batch // len(x)), 1, 1, 1)
    xi = xi[: args.infer_batch]
    fns = {"plain": _inference(cases["floor"].model.eval(), xi, amp, False)}
    for case in cases.values():
        if case.name in FLOORS[1:]:  # the floor's twin: a second plain model timed as its own row, the noise
            fns[case.name] = _inference(case.model.eval(), xi, amp, False)
        if case.merge is None:  # the plain architecture (floor, full, linear, BitFit): timed as "plain"
            continue
        fns[case.name] = _inference(case.model.eval(), xi, amp, case.plain)
        if case.merge is not None and not case.plain:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # adapters stay unmerged: timed as they are
                merged = case.merge(copy.deepcopy(case.raw)).eval()
            fns[case.name + ":merged"] = _inference(torch.compile(merged) if args.compile else merged, xi, amp, False)
    return round_robin(fns, args.warmup, args.infer_steps or args.steps, x.device, args.clock)


def _results(cases: dict[str, Case], infer: dict[str, list[float]], batch: int) -> list[dict[str, Any]]:
    full, floor = cases["full"].result, cases["floor"].result
    t_full, t_floor = statistics.median(full["step_ms_all"]), statistics.median(floor["step_ms_all"])
    out = []
    for case in cases.values():
        r = case.result
        r["step_ms"] = statistics.median(r["step_ms_all"])
        r["images_per_s"] = 1e3 * batch / r["step_ms"]
        r["step_x_full"], r["step_x_floor"] = r["step_ms"] / t_full, r["step_ms"] / t_floor
        r["step_x_floor_paired"] = paired_ratio(r["step_ms_all"], floor["step_ms_all"])
        r["step_x_floor_iqr"] = list(paired_quartiles(r["step_ms_all"], floor["step_ms_all"]))
        r["step_x_floor_best"] = min(r["step_ms_all"]) / min(floor["step_ms_all"])
        r["memory_x_floor"] = r["memory_bytes"] / floor["memory_bytes"]
        plain = infer["plain"]
        unmerged = infer.get(case.name, plain)
        merged = infer.get(case.name + ":merged") if case.merge is not None else unmerged
        r["infer_ms_all"], r["merged_infer_ms_all"] = unmerged, None if case.plain else merged
        r["infer_ms"] = statistics.median(unmerged)
        r["merged_infer_ms"] = None if case.plain or merged is None else statistics.median(merged)
        r["infer_x_plain"] = paired_ratio(unmerged, plain)  # same-round ratios: a few % of drift cancels
        r["infer_x_plain_flops"] = r["infer_x_plain"] / r["flops_x_plain"]  # over plain + the deltas' own FLOPs
        r["merged_x_plain"] = None if r["merged_infer_ms"] is None else paired_ratio(merged, plain)
        r["merged_x_plain_best"] = None if r["merged_infer_ms"] is None else min(merged) / min(plain)
        out.append(r)
    return out


COLUMNS: list[tuple[str, str, str]] = [  # (header, result key, format)
    ("config", "name", "{}"),
    ("step ms", "step_ms", "{:.1f}"),
    ("x full", "step_x_full", "{:.2f}"),
    ("x floor", "step_x_floor", "{:.2f}"),
    ("x floor, paired", "step_x_floor_paired", "{:.2f}"),
    ("paired IQR", "step_x_floor_iqr", "{0[0]:.2f}-{0[1]:.2f}"),
    ("x floor, best", "step_x_floor_best", "{:.2f}"),
    ("img/s", "images_per_s", "{:.1f}"),
    ("MiB", "memory_mib", "{:.1f}"),
    ("mem x floor", "memory_x_floor", "{:.2f}"),
    ("trainable", "trainable", "{:,}"),
    ("infer ms", "infer_ms", "{:.1f}"),
    ("infer x plain, paired", "infer_x_plain", "{:.3f}"),
    ("FLOPs x plain", "flops_x_plain", "{:.3f}"),
    ("infer x (plain + FLOPs)", "infer_x_plain_flops", "{:.3f}"),
    ("merged ms", "merged_infer_ms", "{:.1f}"),
    ("merged x plain", "merged_x_plain", "{:.3f}"),
    ("merged x plain, best", "merged_x_plain_best", "{:.3f}"),
]


def table(report: dict[str, Any]) -> str:
    """The report as a Markdown table (MiB: CUDA peak, or activations saved for backward on CPU)."""
    rows = [[h for h, _, _ in COLUMNS], ["---"] * len(COLUMNS)]
    for r in report["results"]:
        r = {**r, "memory_mib": r["memory_bytes"] / 2**20}
        rows.append(["-" if r[k] is None else f.format(r[k]) for _, k, f in COLUMNS])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The bench's options."""
    cuda = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if cuda else "cpu", help="cpu or cuda (default: cuda if any)")
    parser.add_argument(
        "--model",
        default=None,
        help="timm model name (default: vit_base_patch16_224 on CUDA, "
        "vit_small_patch16_224 on CPU), random init, 100 classes",
    )
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: 128 on CUDA, 32 on CPU)")
    parser.add_argument("--img-size", type=int, default=None, help="image size (default: 224 on CUDA, 112 on CPU)")
    parser.add_argument(
        "--dtype",
        choices=("fp32", "bf16"),
        default=None,
        help="fp32, or bf16 autocast (default: bf16 on CUDA, fp32 on CPU)",
    )
    parser.add_argument("--steps", type=int, default=10, help="timed rounds (one step of every configuration each)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--infer-batch", type=int, default=None, help="inference batch (default: --batch)")
    parser.add_argument("--infer-steps", type=int, default=None, help="timed inference rounds (default: --steps)")
    parser.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated subset of {', '.join(METHODS + PEFT_METHODS)} (floor and full always run); "
        f"with --multitask, of {', '.join(multitask.METHODS)}",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile every model (training and inference)")
    parser.add_argument(
        "--partitioner",
        choices=tuple(PARTITIONERS),
        default="lean",
        help="with --compile: 'lean' compiles with deltatune.compile (the partitioner may also recompute timm's qkv "
        "split and the residual stream), 'torch' with torch.compile as it is; every configuration alike",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall clock, or this process's CPU time (with --threads 1: robust to other processes on a shared machine)",
    )
    parser.add_argument(
        "--multitask",
        default=None,
        metavar="N,N,...",
        help="time mixed-task batches of N tasks instead (ssf, bitfit, lora, ia3; deltatune.bench.multitask)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the report as JSON here")
    parser.add_argument("--md", type=Path, default=None, help="write the table as Markdown here, command on top")


def run(args: argparse.Namespace) -> int:
    """Runs the bench for parsed arguments: prints the table, writes JSON/Markdown; returns 0."""
    cuda = args.device.startswith("cuda")
    args.model = args.model or ("vit_base_patch16_224" if cuda else "vit_small_patch16_224")
    args.batch = args.batch or (128 if cuda else 32)
    args.img_size = args.img_size or (224 if cuda else 112)
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.infer_batch = args.infer_batch or args.batch
    if getattr(args, "argv", None) is None:  # mounted as `deltatune bench`: what follows the subcommand
        argv = sys.argv[1:]
        args.argv = argv[argv.index("bench") + 1 :] if "bench" in argv else argv
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile:  # every configuration recompiles the same forward code: past dynamo's 8, it would run eager
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    if args.multitask:
        report = {"meta": _report.meta(args, torch.device(args.device)), **multitask.run_multitask(args)}
        text, line = multitask.table(report), multitask.describe(report["meta"])
    else:
        report = run_bench(args)
        text, line = table(report), _report.setting(report["meta"])
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(_report.markdown(report, line, text))
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Mounts ``bench`` on the ``deltatune`` command's subparsers (``func`` runs it)."""
    parser = subparsers.add_parser(
        "bench",
        help="time and measure every method against full FT and the floor",
        description=__doc__.split("\n\n")[0],
    )
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m deltatune.bench``: the same as ``deltatune bench``."""
    parser = argparse.ArgumentParser(prog="deltatune bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
