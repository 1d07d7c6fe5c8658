"""The training loop behind ``deltatune train``: one readable epoch loop with AdamW, warm-up + cosine, EMA, mixup,
AMP, gradient clipping, DDP, per-epoch JSONL logs and exactly resumable checkpoints.

    from deltatune.train.loop import train
    report = train({"model": "deltatune_offline_vit", "dataset": "offline:digits", "method": "ssf", "epochs": 5})

Under ``torchrun --nproc_per_node N`` the same call trains with DistributedDataParallel; the global batch is
``batch_size x N`` and the result matches one process with that batch.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from deltatune.backbones import hf_name, is_text_model
from deltatune.checkpoint import save_delta, stored_form
from deltatune.core import summary, trainable_parameters
from deltatune.data import (
    Data,
    check_classes,
    is_text_dataset,
    load_data,
)
from deltatune.data.class_names import class_names
from deltatune.errors import DeltaTuneError
from deltatune.protocols import ReportsExtras, hooks
from deltatune.train.config import TrainConfig
from deltatune.train.distributed import Runtime, runtime
from deltatune.train.epochs import CHECKPOINT, check_finite, checkpoint_parts, fit, next_phase
from deltatune.train.fsdp import check_supported, gathered
from deltatune.train.phases import Phase, describe, plan, restore
from deltatune.train.report import format_table, measure
from deltatune.train.run_dir import resolve_output_dir, result_line
from deltatune.train.setup import Parts, build_model, make_optimizer, make_parts
from deltatune.train.state import prepare_output, resume_phase, resume_state, write_text
from deltatune.train.steps import cosine_lr, seed_all, to_device
from deltatune.train.tasks import evaluate, headline
from deltatune.train.tracking import Tracker

__all__ = ["TrainConfig", "build_model", "cosine_lr", "evaluate", "fit", "make_optimizer", "train"]
DELTA = "delta.safetensors"
OUTPUTS = [CHECKPOINT, DELTA, "delta_ema.safetensors", "config.yaml", "log.jsonl", "report.json"]


def train(config: TrainConfig | dict[str, Any], data: Data | None = None) -> dict[str, Any]:
    """Trains one delta-tuning run and returns its report (also written to ``output_dir/report.json``).

    Args:
        config: A TrainConfig or a dict of its fields.
        data: Ready-made raw datasets instead of ``config.dataset`` (items ``(image, label)``).
    """
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        with runtime(cfg.device, cfg.amp) as rt:
            return _train(resolve_output_dir(cfg, rt, OUTPUTS), rt, data)
    finally:
        torch.set_num_threads(threads)


def _load(cfg: TrainConfig) -> Data:
    """The config's raw datasets (text ones tokenised with the model's tokenizer unless --tokenizer says otherwise)."""
    text = is_text_model(cfg.model)
    if text != is_text_dataset(cfg.dataset):
        raise DeltaTuneError(
            f"model {cfg.model!r} and dataset {cfg.dataset!r} do not go together: text models "
            "(hf:...) train on --dataset text, lm:PATH or offline:topics / offline:topics-mixed, image models on image"
            " datasets"
        )
    options = {"tokenizer": cfg.tokenizer or hf_name(cfg.model), "max_length": cfg.max_length} if text else {}
    options |= {"block_size": cfg.block_size} if text else {}
    return load_data(
        cfg.dataset, cfg.data_dir, cfg.train_split, cfg.eval_split, cfg.download, cfg.seed, cfg.img_size, **options
    )


def _report(p: Parts, cfg: TrainConfig, rt: Runtime, history: list[dict], phases: list[Phase]) -> dict[str, Any]:
    """The run's accuracy and setting, the same on every process (rank 0 then adds files and costs)."""
    key = headline(p.task)
    final = {k[5:]: v for k, v in history[-1].items() if k.startswith("eval_")} if history else {}
    if key not in final:
        final = evaluate(p.model, p.eval_loader, rt, p.task)
    names = [",".join(c.name for c in stage) for stage in cfg.stage_configs()]
    report: dict[str, Any] = {
        "method": " > ".join(names) if cfg.stages else "+".join(names),
        "model": cfg.model,
        "dataset": cfg.dataset,
        key: final[key],
        "eval_loss": final["loss"],
        "epochs": phases[-1].end,
        "phases": len(phases),
        "world_size": rt.world_size,
        "global_batch_size": cfg.batch_size * rt.world_size,
    }
    if p.ema is not None:
        report[f"ema_{key}"] = history[-1].get(f"ema_{key}") or evaluate(p.ema.module, p.eval_loader, rt, p.task)[key]
    return report


