"""Setting up a run: the tuned backbone, its data loaders, mixup and loss, and each phase's optimizer, warm-up +
cosine schedule, EMA and DDP (or FSDP) wrapper, gathered in ``Parts``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.data import Mixup
from timm.optim import param_groups_weight_decay
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from deltatune.backbones import create_backbone, data_config
from deltatune.core import apply
from deltatune.data import (
    Data,
    make_loader,
    make_transform,
    subsample,
    with_transforms,
)
from deltatune.errors import DeltaTuneError
from deltatune.train.config import TrainConfig
from deltatune.train.distributed import Runtime
from deltatune.train.fsdp import shard
from deltatune.train.memory import backbone_to, delta_dtype, enable_grad_checkpointing
from deltatune.train.phases import Phase
from deltatune.train.steps import cosine_lr, seed_all
from deltatune.train.tasks import check_fit, criterion
from deltatune.train.tracking import Tracker


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


def build_model(cfg: TrainConfig, num_classes: int, task: str = "classify") -> nn.Module:
    """The backbone with the config's (first stage's) methods applied (seeded: identical on every process); a
    causal LM's head is its own (tied on GPT-2), never a fresh one to train."""
    seed_all(cfg.seed)
    args = (cfg.model, num_classes, cfg.pretrained, cfg.checkpoint, cfg.img_size)
    model = create_backbone(*args, task=task, **cfg.model_kwargs)
    check_fit(model, task, cfg.block_size)
    backbone_to(model, cfg.precision)
    head = cfg.train_head and task == "classify"
    dtype = delta_dtype(cfg.precision, cfg.delta_dtype)
    model = apply(model, cfg.stage_configs()[0], head=head, bn_stats=cfg.bn_stats, delta_dtype=dtype)
    return enable_grad_checkpointing(model) if cfg.grad_checkpointing else model


def make_parts(cfg: TrainConfig, rt: Runtime, data: Data, model: nn.Module, phase: Phase) -> Parts:
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
    start_phase(p, cfg, rt, phase)
    return p


def start_phase(p: Parts, cfg: TrainConfig, rt: Runtime, phase: Phase) -> None:
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
