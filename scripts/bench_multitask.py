"""Mixed-task batches vs a single-task unmerged batch of the same size (SSF, BitFit, LoRA r=8; eager; CPU).

    PYTHONPATH=. python scripts/bench_multitask.py --out benchmarks/multitask   # writes .md and .json

Interleaved round-robin timing (``deltatune.fast_measure.round_robin``, wall clock, default threads): each round
runs every variant once, so they share the machine's load. Rows of the mixed batch take the N tasks round-robin.
With N = 1 the mixed forward IS the task's own model (a batch of one task takes that path). Also timed: the same
batch grouped by task (each task's rows through its own unmerged model), and HF peft's mixed-adapter LoRA batch
(``adapter_names=``) on the same backbone and batch with N LoRA adapters on ``qkv``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import timm
import torch
from deltatune.fast_measure import round_robin

import deltatune
import deltatune.offline.backbone  # registers deltatune_offline_vit with timm
from deltatune.serve import MultiTaskModel

METHODS = {"ssf": {}, "bitfit": {}, "lora": {"r": 8}}


def backbone(name: str, img: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=10, img_size=img).eval()


def task_files(name: str, img: int, method: str, n: int, folder: Path) -> list[Path]:
    """``n`` delta files of ``method`` with random deltas (what training would leave, as far as speed goes)."""
    paths = []
    for i in range(n):
        model = deltatune.apply(backbone(name, img), method, **METHODS[method])
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.02)
        paths.append(folder / f"{method}{i}.safetensors")
        deltatune.save_delta(model, paths[-1])
    return paths


def peft_model(name: str, img: int, n: int) -> torch.nn.Module:
    """HF peft with ``n`` LoRA r=8 adapters on every ``qkv``."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["qkv"], init_lora_weights=False)
    model = get_peft_model(backbone(name, img), cfg, adapter_name="a0")
    for i in range(1, n):
        model.add_adapter(f"a{i}", cfg)
    return model.eval()


def ratio(times: dict[str, list[float]], key: str, ref: str) -> float:
    return statistics.median(times[key]) / statistics.median(times[ref])


def time_mixed(mt: MultiTaskModel, method: str, n: int, x: torch.Tensor, ns: argparse.Namespace) -> dict:
    """One row: the mixed batch of ``n`` tasks (and grouped, and peft for LoRA) relative to task t0's own model."""
    names = [f"t{i % n}" for i in range(len(x))]
    single = mt.task_model("t0")
    fns = {"single": lambda: single(x), "mixed": lambda: mt(x, names), "grouped": lambda: mt(x, names, grouped=True)}
    if method == "lora":
        pm = peft_model(ns.model, ns.img_size, n)
        adapters = [f"a{i % n}" for i in range(len(x))]
        fns["peft_mixed"] = lambda: pm(x, adapter_names=adapters)
    with torch.inference_mode():
        times = round_robin(fns, 2, ns.steps, torch.device("cpu"), clock=ns.clock)
    row = {"method": method, "tasks": n, "single_ms": statistics.median(times["single"])}
    row.update({f"{k}_ratio": ratio(times, k, "single") for k in fns if k != "single"})
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="deltatune_offline_vit")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/multitask")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: this process's CPU time (use with --threads 1 on a shared machine)")
    ns = parser.parse_args()
    if ns.threads:
        torch.set_num_threads(ns.threads)
    x = torch.randn(ns.batch, 3, ns.img_size, ns.img_size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in METHODS:
            mt = MultiTaskModel(backbone(ns.model, ns.img_size)).eval()
            for i, path in enumerate(task_files(ns.model, ns.img_size, method, max(ns.tasks), Path(tmp))):
                mt.add_task(f"t{i}", path)
            rows += [time_mixed(mt, method, n, x, ns) for n in ns.tasks]
    write(ns, rows)


def write(ns: argparse.Namespace, rows: list[dict]) -> None:
    out = Path(ns.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": ns.model, "img_size": ns.img_size, "batch": ns.batch, "threads": torch.get_num_threads(),
            "clock": ns.clock}
    out.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    lines = [
        f"# Mixed-task batches: {ns.model} @ {ns.img_size}px, batch {ns.batch}, eager, CPU, "
        f"{meta['threads']} threads, {ns.clock} clock",
        "",
        f"Command: `PYTHONPATH=. python scripts/bench_multitask.py --model {ns.model} --img-size {ns.img_size} "
        f"--batch {ns.batch} --threads {meta['threads']} --clock {ns.clock}`. "
        f"Times relative to one task's unmerged model on the same batch (median of "
        f"{ns.steps} interleaved rounds). Targets: mixed <= 1.15x (SSF, BitFit), <= 1.3x (LoRA r=8).",
        "",
        "| method | tasks | single-task ms | mixed | grouped by task | peft mixed adapters |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        peft = f"{r['peft_mixed_ratio']:.2f}x" if "peft_mixed_ratio" in r else "-"
        lines.append(f"| {r['method']} | {r['tasks']} | {r['single_ms']:.1f} | {r['mixed_ratio']:.2f}x | "
                     f"{r['grouped_ratio']:.2f}x | {peft} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
