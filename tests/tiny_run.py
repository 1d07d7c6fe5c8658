"""A tiny, fast training config shared by the training tests: random-init timm ``test_vit`` on generated images."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def tiny_config(out: str | Path, **overrides: Any) -> dict[str, Any]:
    """TrainConfig fields for a run of about a second: 256 32x32 images, 4 classes, 17 tokens, no augmentation."""
    cfg: dict[str, Any] = {
        "model": "test_vit",
        "pretrained": False,
        "model_kwargs": {"patch_size": 8},
        "img_size": 32,
        "dataset": "synthetic",
        "method": "ssf",
        "epochs": 2,
        "batch_size": 32,
        "lr": 1e-2,
        "warmup_epochs": 0.5,
        "num_workers": 0,
        "train_transform": "none",
        "eval_transform": "none",
        "benchmark_seconds": 0.0,
        "progress": False,
        "output_dir": str(out),
    }
    cfg.update(overrides)
    return cfg
