"""``deltatune demo``: every main method on the bundled offline ViT and an offline task, compared in one table.

Trains linear probe, BitFit, SSF, LoRA, adapters and full fine-tuning (CPU, a few minutes), then writes to the
output folder: each method's delta file, ``results.json``, ``results.md`` and ``accuracy_vs_params.png``. It also
reloads the SSF and LoRA delta files into a fresh backbone and checks that merging them changes no prediction.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from deltatune.backbones import create_backbone, data_config
from deltatune.checkpoint import load_delta
from deltatune.core import merge
from deltatune.data import load_data, make_loader, make_transform, subsample, with_transforms
from deltatune.distributed import Runtime
from deltatune.report import COLUMNS, format_table, plot_accuracy_vs_params
from deltatune.train_config import TrainConfig
from deltatune.training import evaluate, train

MODEL = "deltatune_offline_vit"
# Per-method settings: about 340 CPU-seconds in all (measured); lrs from short sweeps on the bundled weights.
RECIPES: dict[str, dict[str, Any]] = {
    "linear": {"epochs": 8, "lr": 3e-2},
    "bitfit": {"epochs": 6, "lr": 1e-2},
    "ssf": {"epochs": 6, "lr": 1e-2},
    "lora": {"epochs": 6, "lr": 3e-3, "method_options": {"r": 8}},
    "adapter": {"epochs": 6, "lr": 3e-3, "method_options": {"sigma": 8}},
    "full": {"epochs": 6, "lr": 1e-3},
}
MERGE_CHECK = ("ssf", "lora")
DEMO_COLUMNS = [*COLUMNS, ("train_s", "train s", "{:.1f}")]


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options (all optional)."""
    parser.add_argument(
        "--task",
        default="digits",
        help="offline task: digits, digits-shift, count, location or orientation (default: digits)",
    )
    parser.add_argument(
        "--methods",
        default=",".join(RECIPES),
        help=f"comma-separated methods to compare "
        f"(default: {','.join(RECIPES)}); any registered method works, with the SSF settings",
    )
    parser.add_argument(
        "--epochs", type=int, default=None, help="epochs for every method (default: per method, see deltatune/demo.py)"
    )
    parser.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (default: 32)")
    parser.add_argument("--max-train-samples", type=int, default=None, help="train on a subset (quick check)")
    parser.add_argument("--max-eval-samples", type=int, default=None, help="evaluate on a subset (quick check)")
    parser.add_argument("--benchmark-seconds", type=float, default=0.5, help="time per images/s measurement")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")


def _config(method: str, task: str, out: Path, **overrides: Any) -> TrainConfig:
    """The demo's TrainConfig for one method: its RECIPES entry (SSF's for other methods) plus ``overrides``."""
    fields: dict[str, Any] = {
        "model": MODEL,
        "dataset": f"offline:{task}",
        "method": method,
        "train_transform": "none",
        "eval_transform": "none",
        "num_workers": 0,
        "warmup_epochs": 0.5,
        "weight_decay": 0.05,
        "eval_every": 0,
        "checkpoint_every": 0,
        "progress": False,
        "benchmark_seconds": 0.5,
        "output_dir": str(out / "runs" / method),
        **RECIPES.get(method, {k: v for k, v in RECIPES["ssf"].items() if k != "method_options"}),
    }
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**fields)


