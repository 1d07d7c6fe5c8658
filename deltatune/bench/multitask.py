"""``deltatune bench --multitask 1,4,16``: a mixed-task batch against a single-task batch of the same size.

    deltatune bench --multitask 1,4,16 --model deltatune_offline_vit --img-size 32 --threads 1 --clock cpu --md out.md

For each method (SSF, BitFit, LoRA r=8, IA3, FacT-TT, AdaptFormer) and each task count N, the batch's rows take
the N tasks round-robin and these variants are timed round-robin (one call of each per round, the order rotated;
``bench.measure``):

- ``single``: task t0's own unmerged model on the whole batch: the reference every ratio divides by;
- ``mixed``: ``MultiTaskModel`` mixing the N tasks per row in one backbone pass;
- ``grouped``: the same rows sorted by task, each task's rows through its own unmerged model;
- ``merged``: each task's rows through its own MERGED model (the alternative deployment: N backbone copies; only
  for mergeable methods);
- ``peft``: HF peft's mixed-adapter batch (``adapter_names=``), the same LoRA weights (``save_peft``) (LoRA only).

Every variant's output is compared with the single-task reference: each task's file loaded into a fresh backbone
with ``load_delta``, run on the task's rows (``max_err``). With ``--compile`` every model is compiled in place.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn

import deltatune
from deltatune import registry
from deltatune.bench.measure import paired_ratio, round_robin
from deltatune.errors import DeltaTuneError
from deltatune.serve import MultiTaskModel

METHODS: dict[str, dict[str, Any]] = {
    "ssf": {}, "bitfit": {}, "lora": {"r": 8}, "ia3": {}, "fact-tt": {}, "adaptformer": {},
}  # fmt: skip
VARIANTS = ("single", "mixed", "grouped", "merged", "peft")
NUM_CLASSES = 100


def parse_counts(text: str) -> list[int]:
    """``"1,4,16"`` -> [1, 4, 16]; anything else raises DeltaTuneError."""
    try:
        counts = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise DeltaTuneError(f"bench: --multitask takes task counts such as 1,4,16, got {text!r}")
    return counts


class Setup:
    """One method's tasks: their delta files, the MultiTaskModel, separately loaded references and merged models."""

    def __init__(self, make: Callable[[], nn.Module], method: str, tasks: int, folder: Path, peft: bool) -> None:
        self.make, self.method, self.folder = make, method, folder
        self.paths: list[Path] = []
        self.peft_dirs: list[Path] = []
        for i in range(tasks):
            model = deltatune.apply(make(), method, **METHODS[method])
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:  # what training would leave, as far as speed and mixing go
                        p.add_(torch.randn_like(p) * 0.02)
            self.paths.append(folder / f"{method}{i}.safetensors")
            deltatune.save_delta(model, self.paths[-1])
            if peft:
                self.peft_dirs.append(folder / f"{method}{i}_peft")
                deltatune.save_peft(model, self.peft_dirs[-1])
        self.mt = MultiTaskModel(make().eval()).eval()
        for i, path in enumerate(self.paths):
            self.mt.add_task(f"t{i}", path)

    def loaded(self, i: int, merge: bool = False) -> nn.Module:
        """Task ``i``'s file loaded into a fresh backbone by ``load_delta`` (merged: its plain merged model)."""
        model = deltatune.load_delta(self.make(), self.paths[i]).eval()
        return deltatune.merge(model) if merge else model

    def peft_model(self, tasks: int) -> nn.Module:
        """HF peft holding tasks t0..t{N-1}'s LoRA adapters (and heads, modules_to_save) on a fresh backbone."""
        from peft import PeftModel

        model = PeftModel.from_pretrained(self.make(), str(self.peft_dirs[0]), adapter_name="t0")
        for i in range(1, tasks):
            model.load_adapter(str(self.peft_dirs[i]), adapter_name=f"t{i}")
        return model.eval()


def by_task(models: list[nn.Module], x: Tensor, names: list[str]) -> Tensor:
    """Rows sorted by task, each task's rows through its own model, then put back in the batch's order."""
    rows = torch.tensor([int(n[1:]) for n in names])
    perm = torch.argsort(rows, stable=True)
    counts = torch.bincount(rows, minlength=len(models)).tolist()
    parts = x[perm].split(counts)
    out = torch.cat([m(p) for m, p, c in zip(models, parts, counts) if c])
    return out[torch.argsort(perm)]