def _write_outputs(p: Parts, cfg: TrainConfig, rt: Runtime, report: dict, history: list[dict], wall: float) -> None:
    """Rank 0: the delta files, the methods' extras (MiMi: adapter sizes, plot), parameter counts, GFLOPs,
    images/s, report.json."""
    out, model = Path(cfg.output_dir), p.model
    report["delta_path"] = str(out / DELTA)
    report["delta_bytes"] = save_delta(stored_form(model), out / DELTA, classes=p.classes)
    if p.ema is not None:
        save_delta(stored_form(p.ema.module), out / "delta_ema.safetensors", classes=p.classes)
    for config in hooks(cfg.method_configs(), ReportsExtras):
        report.update(config.report_extras(model, out))
    batch = to_device(next(iter(p.eval_loader))[0], rt.device)
    if cfg.fsdp and rt.distributed:  # the costs run the model on rank 0 alone; sharded, it needs every rank
        report["trainable_params"] = trainable_parameters(model)
    else:
        report.update(measure(model, batch, cfg.benchmark_seconds, rt.amp))
    report["wall_s"] = time.perf_counter() - wall
    report["history"] = history
    write_text(out / "report.json", json.dumps(report, indent=2))
    if cfg.progress:
        print(format_table([report]))
    print(result_line(report, out))


def _train(cfg: TrainConfig, rt: Runtime, data: Data | None) -> dict[str, Any]:
    wall = time.perf_counter()
    out = Path(cfg.output_dir)
    saved = prepare_output(cfg, rt, CHECKPOINT, OUTPUTS)
    data = data or _load(cfg)
    check_classes(data, f"dataset {cfg.dataset!r}")
    model = build_model(cfg, data.num_classes, data.task)
    phases = plan(cfg, model)
    if cfg.fsdp:
        check_supported(bool(cfg.ema_decay), len(phases))
    total = phases[-1].end
    current = resume_phase(cfg, phases, saved)
    if saved:
        restore(model, cfg, current, saved)
    p = make_parts(cfg, rt, data, model, current)
    p.tracker = Tracker.for_run(cfg, rt.is_main)
    p.classes = class_names(data, cfg.dataset) if data.task == "classify" else None  # an LM's outputs are tokens
    seed_all(cfg.seed + 1000 * rt.rank)  # augmentation and dropout differ between processes
    start_epoch, history = (saved["epoch"], saved["history"]) if saved else (0, [])
    if saved:
        with gathered(p.model, p.optimizer, load=True):  # FSDP: loaded full, re-sharded on the way out
            resume_state(out / CHECKPOINT, *checkpoint_parts(p), rt, rt.is_main and cfg.progress)
        # Where the uninterrupted run's sampler stands: a pruning right after resuming draws the same batches.
        p.train_loader.sampler.set_epoch(start_epoch - 1)  # type: ignore[union-attr]
    if rt.is_main:
        write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        # The log restarts from the checkpoint's own history: epochs after it are trained again.
        write_text(out / "log.jsonl", "".join(json.dumps(r) + "\n" for r in history))
        if cfg.progress and not start_epoch:
            print(summary(model))
            if len(phases) > 1:
                print(describe(phases, model, cfg))
    for phase in phases[current.index :]:
        if phase.index > current.index:
            next_phase(p, cfg, rt, phase)
        if max(start_epoch, phase.start) < phase.end:
            history = fit(p, cfg, rt, phase, max(start_epoch, phase.start), total, history)
    check_finite(p, "the final weights")
    p.tracker.close()
    report = _report(p, cfg, rt, history, phases)
    with gathered(p.model, frozen=True):  # FSDP: the delta file records the backbone's hash
        if rt.is_main:
            _write_outputs(p, cfg, rt, report, history, wall)
    return report
