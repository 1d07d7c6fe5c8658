"""The training loop behind ``deltatune train``: one readable epoch loop with AdamW, warm-up + cosine, EMA, mixup,
AMP, gradient clipping, DDP, per-epoch JSONL logs and exactly resumable checkpoints.

    from deltatune.train.loop import train
    report = train({"model": "deltatune_offline_vit", "dataset": "offline:digits", "method": "ssf", "epochs": 5})

Under ``torchrun --nproc_per_node N`` the same call trains with DistributedDataParallel; the global batch is
``batch_size x N`` and the result matches one process with that batch.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from timm.data import Mixup
from timm.optim import param_groups_weight_decay
from timm.utils import ModelEmaV3
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from deltatune.backbones import create_backbone, data_config, forward, hf_name, is_text_model
from deltatune.checkpoint import save_delta, stored_form
from deltatune.core import apply, summary, trainable_parameters
from deltatune.data import (
    Data,
    check_classes,
    is_text_dataset,
    load_data,
    make_loader,
    make_transform,
    subsample,
    with_transforms,
)
from deltatune.data.class_names import class_names
from deltatune.errors import DeltaTuneError
from deltatune.protocols import ReportsExtras, hooks
from deltatune.train.config import TrainConfig
from deltatune.train.distributed import Runtime, all_reduce_sum, runtime
from deltatune.train.fsdp import check_supported, gathered, shard
from deltatune.train.phases import Phase, describe, enter_stage, plan, restore, train_state, transition
from deltatune.train.report import format_table, measure
from deltatune.train.run_dir import resolve_output_dir, result_line
from deltatune.train.state import prepare_output, resume_phase, resume_state, write_checkpoint, write_text
from deltatune.train.steps import cosine_lr, epoch_line, seed_all, to_device
from deltatune.train.tasks import check_fit, criterion, evaluate, headline
from deltatune.train.tracking import Tracker

__all__ = ["TrainConfig", "build_model", "cosine_lr", "evaluate", "fit", "make_optimizer", "train"]
CHECKPOINT = "checkpoint.safetensors"
DELTA = "delta.safetensors"
OUTPUTS = [CHECKPOINT, DELTA, "delta_ema.safetensors", "config.yaml", "log.jsonl", "report.json"]


@dataclass
class Parts:
    """Everything the loop updates: the model, data, loss, and per phase its DDP wrapper, optimizer, schedule, EMA."""

    model: nn.Module
    train_loader: DataLoader
    eval_loader: DataLoader
    criterion: nn.Module
    mixup: Mixup | None
    ddp: nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
    ema: ModelEmaV3 | None = None
    tracker: Tracker | None = None
    classes: list[str] | None = None
    task: str = "classify"


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


def build_model(cfg: TrainConfig, num_classes: int, task: str = "classify") -> nn.Module:
    """The backbone with the config's (first stage's) methods applied (seeded: identical on every process); a
    causal LM's head is its own (tied on GPT-2), never a fresh one to train."""
    seed_all(cfg.seed)
    args = (cfg.model, num_classes, cfg.pretrained, cfg.checkpoint, cfg.img_size)
    model = create_backbone(*args, task=task, **cfg.model_kwargs)
    check_fit(model, task, cfg.block_size)
    return apply(model, cfg.stage_configs()[0], head=cfg.train_head and task == "classify")


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


def _parts(cfg: TrainConfig, rt: Runtime, data: Data, model: nn.Module, phase: Phase) -> Parts:
    """Transforms and loaders for ``data``, mixup and loss, then the first phase's optimizer, schedule, EMA, DDP."""
    if not data.is_text:
        dcfg = data_config(model, cfg.img_size)
        aug = {
            "hflip": cfg.hflip,
            "auto_augment": cfg.rand_augment,
            "re_prob": cfg.reprob,
            "color_jitter": cfg.color_jitter or None,
        }
        data = with_transforms(
            data,
            make_transform(cfg.train_transform, True, dcfg, **aug),
            make_transform(cfg.eval_transform, False, dcfg),
        )
    elif cfg.mixup or cfg.cutmix:
        raise DeltaTuneError("mixup/cutmix mix images; set them to 0 for text data")
    use_mixup = bool(cfg.mixup or cfg.cutmix)
    train_set = subsample(data.train, cfg.max_train_samples, cfg.seed)
    eval_set = subsample(data.eval, cfg.max_eval_samples, cfg.seed)
    common = {"rt": rt, "num_workers": cfg.num_workers, "collate": data.collate}
    train_loader = make_loader(train_set, cfg.batch_size, train=True, seed=cfg.seed, drop_last=use_mixup, **common)
    eval_loader = make_loader(eval_set, cfg.batch_size, train=False, **common)
    if len(train_loader) == 0:
        raise DeltaTuneError(
            f"{len(train_set)} training examples make no full batch of {cfg.batch_size} per process; lower --batch-size"
        )
    model.to(rt.device)
    mixup = (
        Mixup(
            mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.smoothing, num_classes=data.num_classes
        )
        if use_mixup
        else None
    )
    p = Parts(model, train_loader, eval_loader, criterion(data.task, bool(mixup), cfg.smoothing), mixup, task=data.task)
    _start_phase(p, cfg, rt, phase)
    return p


