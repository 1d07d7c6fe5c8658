"""Offline defaults that never download: a fractal-pretrained ViT and small built-in tasks."""

from deltatune.offline.backbone import WEIGHTS_FILE, create_offline_vit, read_weights_metadata
from deltatune.offline.formula import FractalDataset
from deltatune.offline.tasks import TASKS, make_task

__all__ = ["TASKS", "WEIGHTS_FILE", "FractalDataset", "create_offline_vit", "make_task", "read_weights_metadata"]
