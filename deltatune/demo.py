"""``deltatune demo``: every main method on the bundled offline ViT and an offline task, compared in one table.

Trains linear probe, BitFit, SSF, LoRA, adapters and full fine-tuning (CPU, a few minutes). Each method's run
folder (delta file, report, log) is ``<out>/<method>/``; ``results.json``, ``results.md`` and
``accuracy_vs_params.png`` go to ``--results-dir`` (default: ``<out>``). It reloads the SSF and LoRA delta files
into a fresh backbone and checks that merging them changes no prediction, and times every reloaded model's
inference, unmerged and merged, round-robin against the plain backbone (one forward of each per round), so the
reported ratios share the machine's load instead of each model being timed alone at a different moment.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from deltatune.backbones import create_backbone, data_config
from deltatune.bench.measure import paired_ratio, round_robin
from deltatune.checkpoint import load_delta
from deltatune.core import merge
from deltatune.data import load_data, make_loader, make_transform, subsample, with_transforms
from deltatune.train.config import TrainConfig
from deltatune.train.distributed import Runtime
from deltatune.train.loop import evaluate, train
from deltatune.train.report import COLUMNS, format_table, merged_copy, plot_accuracy_vs_params

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
DEMO_COLUMNS = [
    *[c for c in COLUMNS if c[0] != "images_per_s"],
    ("infer_x_plain", "inference time x plain", "{:.2f}"),
    ("infer_merged_x_plain", "merged x plain", "{:.2f}"),
    ("train_s", "train s", "{:.1f}"),
]


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
    parser.add_argument("--out", default="runs/demo", help="run folders, one per method (default: runs/demo)")
    parser.add_argument(
        "--results-dir", default=None, help="where results.json, results.md and the plot go (default: --out)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (default: 32)")
    parser.add_argument("--max-train-samples", type=int, default=None, help="train on a subset (quick check)")
    parser.add_argument("--max-eval-samples", type=int, default=None, help="evaluate on a subset (quick check)")
    parser.add_argument(
        "--inference-rounds",
        type=int,
        default=20,
        help="round-robin rounds timing inference against the plain backbone (0: skip; default: 20)",
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    parser.add_argument(
        "--tensorboard", action="store_true", help="log every run to <out>/<method>/tb and the plot to <results>/tb"
    )


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
        "benchmark_seconds": 0,  # inference is timed once for all methods, interleaved (inference_ratios)
        "output_dir": str(out / method),
        "overwrite": True,  # the demo's own folders: a rerun replaces them
        **RECIPES.get(method, {k: v for k, v in RECIPES["ssf"].items() if k != "method_options"}),
    }
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**fields)


def _eval_data(task: str, seed: int, max_images: int | None) -> Any:
    """The task's data with the test set cut to the same seeded subset as training's evaluation."""
    data = load_data(f"offline:{task}", seed=seed)
    data.eval = subsample(data.eval, max_images, seed)
    return data


def _reload(delta_path: str | Path, num_classes: int) -> torch.nn.Module:
    """A fresh pretrained backbone with ``delta_path`` loaded, in eval mode (what a user deploys)."""
    model = create_backbone(MODEL, num_classes, pretrained=True)
    load_delta(model, delta_path)
    return model.eval()


def _loader(data: Any, model: torch.nn.Module, batch_size: int, rt: Runtime) -> Any:
    """The evaluation loader of ``data`` with the backbone's preprocessing."""
    tf = make_transform("none", False, data_config(model))
    return make_loader(with_transforms(data, tf, tf).eval, batch_size, rt, train=False)


@torch.no_grad()
def merge_check(delta_path: Path, task: str, seed: int, max_images: int | None = None) -> dict[str, Any]:
    """Reloads a delta file into a fresh backbone and compares its test-set predictions before and after ``merge``."""
    rt = Runtime(torch.device("cpu"))
    data = _eval_data(task, seed, max_images)
    model = _reload(delta_path, data.num_classes)
    loader = _loader(data, model, 256, rt)
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


@torch.inference_mode()
def inference_ratios(
    deltas: dict[str, str | Path], task: str, seed: int, batch_size: int = 32, rounds: int = 20, warmup: int = 3
) -> dict[str, Any]:
    """Inference time of each reloaded delta, unmerged and merged, over the plain backbone's, timed round-robin.

    Every round runs one forward of a test batch through each model (order rotated), so load on a shared machine
    hits all of them alike; each ratio is the median over rounds of time / the plain model's time in that round.
    """
    rt = Runtime(torch.device("cpu"))
    data = _eval_data(task, seed, batch_size)
    plain = create_backbone(MODEL, data.num_classes, pretrained=True).eval()
    batch = next(iter(_loader(data, plain, batch_size, rt)))[0]
    models: dict[str, torch.nn.Module] = {"plain": plain}
    for method, path in deltas.items():
        models[method] = _reload(path, data.num_classes)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # adapters stay unmerged; the ratio then shows what they cost
            models[f"{method} merged"] = merged_copy(models[method])[0].eval()
    fns = {name: (lambda m=m: m(batch)) for name, m in models.items()}
    times = round_robin(fns, warmup, rounds, rt.device)
    return {
        "batch": len(batch),
        "rounds": rounds,
        "plain_ms": statistics.median(times["plain"]),
        "ratios": {
            m: {k: paired_ratio(times[f"{m}{s}"], times["plain"]) for k, s in (("unmerged", ""), ("merged", " merged"))}
            for m in deltas
        },
    }