def variants(setup: Setup, tasks: int, x: Tensor, compile_models: bool) -> dict[str, Callable[[], Tensor]]:
    """Each variant as a call returning the batch's logits (rows' tasks t0..t{N-1} round-robin)."""
    names = [f"t{i % tasks}" for i in range(len(x))]
    mt = setup.mt
    models = [mt.task_model(f"t{i}") for i in range(tasks)]
    mergeable = registry.config_class(setup.method).mergeable
    merged = [setup.loaded(i, merge=True) for i in range(tasks)] if mergeable else []
    if compile_models:
        for m in {id(m): m for m in [*models, *merged, mt.mixed_model()]}.values():
            m.compile()
    fns = {
        "single": lambda: models[0](x),
        "mixed": lambda: mt(x, names),
        "grouped": lambda: by_task(models, x, names),
    }
    if merged:
        fns["merged"] = lambda: by_task(merged, x, names)
    if setup.peft_dirs:
        pm = setup.peft_model(tasks)
        if compile_models:
            pm.compile()
        fns["peft"] = lambda: pm(x, adapter_names=names)
    return fns


def reference(setup: Setup, tasks: int, x: Tensor) -> Tensor:
    """Row i through its task's own file loaded into a fresh backbone: what every variant must equal."""
    names = [f"t{i % tasks}" for i in range(len(x))]
    with torch.no_grad():
        return by_task([setup.loaded(i) for i in range(tasks)], x, names)


def measure(setup: Setup, tasks: int, x: Tensor, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per variant: its times, its ratio to ``single`` and its largest deviation from the reference."""
    fns = variants(setup, tasks, x, args.compile)
    ref = reference(setup, tasks, x)
    with torch.inference_mode():
        errors = {k: (fn().float() - ref).abs().max().item() for k, fn in fns.items() if k != "single"}
        times = round_robin({k: (lambda fn=fn: fn()) for k, fn in fns.items()}, args.warmup, args.steps, x.device,
                            args.clock)
    single = times["single"]
    per_row = all(setup.mt.task(f"t{i}").plan is not None for i in range(tasks))  # else the mixed call grouped
    rows = []
    for name, ms in times.items():
        rows.append({
            "method": setup.method, "tasks": tasks, "variant": name, "ms": statistics.median(ms), "ms_all": ms,
            "x_single": statistics.median(ms) / statistics.median(single), "x_single_paired": paired_ratio(ms, single),
            "x_single_best": min(ms) / min(single), "max_err": errors.get(name, 0.0),
            "per_row": per_row if name == "mixed" else None,
        })  # fmt: skip
    return rows


def run_multitask(args: argparse.Namespace) -> dict[str, Any]:
    """Every method at every task count; the report's ``results`` are flat rows (method, tasks, variant)."""
    device = torch.device(args.device)
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else list(METHODS)
    unknown = set(methods) - set(METHODS)
    if unknown:
        choices = ", ".join(METHODS)
        raise DeltaTuneError(f"bench --multitask: unknown method(s) {sorted(unknown)}; choose from {choices}")
    counts = parse_counts(args.multitask)
    if args.compile:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 8 * max(counts))

    def make() -> nn.Module:
        torch.manual_seed(0)
        return timm.create_model(args.model, pretrained=False, num_classes=NUM_CLASSES, img_size=args.img_size).to(
            device
        )

    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=g).to(device)
    results = []
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes on custom models
        for method in methods:
            setup = Setup(make, method, max(counts), Path(tmp), peft=method == "lora" and _has_peft())
            for n in counts:
                rows = measure(setup, n, x, args)
                print(" ".join(f"{r['variant']} {r['x_single_paired']:.3f}x" for r in rows), f"({method}, N={n})")
                results += rows
    return {"results": results}


def _has_peft() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


def table(report: dict[str, Any]) -> str:
    """One line per method and task count: the single-task ms, then each variant's paired ratio to it."""
    cells: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for r in report["results"]:
        cells.setdefault((r["method"], r["tasks"]), {})[r["variant"]] = r
    head = ["method", "tasks", "single ms", *[f"{v} x single" for v in VARIANTS[1:]], "max err"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (method, n), row in cells.items():
        ratios = [f"{row[v]['x_single_paired']:.2f}" if v in row else "-" for v in VARIANTS[1:]]
        if not row["mixed"].get("per_row", True):
            ratios[0] += " (grouped)"  # the mixed call fell back to one backbone pass per task
        err = max(r["max_err"] for r in row.values())
        lines.append(f"| {method} | {n} | {row['single']['ms']:.1f} | " + " | ".join(ratios) + f" | {err:.1e} |")
    return "\n".join(lines)


def describe(meta: dict[str, Any]) -> str:
    """The setting line of the Markdown page."""
    return (
        f"{meta['model']}, {meta['img_size']} px, batch {meta['batch']}, fp32, {meta['device']} "
        f"({meta['device_name']}, {meta['threads']} threads), {'torch.compile' if meta['compile'] else 'eager'}; "
        f"{meta['clock']} clock, {meta['steps']} rounds after {meta['warmup']} warm-up rounds, variants called "
        "round-robin under inference_mode; ratios: median over rounds of time / the single-task time of the same "
        "round; max err: largest |logit - reference| over the variants. Targets: mixed <= 1.15x (SSF, BitFit), "
        f"<= 1.3x (LoRA r=8). torch {meta['torch']}, timm {meta['timm']}, peft {meta['peft']}, {meta['date']}."
    )

