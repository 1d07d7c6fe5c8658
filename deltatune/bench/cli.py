"""``deltatune bench``: training-step time, images/s, memory and inference time of every method, in one run,
as ratios to full fine-tuning and to the floor (the same model with every weight frozen and the input requiring
grad: forward plus input-gradient backward, the least any frozen-backbone method can cost).

    deltatune bench --device cpu --model vit_small_patch16_224 --img-size 112 --batch 32 --json out.json

Configurations are stepped round-robin (one step of each, the order rotated every round) and each one's median
is kept, so the drift of a shared machine hits all alike. Memory: on CUDA the step's max_memory_allocated plus
the configuration's resident weights and optimizer state; on CPU the activation bytes saved for backward
(``deltatune.bench.measure``), which is what the peak on a GPU mostly is. ``*-plain`` rows run the wrappers' plain
formulas (``deltatune.kernels.disabled``): the obvious implementation the fast paths replace. ``lora-recompute``
forces LoRA to recompute its LayerNorm/GELU inputs in backward (now the default on every device, so it equals
``lora``; ``deltatune.kernels.lora``). With ``--compile`` every configuration compiles as ``--partitioner``
says (default ``lean``: ``deltatune.compile``; ``torch``: ``torch.compile``), the floor included.
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import deltatune
from deltatune import kernels
from deltatune.bench import _report, multitask
from deltatune.bench.measure import count_saved, cuda_peak, paired_ratio, resident_bytes, round_robin
from deltatune.methods.pruning import prune_adapters
from deltatune.targeting import find_head, is_delta
from deltatune.train.report import count_gflops

METHODS = (
    "floor", "full", "linear", "bitfit", "ssf", "ssf-plain", "lora", "lora-plain", "lora-recompute", "adapter", "mimi"
)  # fmt: skip
PEFT_METHODS = ("peft-lora", "peft-ia3")
OPTIONS: dict[str, tuple[str, dict[str, Any]]] = {  # row -> (deltatune method, options)
    "full": ("full", {}),
    "linear": ("linear", {}),
    "bitfit": ("bitfit", {}),
    "ssf": ("ssf", {}),
    "lora": ("lora", {"r": 8, "alpha": 16.0, "target_modules": "all-linear"}),
    "adapter": ("adapter", {"hidden": 24}),
    "mimi": ("mimi", {}),  # sigma 4, then pruned to MIMI_KEEP of its neurons (``_prune_as_mimi``)
}
MIMI_KEEP = 4 / 32  # MiMi's default end point: from sigma 4 to the size sigma 32 gives
NUM_CLASSES = 100
# --partitioner lean: deltatune.compile (AOTAutograd's partitioner may recompute ops outside its allowlist, timm's
# qkv unbind, and values made far apart, the residual stream: kernels/compile.py); torch: torch.compile as it is.
# Every configuration alike, the floor's included.
PARTITIONERS: dict[str, Callable[[nn.Module], nn.Module]] = {"lean": deltatune.compile, "torch": torch.compile}


@dataclass
class Case:
    """One configuration: its model (maybe compiled), optimizer and how to merge it."""

    name: str
    raw: nn.Module
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    trainable: int
    plain: bool = False
    floor: bool = False
    recompute: bool | None = None
    merge: Callable[[nn.Module], nn.Module] | None = None
    result: dict[str, Any] = field(default_factory=dict)


def _peft_model(model: nn.Module, name: str) -> nn.Module | None:
    """HF peft's LoRA (r=8 on every Linear but the head) or IA3 (qkv and fc2), head trained; None without peft."""
    try:
        import peft
    except ImportError:
        return None
    head = find_head(model, True)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != head]
    saved = [head] if head else None
    if name == "peft-lora":
        config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=linears, modules_to_save=saved)
    else:
        targets = [n for n in linears if n.endswith(("qkv", "fc2"))]
        if not targets:
            return None
        ff = [n for n in targets if n.endswith("fc2")]
        config = peft.IA3Config(target_modules=targets, feedforward_modules=ff, modules_to_save=saved)
    return peft.get_peft_model(model, config)


