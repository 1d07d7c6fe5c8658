"""Mixed-task batches of VPT and prefix tasks: one backbone pass (per-row prompt/prefix slots) against grouped.

    PYTHONPATH=. python scripts/bench_multitask_tokens.py --threads 1 --clock cpu \
        --md benchmarks/multitask_tokens_vit_small.md

For each setting and task count N the batch's rows take tasks t0..t{N-1} round-robin; timed round-robin
(``deltatune.bench.measure``): ``single`` (t0's own model on the whole batch, t0 having the largest p), ``mixed``
(``MultiTaskModel``, one pass) and ``grouped`` (each task's rows through its own model). Ratios are paired medians
of time / the single-task time of the same round; ``max err`` is the largest |logit - reference| of mixed, the
reference being each task's file loaded into a fresh backbone. "same p" settings need no mask; "p A/B" settings
alternate prompt counts (a key-padding mask); "+ SSF" puts SSF tasks (no prompts, all slots masked) beside them.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import timm
import torch

import deltatune
from deltatune.bench.measure import paired_ratio, round_robin
from deltatune.serve import MultiTaskModel

# setting -> per-task (method, options), cycled over the tasks
SETTINGS = {
    "vpt-deep, same p=10": [("vpt-deep", {"num_tokens": 10})],
    "vpt-deep, p 10/5": [("vpt-deep", {"num_tokens": 10}), ("vpt-deep", {"num_tokens": 5})],
    "vpt-deep p=10 + SSF": [("vpt-deep", {"num_tokens": 10}), ("ssf", {})],
    "prefix, same p=10": [("prefix", {"num_tokens": 10, "reparameterize": False})],
    "prefix, p 10/5": [("prefix", {"num_tokens": 10, "reparameterize": False}),
                       ("prefix", {"num_tokens": 5, "reparameterize": False})],
}  # fmt: skip


def measure(args: argparse.Namespace, setting: str, tasks: int, x: torch.Tensor, folder: Path) -> dict[str, float]:
    """Paired ratios to ``single`` of mixed and grouped, and mixed's largest error against the loaded files."""

    def make() -> torch.nn.Module:
        torch.manual_seed(0)
        return timm.create_model(args.model, num_classes=10, img_size=args.img_size).eval()

    specs = SETTINGS[setting]
    mt, refs = MultiTaskModel(make()).eval(), []
    for i in range(tasks):
        method, options = specs[i % len(specs)]
        model = deltatune.apply(make(), method, **options)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.02)
        path = folder / f"t{i}.safetensors"
        deltatune.save_delta(model, path)
        mt.add_task(f"t{i}", path)
        refs.append(deltatune.load_delta(make(), path).eval())
    names = [f"t{i % tasks}" for i in range(len(x))]
    rows = [[j for j, n in enumerate(names) if n == f"t{i}"] for i in range(tasks)]

    def grouped() -> None:
        for i, r in enumerate(rows):
            mt.task_model(f"t{i}")(x[r])

    with torch.inference_mode():
        want = torch.empty(len(x), 10)
        for i, r in enumerate(rows):
            want[r] = refs[i](x[r])
        err = (mt(x, names, strict=True) - want).abs().max().item()
        fns = {"single": lambda: mt.task_model("t0")(x), "mixed": lambda: mt(x, names, strict=True), "grouped": grouped}
        times = round_robin(fns, args.warmup, args.steps, torch.device("cpu"), args.clock)
    out = {k: paired_ratio(v, times["single"]) for k, v in times.items() if k != "single"}
    return {"single_ms": statistics.median(times["single"]), **out, "max_err": err}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--img-size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tasks", default="4,16")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    parser.add_argument("--md", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(0))
    lines = ["| setting | tasks | single ms | mixed x single | grouped x single | max err |", "|---" * 6 + "|"]
    for setting in SETTINGS:
        for tasks in [int(t) for t in args.tasks.split(",")]:
            with tempfile.TemporaryDirectory() as tmp:
                r = measure(args, setting, tasks, x, Path(tmp))
            lines.append(f"| {setting} | {tasks} | {r['single_ms']:.1f} | {r['mixed']:.2f} | {r['grouped']:.2f} | "
                         f"{r['max_err']:.1e} |")  # fmt: skip
            print(lines[-1], flush=True)
    head = (f"{args.model}, {args.img_size} px, batch {args.batch}, fp32 CPU, {args.threads} thread(s), "
            f"{args.clock} clock, {args.steps} rounds after {args.warmup}, torch {torch.__version__}.")  # fmt: skip
    if args.md:
        cmd = "PYTHONPATH=. python scripts/bench_multitask_tokens.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None)
        args.md.write_text(f"`{cmd}`\n\n{head}\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