@torch.no_grad()
def merge_check(delta_path: Path, task: str, seed: int, max_images: int | None = None) -> dict[str, Any]:
    """Reloads a delta file into a fresh backbone and compares its test-set predictions before and after ``merge``."""
    rt = Runtime(torch.device("cpu"))
    data = load_data(f"offline:{task}", seed=seed)
    data.eval = subsample(data.eval, max_images, seed)  # the same subset as training's evaluation
    model = create_backbone(MODEL, data.num_classes, pretrained=True)
    load_delta(model, delta_path)
    model.to(rt.device).eval()
    tf = make_transform("none", False, data_config(model))
    loader = make_loader(with_transforms(data, tf, tf).eval, 256, rt, train=False)
    before = torch.cat([model(x.to(rt.device)) for x, _ in loader])
    reloaded_top1 = evaluate(model, loader, rt)["top1"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merge(model)
    after = torch.cat([model(x.to(rt.device)) for x, _ in loader])
    return {
        "images": len(before),
        "agreement": (before.argmax(-1) == after.argmax(-1)).float().mean().item(),
        "max_logit_diff": (before - after).abs().max().item(),
        "reloaded_top1": reloaded_top1,
    }


def run_demo(
    task: str = "digits",
    methods: str | list[str] | None = None,
    epochs: int | None = None,
    out: str = "runs/demo",
    seed: int = 0,
    batch_size: int = 32,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    benchmark_seconds: float = 0.5,
    threads: int | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Runs the demo and returns ``{"rows": [...], "merge_checks": {...}, "wall_s": ...}``."""
    start = time.perf_counter()
    names = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else list(methods or RECIPES)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    print(f"deltatune demo: {len(names)} methods on {MODEL} (offline), task {task!r}; writing to {out_dir}/")
    rows: list[dict[str, Any]] = []
    for name in names:
        cfg = _config(
            name,
            task,
            out_dir,
            epochs=epochs,
            seed=seed,
            batch_size=batch_size,
            max_train_samples=max_train_samples,
            max_eval_samples=max_eval_samples,
            benchmark_seconds=benchmark_seconds,
            threads=threads,
            device=device,
        )
        t0 = time.perf_counter()
        report = train(cfg)
        report["train_s"] = time.perf_counter() - t0
        shutil.copyfile(report["delta_path"], out_dir / f"{name}.safetensors")
        report["delta_path"] = str(out_dir / f"{name}.safetensors")
        rows.append(report)
        print(
            f"  {name:<8} top-1 {report['top1']:6.2f}%  {report['trainable_params']:>9,} trainable  "
            f"{report['delta_bytes']:>10,} bytes  ({report['train_s']:.1f} s, {cfg.epochs} epochs, lr {cfg.lr:g})"
        )
    checks = {
        m: merge_check(out_dir / f"{m}.safetensors", task, seed, max_eval_samples) for m in MERGE_CHECK if m in names
    }
    wall = time.perf_counter() - start
    table = format_table(rows, DEMO_COLUMNS)
    lines = [
        f"{m}: {c['agreement'] * 100:.2f}% of {c['images']} test images get the same class after merging, "
        f"max |logit difference| {c['max_logit_diff']:.2e}; reloaded delta top-1 {c['reloaded_top1']:.2f}%"
        for m, c in checks.items()
    ]
    print("\n" + table + "\n\n" + "\n".join(lines))
    print(f"\nwall time {wall:.0f} s; delta files, results.json, results.md and accuracy_vs_params.png in {out_dir}/")
    keep = [k for k, _, _ in DEMO_COLUMNS] + [
        "delta_path",
        "gflops_backbone",
        "images_per_s_merged",
        "epochs",
        "unmerged",
        "backbone_params",
    ]
    result = {
        "task": task,
        "model": MODEL,
        "rows": [{k: r.get(k) for k in keep} for r in rows],
        "merge_checks": checks,
        "wall_s": wall,
    }
    (out_dir / "results.json").write_text(json.dumps(result, indent=2))
    md = [
        f"# deltatune demo: {MODEL} on offline task `{task}`",
        "",
        format_table(rows, DEMO_COLUMNS, markdown=True),
        "",
        *[f"- {ln}" for ln in lines],
        "",
        f"Wall time: {wall:.0f} s.",
    ]
    (out_dir / "results.md").write_text("\n".join(md) + "\n")
    plot_accuracy_vs_params(rows, out_dir / "accuracy_vs_params.png", f"{MODEL} on {task}: top-1 vs trainable params")
    return result