def _train_all(names: list[str], task: str, out_dir: Path, **overrides: Any) -> list[dict[str, Any]]:
    """Trains each method with its recipe into ``out_dir/<method>/`` and returns the reports."""
    rows: list[dict[str, Any]] = []
    for name in names:
        cfg = _config(name, task, out_dir, **overrides)
        t0 = time.perf_counter()
        report = train(cfg)
        report["train_s"], report["lr"] = time.perf_counter() - t0, cfg.lr
        rows.append(report)
        print(
            f"  {name:<8} top-1 {report['top1']:6.2f}%  {report['trainable_params']:>9,} trainable  "
            f"{report['delta_bytes']:>10,} bytes  ({report['train_s']:.1f} s, {cfg.epochs} epochs, lr {cfg.lr:g})"
        )
    return rows


def _summary_lines(checks: dict[str, dict[str, Any]], timing: dict[str, Any] | None) -> list[str]:
    """The merge checks and the timing method, one sentence each."""
    lines = [
        f"{m}: {c['agreement'] * 100:.2f}% of {c['images']} test images get the same class after merging, "
        f"max |logit difference| {c['max_logit_diff']:.2e}; reloaded delta top-1 {c['reloaded_top1']:.2f}%"
        for m, c in checks.items()
    ]
    if timing:
        lines.append(
            f"inference x plain: median over {timing['rounds']} round-robin rounds (batch {timing['batch']}) of each "
            f"reloaded model's forward time / the plain backbone's in the same round "
            f"(plain: {timing['plain_ms']:.1f} ms per batch)"
        )
    return lines


def run_demo(
    task: str = "digits",
    methods: str | list[str] | None = None,
    epochs: int | None = None,
    out: str = "runs/demo",
    results_dir: str | None = None,
    seed: int = 0,
    batch_size: int = 32,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    inference_rounds: int = 20,
    threads: int | None = None,
    device: str = "auto",
    tensorboard: bool = False,
) -> dict[str, Any]:
    """Runs the demo and returns ``{"rows": [...], "merge_checks": {...}, "inference": {...}, "wall_s": ...}``."""
    start = time.perf_counter()
    names = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else list(methods or RECIPES)
    out_dir, res_dir = Path(out), Path(results_dir or out)
    res_dir.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    print(f"deltatune demo: {len(names)} methods on {MODEL} (offline), task {task!r}; writing to {out_dir}/")
    overrides = {"epochs": epochs, "seed": seed, "batch_size": batch_size, "threads": threads, "device": device}
    overrides["tensorboard"] = tensorboard
    overrides |= {"max_train_samples": max_train_samples, "max_eval_samples": max_eval_samples}
    rows = _train_all(names, task, out_dir, **overrides)
    deltas = {r["method"]: r["delta_path"] for r in rows}
    checks = {m: merge_check(Path(deltas[m]), task, seed, max_eval_samples) for m in MERGE_CHECK if m in names}
    timing = inference_ratios(deltas, task, seed, batch_size, inference_rounds) if inference_rounds > 0 else None
    for r in rows:
        if timing:
            r["infer_x_plain"] = timing["ratios"][r["method"]]["unmerged"]
            r["infer_merged_x_plain"] = timing["ratios"][r["method"]]["merged"]
    wall = time.perf_counter() - start
    lines = _summary_lines(checks, timing)
    print("\n" + format_table(rows, DEMO_COLUMNS) + "\n\n" + "\n".join(lines))
    print(f"\nwall time {wall:.0f} s; run folders in {out_dir}/; results.json, results.md and plot in {res_dir}/")
    keep = [k for k, _, _ in DEMO_COLUMNS] + ["delta_path", "gflops_backbone", "epochs", "lr", "unmerged"]
    result = {
        "task": task,
        "model": MODEL,
        "rows": [{k: r.get(k) for k in [*keep, "backbone_params"]} for r in rows],
        "merge_checks": checks,
        "inference": timing,
        "threads": torch.get_num_threads(),
        "wall_s": wall,
    }
    _write_results(res_dir, result, format_table(rows, DEMO_COLUMNS, markdown=True), lines)
    title = f"{MODEL} on {task}: top-1 vs trainable params"
    plot_accuracy_vs_params(rows, res_dir / "accuracy_vs_params.png", title, tb_dir=res_dir if tensorboard else None)
    return result


def _write_results(res_dir: Path, result: dict[str, Any], table: str, lines: list[str]) -> None:
    """``results.json`` (every number) and ``results.md`` (the table and the checks) in ``res_dir``."""
    (res_dir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [
        f"# deltatune demo: {MODEL} on offline task `{result['task']}`",
        "",
        table,
        "",
        *[f"- {ln}" for ln in lines],
        "",
        f"Wall time: {result['wall_s']:.0f} s ({result['threads']} threads).",
    ]
    (res_dir / "results.md").write_text("\n".join(md) + "\n")
