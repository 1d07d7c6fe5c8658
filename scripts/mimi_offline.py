"""MiMi against adapters trained directly at the same final size, and the paper's ablations, on the offline default.

Every run trains the bundled offline ViT on the real ``digits`` task for the same number of epochs. MiMi starts
at sigma 4 (32 neurons per adapter) and is pruned over 4 phases to the size of sigma 32 (4 per adapter on
average, 48 in all); the direct baseline is an adapter at sigma 32 from the start. Ablations change only the
neuron score (l1, random, grad, activation) or the scope (local: the same fraction in every adapter).

Command (writes the table below into benchmarks/mimi_offline.md and the raw runs into .json):
    python scripts/mimi_offline.py --seeds 0 1 2 --out benchmarks/mimi_offline
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from deltatune.train.loop import train

# name -> TrainConfig fields
RUNS: dict[str, dict[str, Any]] = {
    "mimi (global, normalised L1)": {"method": "mimi"},
    "ablation: l1 (no normalisation)": {"method": "mimi", "prune_score": "l1"},
    "ablation: random": {"method": "mimi", "prune_score": "random"},
    "ablation: grad": {"method": "mimi", "prune_score": "grad"},
    "ablation: activation": {"method": "mimi", "prune_score": "activation"},
    "ablation: local": {"method": "mimi", "prune_scope": "local"},
    "adapter sigma 32 (same final size)": {"method": "adapter", "method_options": {"sigma": 32}},
    "adapter sigma 4 (start size, unpruned)": {"method": "adapter", "method_options": {"sigma": 4}},
}


def config(run: dict[str, Any], seed: int, epochs_per_phase: int, out: Path, task: str) -> dict[str, Any]:
    """The run's TrainConfig fields: MiMi trains 4 phases of ``epochs_per_phase``; adapters the same total."""
    phases = 4 if run["method"] == "mimi" else 1
    return {
        "model": "deltatune_offline_vit",
        "dataset": f"offline:{task}",
        "train_transform": "none",
        "eval_transform": "none",
        "num_workers": 0,
        "batch_size": 32,
        "lr": 3e-3,
        "warmup_epochs": 0.5,
        "weight_decay": 0.05,
        "eval_every": 0,
        "checkpoint_every": 0,
        "progress": False,
        "benchmark_seconds": 0,
        "seed": seed,
        "epochs": epochs_per_phase * (4 // phases),
        "output_dir": str(out / "runs"),
        **run,
    }


def summarise(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Markdown table rows: mean and spread of top-1 over seeds, final size, adapters removed, GFLOPs."""
    rows = [
        "| run | top-1 % (mean ± std) | per seed | adapter neurons | adapters removed (seed 0) "
        "| trainable params | GFLOPs |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for name, reports in results.items():
        top = [r["top1"] for r in reports]
        spread = statistics.stdev(top) if len(top) > 1 else 0.0
        sizes = reports[0]["adapter_sizes"]
        rows.append(
            f"| {name} | {statistics.mean(top):.2f} ± {spread:.2f} | {', '.join(f'{t:.2f}' for t in top)} "
            f"| {sum(sizes.values())} | {sum(1 for v in sizes.values() if v == 0)} "
            f"| {reports[0]['trainable_params']:,} | {reports[0]['gflops']:.4f} |"
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs-per-phase", type=int, default=2)
    p.add_argument("--task", default="digits")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("benchmarks/mimi_offline"))
    args = p.parse_args()
    start = time.time()
    work = Path("runs/mimi_offline")
    results: dict[str, list[dict[str, Any]]] = {}
    for seed in args.seeds:
        for name, run in RUNS.items():
            cfg = config(run, seed, args.epochs_per_phase, work, args.task)
            report = train({**cfg, "threads": args.threads})
            keep = ("top1", "trainable_params", "gflops", "adapter_sizes", "epochs", "phases", "delta_bytes")
            results.setdefault(name, []).append({k: report[k] for k in keep} | {"seed": seed})
            print(f"seed {seed}  {name:<40} top-1 {report['top1']:6.2f}  ({time.time() - start:.0f} s)", flush=True)
            args.out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    command = "python scripts/mimi_offline.py " + shlex.join(sys.argv[1:])
    md = [
        f"# MiMi vs adapters on the offline default (`{args.task}`)",
        "",
        f"```\n{command}\n```",
        "",
        f"deltatune_offline_vit, {args.epochs_per_phase * 4} epochs per run (MiMi: 4 phases of "
        f"{args.epochs_per_phase}), batch 32, lr 3e-3, seeds {args.seeds}; {time.time() - start:.0f} s wall.",
        "",
        *summarise(results),
    ]
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