def build_case(
    name: str, make: Callable[[], nn.Module], compile_model: bool, fused: bool, partitioner: str = "lean"
) -> Case | None:
    """The configuration ``name`` on a fresh backbone (None: peft missing or not applicable)."""
    model = make()
    merge: Callable[[nn.Module], nn.Module] | None = None
    if name == "floor":
        model.requires_grad_(False)
    elif name in PEFT_METHODS:
        model = _peft_model(model, name)
        if model is None:
            return None
        merge = lambda m: m.merge_and_unload()  # noqa: E731
    else:
        method, options = OPTIONS[name.removesuffix("-plain").removesuffix("-recompute")]
        deltatune.apply(model, method, **options)
        if method == "mimi":
            _prune_as_mimi(model)
        if any(is_delta(m) for m in model.modules()):
            merge = deltatune.merge
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=fused) if params else None
    compiled = PARTITIONERS[partitioner](model) if compile_model else model
    trainable = sum(p.numel() for p in params)
    recompute = True if name.endswith("-recompute") else None
    plain, floor = name.endswith("-plain"), name == "floor"
    return Case(name, model, compiled, optimizer, trainable, plain, floor, recompute, merge)


def _prune_as_mimi(model: nn.Module) -> None:
    """MiMi's end state without its training: the adapters pruned globally by MiMi's score to ``MIMI_KEEP`` of their
    neurons in three halvings (its phases), so the sites end with unequal sizes as a global ranking leaves them."""
    for done in (0.5, 0.75, 1 - MIMI_KEEP):
        prune_adapters(model, done, score="mimi", scope="global")


def _logits(out: Any) -> Tensor:
    return out.logits if hasattr(out, "logits") else out


@contextlib.contextmanager
def _mode(case: Case, amp: torch.dtype | None, device: torch.device) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        stack.enter_context(kernels.recompute_inputs(case.recompute))
        if case.plain:
            stack.enter_context(kernels.disabled())
        if amp is not None:
            stack.enter_context(torch.autocast(device.type, dtype=amp))
        yield


def train_step(case: Case, x: Tensor, target: Tensor, amp: torch.dtype | None) -> None:
    """Forward, loss, backward and optimizer step (the floor: forward and input-gradient backward only)."""
    inp = x.detach().requires_grad_() if case.floor else x
    with _mode(case, amp, x.device):
        loss = F.cross_entropy(_logits(case.model(inp)).float(), target)
    loss.backward()
    if case.optimizer is not None:
        case.optimizer.step()
        case.optimizer.zero_grad(set_to_none=True)


def _resident(case: Case) -> list[Tensor]:
    """The configuration's weights and optimizer state: resident for the whole run."""
    tensors = [*case.raw.parameters(), *case.raw.buffers()]
    if case.optimizer is not None:
        for state in case.optimizer.state.values():
            tensors += [t for t in state.values() if isinstance(t, Tensor)]
    return tensors


def measure_memory(case: Case, x: Tensor, target: Tensor, amp: torch.dtype | None) -> dict[str, Any]:
    """CUDA: the step's peak bytes as if it ran alone. CPU: activation bytes saved for backward, counted (of the
    compiled graph with --compile)."""
    if x.device.type == "cuda":
        peak = cuda_peak(lambda: train_step(case, x, target, amp), x.device) + resident_bytes(_resident(case))
        return {"memory_kind": "cuda_peak", "memory_bytes": peak}
    inp = x.detach().requires_grad_() if case.floor else x
    with _mode(case, amp, x.device):
        counter = count_saved(case.model, inp)  # compiled: what the compiled graph keeps
    return {
        "memory_kind": "saved_activations",
        "memory_bytes": counter.bytes,
        "saved_with_weights": counter.total_bytes,
    }


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