def _start_phase(p: Parts, cfg: TrainConfig, rt: Runtime, phase: Phase) -> None:
    """Optimizer (fresh unless pruning keeps it), the phase's fresh warm-up + cosine schedule, EMA and DDP (or,
    with --fsdp, the model sharded before its optimizer is made)."""
    sharded = cfg.fsdp and rt.distributed
    if sharded and p.ddp is None:
        shard(p.model, rt)
    if phase.fresh_optimizer() or p.optimizer is None:
        p.optimizer = make_optimizer(p.model, cfg.lr, cfg.weight_decay)
    steps = len(p.train_loader)
    total, warmup = phase.epochs * steps, round(cfg.warmup_epochs * steps) if phase.fresh_optimizer() else 0
    p.scheduler = torch.optim.lr_scheduler.LambdaLR(
        p.optimizer,
        lambda step: cosine_lr(step, total, warmup, cfg.lr, cfg.warmup_lr, cfg.min_lr) / max(cfg.lr, 1e-12),
    )
    p.ema = ModelEmaV3(p.model, decay=cfg.ema_decay) if cfg.ema_decay else None
    p.ddp = (
        DistributedDataParallel(p.model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
        if rt.distributed and not sharded
        else p.model
    )


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on 1-D ones (SSF scale/shift, biases, norms) nor on
    the model's ``no_weight_decay()`` names (timm: position embedding, class token)."""
    no_decay = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    return torch.optim.AdamW(param_groups_weight_decay(model, weight_decay, no_weight_decay_list=no_decay), lr=lr)


def _train_epoch(p: Parts, cfg: TrainConfig, rt: Runtime, epoch: int, total: int, step: int) -> tuple[float, int, int]:
    """One epoch of optimizer steps; returns this process's loss sum, examples seen and the global step after it."""
    out = Path(cfg.output_dir)
    trainable = [q for q in p.model.parameters() if q.requires_grad]
    loss_sum, seen = 0.0, 0
    bar = tqdm(
        p.train_loader,
        desc=f"epoch {epoch + 1}/{total}",
        leave=False,
        dynamic_ncols=True,
        disable=not (cfg.progress and rt.is_main),
    )
    for inputs, targets in bar:
        inputs, targets = to_device(inputs, rt.device), targets.to(rt.device)
        if p.mixup is not None:
            inputs, targets = p.mixup(inputs, targets)
        with rt.autocast():
            logits = forward(p.ddp, inputs)
        loss = p.criterion(logits.float(), targets)
        p.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            norm = nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        else:
            norm = nn.utils.get_total_norm([q.grad for q in trainable if q.grad is not None])
        value = loss.item()
        if not (math.isfinite(value) and torch.isfinite(norm)):
            kept = f"; the last good checkpoint ({out / CHECKPOINT}) is kept" if (out / CHECKPOINT).exists() else ""
            raise DeltaTuneError(
                f"training diverged at epoch {epoch + 1}, step {step + 1}: loss {value}, gradient "
                f"norm {float(norm)}{kept}. Lower --lr, set --grad-clip, or check the data "
                "for NaN/inf values"
            )
        p.optimizer.step()
        p.scheduler.step()
        step += 1
        p.tracker.step(step, value, p.optimizer.param_groups[0]["lr"])
        if p.ema is not None:
            p.ema.update(p.model)
        loss_sum, seen = loss_sum + value * len(targets), seen + len(targets)
        bar.set_postfix(loss=f"{value:.4f}", lr=f"{p.optimizer.param_groups[0]['lr']:.2e}")
    return loss_sum, seen, step


def fit(
    p: Parts, cfg: TrainConfig, rt: Runtime, phase: Phase, start_epoch: int, total: int, history: list[dict]
) -> list[dict]:
    """Trains ``phase`` from ``start_epoch`` to its end (of ``total`` epochs); after each epoch evaluates (at the
    phase's end or every ``eval_every``), logs and checkpoints.

    Raises:
        DeltaTuneError: On a NaN/inf loss or gradient; the last checkpoint (the previous epoch's) is kept.
    """
    history = list(history)
    out = Path(cfg.output_dir)
    step = start_epoch * len(p.train_loader)
    for epoch in range(start_epoch, phase.end):
        p.train_loader.sampler.set_epoch(epoch)  # type: ignore[union-attr]
        p.ddp.train()
        start = time.perf_counter()
        loss_sum, seen, step = _train_epoch(p, cfg, rt, epoch, total, step)
        loss_sum, seen = all_reduce_sum(rt, [loss_sum, float(seen)])
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "phase": phase.index + 1,
            "train_loss": loss_sum / max(seen, 1),
            "lr": p.optimizer.param_groups[0]["lr"],
            "epoch_s": time.perf_counter() - start,
        }
        record["train_images_per_s"] = seen / record["epoch_s"]
        last = epoch + 1 == phase.end
        if last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
            scores = evaluate(p.model, p.eval_loader, rt, p.task)
            record.update({f"eval_{k}": v for k, v in scores.items() if k not in ("n", "tokens")})
            if p.ema is not None:
                key = headline(p.task)
                record[f"ema_{key}"] = evaluate(p.ema.module, p.eval_loader, rt, p.task)[key]
        history.append(record)
        if rt.is_main:
            with (out / "log.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
            p.tracker.epoch(record)
            if cfg.progress:
                tqdm.write(epoch_line(record, total))
        if cfg.checkpoint_every and ((epoch + 1) % cfg.checkpoint_every == 0 or last):
            _checkpoint(p, cfg, rt, history, phase)
    return history


def _check_finite(p: Parts, what: str) -> None:
    """Refuses to save weights (or an EMA copy) that the last optimizer step made NaN/inf."""
    modules = [("", p.model)] + ([("EMA ", p.ema.module)] if p.ema is not None else [])
    for prefix, module in modules:
        bad = [n for n, q in module.named_parameters() if q.requires_grad and not bool(torch.isfinite(q).all())]
        if bad:
            raise DeltaTuneError(
                f"training diverged: after its last step {what} hold NaN/inf values ({prefix}{bad[0]}); nothing was"
                f" saved over the last good checkpoint. Lower --lr or set --grad-clip"
            )


def _checkpoint(p: Parts, cfg: TrainConfig, rt: Runtime, history: list[dict], phase: Phase) -> None:
    """The resumable checkpoint after an epoch, with what rebuilds its structure (phase, the methods' own state)."""
    _check_finite(p, f"the weights of epoch {history[-1]['epoch']}")
    info = {"epoch": history[-1]["epoch"], "phase": phase.index, **train_state(p.model, cfg)}
    info |= {"history": history, "config": cfg.to_dict()}
    with gathered(p.model, p.optimizer):  # FSDP: the full deltas and optimizer state
        write_checkpoint(Path(cfg.output_dir) / CHECKPOINT, *_state(p), info, rt)


def _state(p: Parts) -> tuple[nn.Module, Any, Any, nn.Module | None]:
    """What a checkpoint holds: model, optimizer, schedule and the EMA copy."""
    return p.model, p.optimizer, p.scheduler, p.ema.module if p.ema else None


def _next_phase(p: Parts, cfg: TrainConfig, rt: Runtime, phase: Phase) -> None:
    """The transition into ``phase``: the phased method's change (MiMi prunes) or the next stage; then its optimizer
    etc."""
    if phase.prune is not None:
        context = Transition(p.optimizer, p.ddp, cfg.seed, lambda n: _batches(p, rt, n), _loss(p, rt))
        what = transition(p.model, cfg, phase, context)
    else:
        what = enter_stage(p.model, cfg, phase, rt.device)
    _start_phase(p, cfg, rt, phase)
    if rt.is_main and cfg.progress:
        tqdm.write(f"phase {phase.index + 1}: {what}; {trainable_parameters(p.model):,} trainable parameters")


@dataclass
class Transition:
    """What a phased method gets between phases (``protocols.PhaseContext``)."""

    optimizer: torch.optim.Optimizer
    ddp: nn.Module
    seed: int
    batches: Callable[[int], Iterator[tuple[Any, Tensor]]]
    loss: Callable[[nn.Module, Any, Tensor], Tensor]


def _batches(p: Parts, rt: Runtime, n: int) -> Iterator[tuple[Any, Tensor]]:
    """``n`` training batches on the device, mixed like in training (for a method's scores between phases)."""
    for inputs, targets in itertools.islice(p.train_loader, n):
        inputs, targets = to_device(inputs, rt.device), targets.to(rt.device)
        yield p.mixup(inputs, targets) if p.mixup is not None else (inputs, targets)


def _loss(p: Parts, rt: Runtime) -> Callable[[nn.Module, Any, Tensor], Tensor]:
    def loss(module: nn.Module, inputs: Any, targets: Tensor) -> Tensor:
        with rt.autocast():
            logits = forward(module, inputs)
        return p.criterion(logits.float(), targets)

    return loss


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
    p = _parts(cfg, rt, data, model, current)
    p.tracker = Tracker.for_run(cfg, rt.is_main)
    p.classes = class_names(data, cfg.dataset) if data.task == "classify" else None  # an LM's outputs are tokens
    seed_all(cfg.seed + 1000 * rt.rank)  # augmentation and dropout differ between processes
    start_epoch, history = (saved["epoch"], saved["history"]) if saved else (0, [])
    if saved:
        with gathered(p.model, p.optimizer, load=True):  # FSDP: loaded full, re-sharded on the way out
            resume_state(out / CHECKPOINT, *_state(p), rt, rt.is_main and cfg.progress)
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
            _next_phase(p, cfg, rt, phase)
        if max(start_epoch, phase.start) < phase.end:
            history = fit(p, cfg, rt, phase, max(start_epoch, phase.start), total, history)
    _check_finite(p, "the final weights")
    p.tracker.close()
    report = _report(p, cfg, rt, history, phases)
    with gathered(p.model, frozen=True):  # FSDP: the delta file records the backbone's hash
        if rt.is_main:
            _write_outputs(p, cfg, rt, report, history, wall)
    return report
